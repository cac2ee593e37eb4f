"""Tiles as tasks on a dask.distributed cluster.

Each worker receives the dense classifier once (scattered, broadcast), computes its tiles and
writes its own chunk-aligned regions of the shared store; results equal a single-process run.
On a multi-GPU node, ``"local-cuda"`` starts one worker per GPU (dask-cuda's
``LocalCUDACluster`` where installed), each pinned to its GPU: ``device="auto"`` or ``"cuda"``
in a worker is its own GPU.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

from napari_dense.errors import InputError
from napari_dense.io.store import ProbabilityStore
from napari_dense.run.engine import TiledPredictor, TileResult
from napari_dense.run.tiling import Tile

__all__ = [
    "LOCAL_CUDA",
    "check_scheduler",
    "connect",
    "cuda_devices",
    "iter_distributed",
    "run_distributed",
]

Task = tuple[tuple[int, ...], Tile]

#: Tiles per task: enough to amortise task overhead, few enough to balance the workers.
TILES_PER_TASK = 4

#: Tasks submitted ahead per worker: one computing, one queued behind it.
IN_FLIGHT_PER_WORKER = 2


#: ``--scheduler local-cuda``: one worker process per visible GPU.
LOCAL_CUDA = "local-cuda"


def cuda_devices() -> list[str]:
    """The visible GPUs, as values of ``CUDA_VISIBLE_DEVICES`` (one per worker of local-cuda).

    The entries of ``CUDA_VISIBLE_DEVICES`` when it is set (each worker sees one of them),
    else ``"0"`` … ``"n-1"``; empty without CUDA.
    """
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [entry.strip() for entry in visible.split(",") if entry.strip()][:count]
    return [str(index) for index in range(count)]


def check_scheduler(scheduler: str, *, _devices: list[str] | None = None) -> str:
    """Return ``scheduler`` if it is ``"local:N"`` (N >= 1), ``"local-cuda"`` or an address.

    ``"local-cuda"`` needs at least one visible GPU (``_devices``: the GPUs to use instead of
    :func:`cuda_devices`, for tests). Raises :class:`InputError` naming the fix otherwise.
    """
    if scheduler == LOCAL_CUDA:
        if not (cuda_devices() if _devices is None else _devices):
            raise InputError(
                "--scheduler local-cuda starts one worker per GPU, but no CUDA GPU is visible; "
                "use --scheduler local:N for N worker processes on the CPU"
            )
    elif scheduler.startswith("local:"):
        count = scheduler.split(":", 1)[1] or "1"
        if not count.isdigit() or int(count) < 1:
            raise InputError(
                f"--scheduler {scheduler!r}: local:N needs a whole number N >= 1 of worker "
                "processes, e.g. local:4 (or local-cuda: one per GPU)"
            )
    elif "://" not in scheduler and ":" not in scheduler:
        raise InputError(
            f"--scheduler {scheduler!r} is neither local:N, local-cuda nor a scheduler address "
            "(tcp://host:8786)"
        )
    return scheduler


def connect(scheduler: str, *, _devices: list[str] | None = None) -> Any:
    """A ``distributed.Client`` for ``"local:N"``, ``"local-cuda"`` or a scheduler address.

    ``"local-cuda"``: one single-threaded worker process per visible GPU, each pinned to its GPU
    through ``CUDA_VISIBLE_DEVICES`` (so ``device="cuda"`` in a worker is its own GPU):
    ``dask_cuda.LocalCUDACluster`` where dask-cuda is installed, else a ``distributed``
    cluster with that variable set per worker. ``_devices`` (tests): the ``CUDA_VISIBLE_DEVICES``
    values of the workers, instead of :func:`cuda_devices`; it always takes the second way.
    The client is not made dask's default: this process's own dask arrays (an image layer in
    napari) keep computing here.
    """
    check_scheduler(scheduler, _devices=_devices)
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:  # pragma: no cover - distributed is a dependency
        raise InputError("dask.distributed is not installed: pip install distributed") from err
    if scheduler == LOCAL_CUDA:
        devices = cuda_devices() if _devices is None else _devices
        return Client(_cuda_cluster(devices, _devices), set_as_default=False)
    if scheduler.startswith("local:"):
        workers = int(scheduler.split(":", 1)[1] or 1)
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        return Client(cluster, set_as_default=False)
    return Client(scheduler, timeout="30s", set_as_default=False)


def _cuda_cluster(devices: list[str], forced: list[str] | None) -> Any:
    """One worker per entry of ``devices``, each with ``CUDA_VISIBLE_DEVICES`` set to it."""
    if forced is None:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            pass
        else:  # pragma: no cover - needs GPUs and dask-cuda
            return LocalCUDACluster(
                CUDA_VISIBLE_DEVICES=",".join(devices), threads_per_worker=1,
                dashboard_address=None,
            )  # fmt: skip
    from distributed import Scheduler, SpecCluster

    workers = {
        f"gpu-{index}": {
            "cls": _prompt_nanny(),
            "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": device}},
        }
        for index, device in enumerate(devices)
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None}}
    return SpecCluster(workers=workers, scheduler=scheduler)


#: Seconds a closing worker process gets to exit before it is killed (distributed: 4 s, most
#: of it the interpreter's teardown after torch). A tile it was still writing is not recorded
#: as done (stores survive crashes) and is computed again on resume. Makes Cancel prompt.
KILL_AFTER_SECONDS = 0.8


def _prompt_nanny() -> type:
    """A ``distributed.Nanny`` that kills its worker process :data:`KILL_AFTER_SECONDS` after
    asking it to close."""
    from distributed import Nanny

    class PromptNanny(Nanny):
        async def close(self, timeout: float | None = 5, reason: str = "nanny-close") -> Any:
            # Nanny.kill waits 0.8 * timeout for the process before killing it.
            return await super().close(timeout=KILL_AFTER_SECONDS / 0.8, reason=reason)

    return PromptNanny


def _compute_tiles(predictor: TiledPredictor, store_path: str, tasks: list[Any]) -> list[Any]:
    """Worker side: compute and write some tiles; return their timing for progress."""
    store = ProbabilityStore.open(store_path)
    timings = []
    for result in predictor.run(tasks):
        store.write_tile(result.leading, result.tile.box, result.probabilities)
        timings.append((result.leading, result.tile, result.read_seconds, result.compute_seconds))
    return timings


def iter_distributed(
    predictor: TiledPredictor,
    store: ProbabilityStore,
    tasks: Iterable[Task],
    scheduler: str,
    *,
    total: int | None = None,
    first_index: int = 0,
    tiles_per_task: int = TILES_PER_TASK,
) -> Iterator[TileResult]:
    """Compute ``tasks`` on the cluster at ``scheduler``, yielding each tile as it lands.

    The workers write the tiles (level 0) before their task completes; this process, the
    writer-lock holder, adds each to the pyramid levels and yields a :class:`TileResult`
    without probabilities. ``tasks`` is consumed lazily, in order,
    ``tiles_per_task`` at a time, and only :data:`IN_FLIGHT_PER_WORKER` tasks per worker thread are
    submitted ahead: an order chosen as it is consumed (the GUI's nearest-to-the-view queue)
    is followed as far as that allows. Closing the generator (cancelling) cancels the tasks not
    yet done and closes the client, and the cluster it started.

    Parameters
    ----------
    total
        Tiles of the whole run (``len(tasks)`` when None); ``first_index`` is the first
        tile's :attr:`TileResult.index` (tiles already done by a resumed run come first).
    """
    from distributed import as_completed

    todo = iter(tasks)
    count = len(tasks) if total is None else total  # type: ignore[arg-type]
    client = connect(scheduler)
    pending: set[Any] = set()
    try:
        # Scattered once and broadcast: every worker deserialises the network once.
        shared = client.scatter(predictor, broadcast=True)
        landed = as_completed(loop=client.loop)  # the client is not dask's default

        def submit_next() -> None:
            batch = list(islice(todo, tiles_per_task))
            if batch:
                future = client.submit(_compute_tiles, shared, str(store.path), batch, pure=False)
                pending.add(future)
                landed.add(future)

        for _ in range(IN_FLIGHT_PER_WORKER * max(sum(client.nthreads().values()), 1)):
            submit_next()
        index = first_index
        for future in landed:
            pending.discard(future)
            timings = future.result()
            submit_next()  # chosen now: the caller's order may have changed
            for leading, tile, read_seconds, compute_seconds in timings:
                store.update_pyramid(leading, tile.box)
                yield TileResult(
                    index, count, tuple(int(i) for i in leading), tile, None,  # type: ignore[arg-type]
                    read_seconds, compute_seconds,
                )  # fmt: skip
                index += 1
    finally:
        cancelled = bool(pending)
        if cancelled:  # cancelled or failed: nothing more is computed or written
            client.cancel(list(pending), force=True)
        cluster = getattr(client, "cluster", None)

        def shut_down() -> None:
            client.close()
            if cluster is not None:
                cluster.close()

        if cancelled:
            # Cancel answers at once (the GUI closes this generator on its own thread): the
            # tasks are cancelled; the client and the cluster it started close in the
            # background (about a second: the workers are told to stop, then killed).
            threading.Thread(target=shut_down, name="napari-dense-cluster-close").start()
        else:
            shut_down()


def run_distributed(
    predictor: TiledPredictor,
    store: ProbabilityStore,
    tasks: list[Any],
    scheduler: str,
    *,
    on_tile: Callable[[TileResult], None] | None = None,
) -> None:
    """Run ``tasks`` on the cluster at ``scheduler``; ``on_tile`` gets each finished tile.

    :func:`iter_distributed` as a loop (the levels are added as tiles land).
    """
    for result in iter_distributed(predictor, store, tasks, scheduler):
        if on_tile is not None:
            on_tile(result)
