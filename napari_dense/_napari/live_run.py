"""The GUI's run, as one generator for a napari thread worker: prepare, then tiles nearest the view.

Everything heavy happens here, off the GUI thread: converting the model, opening the image,
planning the tiles and creating (or reopening) the store. The generator first yields a
:class:`Prepared` (the GUI adds its output layers from it), then one
:class:`~napari_dense.run.engine.TileResult` per tile, each written and recorded before it is
yielded. The next tile is always the remaining one nearest to the view's centre *now*
(:class:`ViewFollower`, set from the GUI thread when the user pans), within the current plane.
One tile is read ahead; each is written before it is yielded. Closing the generator (Cancel)
stops after the tile being computed.

The device list's "all GPUs" (:data:`ALL_GPUS`) runs the same generator over one dask worker
per GPU (:func:`napari_dense.run.distributed.iter_distributed`, as ``--scheduler local-cuda``):
the tiles are submitted nearest the view first, a few ahead per worker, and yielded as they
land; Cancel cancels the tasks not yet done and closes the cluster.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_dense.io.store import ProbabilityStore
from napari_dense.run import distributed
from napari_dense.run.engine import TiledPredictor, TileResult
from napari_dense.run.tiling import Tile

__all__ = [
    "ALL_GPUS",
    "NearestFirst",
    "Prepared",
    "ViewFollower",
    "all_gpus_available",
    "live_run",
    "run_device",
    "run_scheduler",
]

Task = tuple[tuple[int, ...], Tile]

#: The device list's entry for one dask worker per GPU (``--scheduler local-cuda``).
ALL_GPUS = "all GPUs"


def all_gpus_available() -> bool:
    """Whether to offer :data:`ALL_GPUS`: with two or more visible GPUs (one adds nothing)."""
    return len(distributed.cuda_devices()) >= 2


def run_device(choice: str) -> str:
    """The ``device`` a run with the device list's ``choice`` plans with.

    :data:`ALL_GPUS`: ``"auto"``, which in each worker (pinned to its GPU) is that GPU.
    """
    return "auto" if choice == ALL_GPUS else choice


def run_scheduler(choice: str) -> str | None:
    """The scheduler of a run with the device list's ``choice`` (None: in this process)."""
    return distributed.LOCAL_CUDA if choice == ALL_GPUS else None


class ViewFollower:
    """The field of view's centre ``(y, x)`` in pixels of the run's image (thread-safe)."""

    def __init__(self, centre: tuple[float, float] | None = None):
        self._lock = threading.Lock()
        self._centre = centre

    def set(self, centre: tuple[float, float] | None) -> None:
        """Called from the GUI thread when the camera moves."""
        with self._lock:
            self._centre = centre

    def get(self) -> tuple[float, float] | None:
        """The latest centre (None: no preference, tiles in raster order)."""
        with self._lock:
            return self._centre


class NearestFirst:
    """The remaining tasks, handed out plane by plane, nearest to the follower's centre first."""

    def __init__(self, tasks: list[Task], follower: ViewFollower):
        self._tasks = tasks
        self._follower = follower
        self._left = np.ones(len(tasks), dtype=bool)
        planes = {leading: n for n, leading in enumerate(dict.fromkeys(t[0] for t in tasks))}
        self._plane = np.array([planes[leading] for leading, _ in tasks], dtype=np.int64)
        self._centres = np.array(
            [((t.y0 + t.y1) / 2, (t.x0 + t.x1) / 2) for _, t in tasks], dtype=float
        ).reshape(-1, 2)

    def __len__(self) -> int:
        return int(np.count_nonzero(self._left))

    def pop(self) -> Task | None:
        """The next task (None when all were handed out)."""
        left = np.flatnonzero(self._left)
        if not len(left):
            return None
        plane = self._plane[left].min()
        left = left[self._plane[left] == plane]
        centre = self._follower.get()
        if centre is None:
            chosen = int(left[0])
        else:
            distance = ((self._centres[left] - np.asarray(centre)) ** 2).sum(axis=1)
            chosen = int(left[int(np.argmin(distance))])
        self._left[chosen] = False
        return self._tasks[chosen]


