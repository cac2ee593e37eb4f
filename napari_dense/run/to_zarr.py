"""Predict an image into an OME-Zarr probability map that survives cancellation and crashes."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from napari_dense.errors import InputError
from napari_dense.io.store import ProbabilityStore, auto_pyramid_levels, resolve_space
from napari_dense.run.engine import MemoryCheck, TiledPredictor, TileResult, make_predictor
from napari_dense.run.fingerprint import (
    FINGERPRINT_KEY,
    check_resume,
    image_identity,
    run_fingerprint,
)
from napari_dense.run.options import RunOptions

__all__ = ["iter_into_store", "predict_to_zarr", "prepare_run", "remaining_tasks"]

#: Axis names of the output for 0, 1 and 2 leading (Z/T) axes of the source (NGFF order).
_OUTPUT_AXES = {0: "cyx", 1: "czyx", 2: "tczyx"}


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def prepare_run(
    image: Any,
    model: Any,
    output: str | Path,
    *,
    patch_size: int | tuple[int, int] | None = None,
    options: RunOptions | None = None,
    overwrite: bool = False,
    resume: bool = False,
    memory_check: MemoryCheck | None = None,
    pyramid_levels: int | str = 0,
    protect: Sequence[str | os.PathLike[str]] = (),
    space: Any = None,
    **keywords: Any,
) -> tuple[TiledPredictor, ProbabilityStore]:
    """Open the image, convert the model, plan the tiles and create (or reopen) the store.

    The run options come as ``options`` and/or keywords (:class:`napari_dense.RunOptions`;
    ``dtype`` is what the store holds, and what the device returns).
    The store holds its writer lock (released by :func:`iter_into_store` when it stops, or by
    ``store.finalize()``). ``pyramid_levels`` (``N`` or ``"auto"``) makes a new store's pyramid
    levels at once, filled as tiles land; a resumed store keeps its own. ``protect``: more
    paths that ``overwrite`` must never delete (the GUI passes the layer's source file); the
    input's own path (a path argument, an opened zarr array, a memmap) is always protected.
    ``space``: where the image's pixels sit in the world (a
    :class:`~napari_dense.io.physical.PhysicalSpace`, or a napari layer's ``{"scale", "translate",
    "units"}``) for an in-memory array; by default the image's own metadata
    (``predictor.source.space``). Level 0 of the map gets it, level ``k`` its ``2**k``
    downsampling.

    Raises
    ------
    StoreExistsError
        The output exists and neither ``overwrite`` nor ``resume`` was given.
    OverwriteRefusedError
        ``overwrite`` was given but the output is not a map this project wrote, holds foreign
        files, is a link, or is (or contains) the input (a :class:`StoreExistsError`).
    StoreLockedError
        Another run is writing the output (``.owner`` names its PID, host and start time).
    ResumeMismatchError
        ``resume``: the output was started by another run (``.differences`` lists what).
    InputError
        Anything else the user can fix (also resume onto a file or onto the input).
    """
    run = RunOptions.merge(options, caller="prepare_run", **keywords)
    if overwrite and resume:
        raise InputError("choose either overwrite or resume, not both")
    if resume and run.tile is None:
        # The automatic tile size depends on free memory: a resume keeps the run's tiles.
        run = replace(run, tile=_tile_of(Path(output)))
    # The device returns what the store holds (run.dtype).
    predictor = make_predictor(image, model, patch_size, options=run, memory_check=memory_check)
    setup, source = predictor.setup, predictor.source
    if len(source.leading_shape) > 2:
        raise InputError(
            f"the image has {len(source.leading_shape)} axes before (C, Y, X); at most two "
            "(T, Z) are supported: pass one volume at a time"
        )
    path = Path(output)
    axes = _OUTPUT_AXES[len(source.leading_shape)]
    shape = _output_shape(axes, source.leading_shape, setup.dense.num_classes, source.plane_shape)
    guarded = [*_input_paths(image, source.path), *(os.fspath(p) for p in protect)]
    fingerprint = run_fingerprint(
        network=predictor.dense,
        model_file_sha256=setup.provenance.get("model_sha256"),
        patch_size=setup.dense.patch_size,
        sampling=setup.dense.plan.sampling,
        border=run.border,
        interpolation=run.interpolation,
        normalisation=setup.normalisation,
        activation=setup.activation,
        precision=predictor.precision,  # resolved: "auto" may mean bfloat16 or float32
        non_finite=run.non_finite,
        dtype=run.dtype,
        tile=predictor.plan.tile_shape,
        class_names=setup.class_names,
        output_shape=shape,
        image=image_identity(
            source.array, path=source.path, source_shape=source.source_shape, level=run.level
        ),
    )
    if resume and (path.exists() or path.is_symlink()):
        return predictor, _reopen(path, fingerprint, guarded)
    dense = setup.dense
    world = resolve_space(space, source.space)
    provenance = {
        **setup.provenance,
        "package_version": _version(),
        "patch_size": list(dense.patch_size),
        "mode": run.mode_name,
        "sampling": dense.plan.sampling,
        "output_stride": list(dense.output_stride),
        "exact": dense.exact,
        "tile_size": list(predictor.plan.tile_shape),
        "device": str(predictor.device),
        "device_name": _device_name(predictor.device),
        "precision": predictor.precision,  # resolved ("auto": bfloat16 on CUDA, else float32)
        "compiled": run.compile,
        "border": run.border,
        "interpolation": run.interpolation,
        "non_finite": run.non_finite,
        "normalisation": dict(setup.normalisation) if setup.normalisation else None,
        "activation": setup.activation,
        "source_path": source.path,
        "source_shape": list(source.source_shape),
        "source_level": run.level,
        "space": world.as_dict(),
        "started": _now(),
        "complete": False,
        FINGERPRINT_KEY: fingerprint,
    }
    store = ProbabilityStore.create(
        path,
        shape=shape,
        axes=axes,
        chunks=predictor.plan.tile_shape,
        class_names=list(setup.class_names),
        dtype=run.dtype,
        overwrite=overwrite,
        attributes=provenance,
        protect=guarded,
        pyramid_levels=pyramid_levels,
        space=world,
    )
    return predictor, store


def _reopen(path: Path, fingerprint: dict[str, Any], protect: list[str]) -> ProbabilityStore:
    """The store of the interrupted run at ``path``, locked, if it is that same run."""
    real = path.resolve()
    for guarded in protect:
        if Path(guarded).resolve() == real or real in Path(guarded).resolve().parents:
            raise InputError(
                f"{path} is the input image (or contains it), not an interrupted run: write the "
                "map to another output path"
            )
    if path.is_file():
        raise InputError(
            f"{path} is a file, not the folder of an interrupted run, so there is nothing to "
            "resume: choose another output path"
        )
    store = ProbabilityStore.open(path)
    # Compared before locking: a refused resume changes nothing in the store.
    check_resume(path, store.attributes.get(FINGERPRINT_KEY), fingerprint)
    store.acquire_lock()  # StoreLockedError while another run writes it
    try:
        shape, tile = tuple(fingerprint["output_shape"]), tuple(fingerprint["tile"])
        if tuple(store.array.shape) != shape or tuple(store.array.chunks[-2:]) != tile:
            raise InputError(
                f"{path} holds an array of shape {tuple(store.array.shape)} in chunks "
                f"{tuple(store.array.chunks)}, not the shape {shape} in {tile} tiles its run "
                "recorded (the store was altered); pass overwrite=True (--overwrite) to start again"
            )
        store.forget_unreadable_tiles()
    except BaseException:
        store.release_lock()
        raise
    return store


def _tile_of(path: Path) -> tuple[int, int] | None:
    """The tile size of the store at ``path``, None when there is no readable store."""
    if not path.is_dir():
        return None
    try:
        return ProbabilityStore.open(path).tile_shape
    except InputError:
        return None


def remaining_tasks(
    predictor: TiledPredictor,
    store: ProbabilityStore,
    centre: tuple[float, float] | None = None,
) -> list[tuple[tuple[int, ...], Any]]:
    """The ``(leading, tile)`` tasks of ``predictor`` that ``store`` has not recorded as done.

    ``centre``: ``(y, x)``, tiles nearest to it first (the GUI passes the field of view).
    """
    done = store.completed_tiles()
    return [(lead, t) for lead, t in predictor.tasks(centre) if (lead, t.box) not in done]


def _input_paths(image: Any, source_path: str | None) -> list[str]:
    """Where the input lives on disk, as far as known: never to be deleted by ``overwrite``."""
    paths = [source_path] if source_path is not None else []
    store = getattr(image, "store", None)  # a zarr array opened by the caller
    root = getattr(store, "root", None)
    if root is not None:
        paths.append(os.fspath(Path(root) / str(getattr(image, "path", "") or "")))
    filename = getattr(image, "filename", None)  # a numpy memmap
    if isinstance(filename, str | os.PathLike):
        paths.append(os.fspath(filename))
    return paths


def _output_shape(
    axes: str, leading: tuple[int, ...], classes: int, plane: tuple[int, int]
) -> tuple[int, ...]:
    """Shape in NGFF axis order (t, c, z, y, x): the source's leading axes are (t, z) or (z,)."""
    sizes = dict(zip(axes.replace("c", "").replace("yx", ""), leading, strict=True))
    sizes.update(c=classes, y=plane[0], x=plane[1])
    return tuple(sizes[axis] for axis in axes)


