"""Tiles as tasks on a dask.distributed cluster.

Each worker receives the dense classifier once (scattered, broadcast), computes its tiles and
writes its own chunk-aligned regions of the shared store; results equal a single-process run.
For a multi-GPU node use dask-cuda's ``LocalCUDACluster`` (one worker per GPU) and pass its
scheduler address: each worker's ``device="auto"`` then picks its own GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .engine import TiledPredictor, TileResult
from .errors import InputError
from .store import ProbabilityStore

__all__ = ["check_scheduler", "connect", "run_distributed"]

#: Tiles per task: enough to amortise task overhead, few enough to balance the workers.
TILES_PER_TASK = 4


def check_scheduler(scheduler: str) -> str:
    """Return ``scheduler`` if it is ``"local:N"`` (N >= 1) or an address; raise otherwise."""
    if scheduler.startswith("local:"):
        count = scheduler.split(":", 1)[1] or "1"
        if not count.isdigit() or int(count) < 1:
            raise InputError(
                f"--scheduler {scheduler!r}: local:N needs a whole number N >= 1 of worker "
                "processes, e.g. local:4"
            )
    elif "://" not in scheduler and ":" not in scheduler:
        raise InputError(
            f"--scheduler {scheduler!r} is neither local:N nor a scheduler address "
            "(tcp://host:8786)"
        )
    return scheduler


def connect(scheduler: str) -> Any:
    """A ``distributed.Client`` for ``"local:N"`` (N local worker processes) or an address."""
    check_scheduler(scheduler)
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:  # pragma: no cover - distributed is a dependency
        raise InputError("dask.distributed is not installed: pip install distributed") from err
    if scheduler.startswith("local:"):
        workers = int(scheduler.split(":", 1)[1] or 1)
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        return Client(cluster)
    return Client(scheduler, timeout="30s")


def _compute_tiles(predictor: TiledPredictor, store_path: str, tasks: list[Any]) -> list[Any]:
    """Worker side: compute and write some tiles; return their timing for progress."""
    store = ProbabilityStore.open(store_path)
    timings = []
    for result in predictor.run(tasks):
        store.write_tile(result.leading, result.tile.box, result.probabilities)
        timings.append((result.leading, result.tile, result.read_seconds, result.compute_seconds))
    return timings


def run_distributed(
    predictor: TiledPredictor,
    store: ProbabilityStore,
    tasks: list[Any],
    scheduler: str,
    *,
    on_tile: Callable[[TileResult], None] | None = None,
) -> None:
    """Run ``tasks`` on the cluster at ``scheduler``; ``on_tile`` gets each finished tile."""
    from distributed import as_completed

    client = connect(scheduler)
    try:
        # Scattered once and broadcast: every worker deserialises the network once.
        shared = client.scatter(predictor, broadcast=True)
        batches = [tasks[i : i + TILES_PER_TASK] for i in range(0, len(tasks), TILES_PER_TASK)]
        futures = [
            client.submit(_compute_tiles, shared, str(store.path), batch, pure=False)
            for batch in batches
        ]
        index = 0
        for future in as_completed(futures):
            for leading, tile, read_seconds, compute_seconds in future.result():
                if on_tile is not None:
                    on_tile(
                        TileResult(
                            index,
                            len(tasks),
                            leading,
                            tile,
                            None,  # type: ignore[arg-type]
                            read_seconds,
                            compute_seconds,
                        )
                    )
                index += 1
    finally:
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None:
            cluster.close()