@dataclass(frozen=True)
class Prepared:
    """What the worker yields first: the run is planned and its store exists.

    Attributes
    ----------
    predictor, store
        The run's :class:`~napari_dense.run.engine.TiledPredictor` and store.
    total
        Tiles of the whole run; ``done`` of them were already in the store (resume).
    seconds
        Time spent preparing (conversion, planning, store creation).
    """

    predictor: TiledPredictor
    store: ProbabilityStore
    total: int
    done: int
    seconds: float


def live_run(
    prepare: Callable[[], tuple[TiledPredictor, ProbabilityStore]],
    follower: ViewFollower,
    scheduler: str | None = None,
) -> Generator[Prepared | TileResult, None, None]:
    """Prepare a run, then compute, write and yield its remaining tiles nearest the view first;
    finalize the store when every tile is done (a cancelled run leaves it resumable, unlocked).

    Parameters
    ----------
    prepare
        Returns the predictor and the (new or reopened) store, e.g. a partial of
        :func:`napari_dense.run.to_zarr.prepare_run`; called here, in the worker.
    follower
        Where the user looks, read before each tile.
    scheduler
        None: compute here. ``"local-cuda"`` (:func:`run_scheduler`), ``"local:N"`` or an
        address: the tiles become tasks on that cluster, one tile each (latency-sized GUI
        tiles), submitted nearest the view first; the workers write them.
    """
    if scheduler is not None:
        distributed.check_scheduler(scheduler)  # before the store exists
    start = time.perf_counter()
    predictor, store = prepare()
    try:
        done = store.completed_tiles()
        tasks = [(lead, tile) for lead, tile in predictor.tasks() if (lead, tile.box) not in done]
        total = len(tasks) + len(done)
        yield Prepared(predictor, store, total, len(done), time.perf_counter() - start)
        began = time.perf_counter()
        queue = NearestFirst(tasks, follower)
        if scheduler is None:
            yield from _compute(predictor, store, queue, len(done), total)
        else:
            yield from distributed.iter_distributed(
                predictor, store, iter(queue.pop, None), scheduler,
                total=total, first_index=len(done), tiles_per_task=1,
            )  # fmt: skip
        seconds = time.perf_counter() - began
        megapixels = sum(tile.shape[0] * tile.shape[1] for _, tile in tasks) / 1e6
        store.finalize(  # here, not on the GUI thread: it completes the pyramid's last levels
            attributes={
                "seconds": round(seconds, 3),
                "megapixels_per_second": round(megapixels / max(seconds, 1e-9), 4),
            }
        )
    finally:
        if store.holds_lock:  # cancelled or failed: resumable, and writable by the next run
            store.release_lock()


def _compute(
    predictor: TiledPredictor, store: ProbabilityStore, queue: NearestFirst, index: int, total: int
) -> Iterator[TileResult]:
    # Each tile is written before it is yielded (the overlay shows it at once); the next
    # window is read meanwhile.
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-dense-read")

    def timed_read(task: Task) -> tuple[Task, np.ndarray, float]:
        begin = time.perf_counter()
        return task, predictor.read(*task), time.perf_counter() - begin

    first = queue.pop()
    reading: Future[Any] | None = None if first is None else reader.submit(timed_read, first)
    try:
        while reading is not None:
            (leading, tile), window, read_seconds = reading.result()
            following = queue.pop()  # chosen now: the view may have moved
            reading = None if following is None else reader.submit(timed_read, following)
            begin = time.perf_counter()
            probabilities = predictor.compute(window, tile)
            seconds = time.perf_counter() - begin
            store.write_tile(leading, tile.box, probabilities)
            yield TileResult(
                index, total, tuple(int(i) for i in leading), tile, probabilities,
                read_seconds, seconds,
            )  # fmt: skip
            index += 1
    finally:
        # Cancelled (closed, possibly from the GUI thread): drop the window read ahead, wait
        # for nothing.
        reader.shutdown(wait=False, cancel_futures=True)