def _version() -> str:
    from napari_dense import __version__

    return __version__


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def predict_to_zarr(
    image: Any,
    model: Any,
    output: str | Path,
    *,
    on_tile: Callable[[TileResult], None] | None = None,
    pyramid_levels: int | str | None = None,
    scheduler: str | None = None,
    options: RunOptions | None = None,
    **keywords: Any,
) -> ProbabilityStore:
    """Predict ``image`` into an OME-Zarr probability map at ``output``.

    Parameters
    ----------
    image, model
        As in :func:`napari_dense.run.engine.iter_predict`.
    output
        The ``.zarr`` directory. An existing one is refused unless ``overwrite=True``;
        ``resume=True`` reopens it and computes only the tiles not recorded as done.
    on_tile
        Called with each :class:`TileResult` (progress bars, live display).
    pyramid_levels
        Extra 2× downsampled levels (``N`` or ``"auto"``: down to about 512 px), made when the
        run starts and filled as tiles land; ``finalize`` only completes them. ``None``: none
        for a new store, a resumed store keeps its own; a number or ``"auto"`` on resume
        adds or removes levels at the end.
    scheduler
        ``None`` (this process), ``"local:N"`` (a local dask cluster of N worker processes) or
        the address of a dask scheduler (``"tcp://host:8786"``): tiles become tasks.
    options, **keywords
        The run options (:class:`napari_dense.RunOptions`, as a ``RunOptions`` and/or as
        keywords; ``dtype``: ``"float32"``, ``"float16"`` or ``"uint8"``), and those of
        :func:`prepare_run`: ``patch_size``, ``overwrite``, ``resume``, ``protect``, ``space``
        (pixel size, translation, units of an in-memory array).

    Returns
    -------
    ProbabilityStore
        The finished store. Interrupted (Ctrl-C, closed GUI, crash), it stays incomplete and
        resumable: every tile written so far is kept and recorded.
    """
    predictor, store = prepare_run(
        image, model, output, options=options, pyramid_levels=pyramid_levels or 0, **keywords
    )
    try:
        tasks = remaining_tasks(predictor, store)
        start = time.perf_counter()
        if scheduler:
            from napari_dense.run.distributed import run_distributed

            # Workers write level 0 only; this run (the lock holder) adds the levels as they land.
            run_distributed(predictor, store, tasks, scheduler, on_tile=on_tile)
        else:
            _run_local(predictor, store, tasks, on_tile)
        seconds = time.perf_counter() - start
        megapixels = sum(tile.shape[0] * tile.shape[1] for _, tile in tasks) / 1e6
        # None keeps the store's levels; "auto" (also on resume) is the plane's auto depth.
        auto = pyramid_levels == "auto"
        levels = auto_pyramid_levels(*store.plane_shape) if auto else pyramid_levels
        store.finalize(
            attributes={
                "finished": _now(),
                "seconds": round(seconds, 3),
                "megapixels_per_second": round(megapixels / max(seconds, 1e-9), 4),
                "complete": True,
            },
            pyramid_levels=None if levels is None else int(levels),
        )
    except BaseException:
        store.discard_if_empty()  # failed before its first tile: leave nothing behind
        raise
    finally:
        store.release_lock()
    return store


def iter_into_store(
    predictor: TiledPredictor,
    store: ProbabilityStore,
    tasks: list[Any],
    *,
    end_run: bool = True,
) -> Iterator[TileResult]:
    """Compute ``tasks`` and write them; yield each tile once it is written and recorded.

    Tile ``n`` is written while tile ``n + 1`` computes. Closing the generator (Cancel, Ctrl-C)
    stops after the current tile; every computed tile is written before it returns. The GUI runs
    this generator in a worker thread; the CLI drains it.

    With ``end_run`` (the default), the generator ends the run when it stops: it releases the
    store's writer lock (so that a cancelled run can be resumed; :meth:`~ProbabilityStore.finalize`
    takes it again), and a failure before the first tile deletes the store :func:`prepare_run`
    has just created. :func:`predict_to_zarr` passes ``False`` and does both itself.
    """
    try:
        yield from _write_while_computing(predictor, store, tasks)
    except Exception:
        if end_run:
            store.discard_if_empty()
        raise
    finally:
        if end_run:
            store.release_lock()


def _write_while_computing(
    predictor: TiledPredictor, store: ProbabilityStore, tasks: list[Any]
) -> Iterator[TileResult]:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-dense-write") as writer:
        pending: tuple[Future[None], TileResult] | None = None
        try:
            for result in predictor.run(tasks):
                if pending is not None:
                    pending[0].result()  # surfaces write errors
                    done, pending = pending[1], None
                    yield done
                write = writer.submit(
                    store.write_tile, result.leading, result.tile.box, result.probabilities
                )
                pending = (write, result)
            if pending is not None:
                pending[0].result()
                done, pending = pending[1], None
                yield done
        finally:
            if pending is not None:
                pending[0].result()


def _run_local(
    predictor: TiledPredictor,
    store: ProbabilityStore,
    tasks: list[Any],
    on_tile: Callable[[TileResult], None] | None,
) -> None:
    for result in iter_into_store(predictor, store, tasks, end_run=False):
        if on_tile is not None:
            on_tile(result)
