"""Tiled dense inference over images of any size, in constant memory.

:func:`iter_predict` is a generator yielding one :class:`TileResult` per tile: the unit of progress
and of cancellation for the CLI and the GUI (closing the generator stops after the current tile).
:func:`napari_dense.run.to_zarr.predict_to_zarr` drains it into an OME-Zarr store that survives
cancellation and crashes. :func:`make_predictor` is the one place where a run's model, image and
tile plan are put together; the predictor itself is :class:`TiledPredictor`
(:mod:`napari_dense.run.predictor`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from napari_dense.io.sources import open_image
from napari_dense.run.classifier import ClassifierSetup, resolve_classifier
from napari_dense.run.options import MIN_TILE, RunOptions
from napari_dense.run.predictor import (
    PRECISIONS,
    READ_AHEAD,
    MemoryCheck,
    TiledPredictor,
    TileResult,
)
from napari_dense.run.tile_size import auto_tile_size

__all__ = [
    "MIN_TILE",
    "PRECISIONS",
    "READ_AHEAD",
    "ClassifierSetup",
    "MemoryCheck",
    "TileResult",
    "TiledPredictor",
    "auto_tile_size",
    "iter_predict",
    "make_predictor",
    "resolve_classifier",
]


def make_predictor(
    image: Any,
    model: Any,
    patch_size: int | tuple[int, int] | None = None,
    *,
    options: RunOptions | None = None,
    memory_check: MemoryCheck | None = None,
    **keywords: Any,
) -> TiledPredictor:
    """Convert the model, open the image lazily and plan its tiles (one place for all runs).

    ``image``, ``model`` and ``patch_size`` are those of :func:`iter_predict`; the run options
    come as ``options`` and/or keywords (:class:`~napari_dense.run.options.RunOptions`;
    ``output_dtype`` is ``dtype``). ``memory_check``: test hook (:data:`MemoryCheck`).
    """
    run = RunOptions.merge(options, caller="make_predictor", **keywords)
    setup = resolve_classifier(model, patch_size, run)
    source = open_image(
        image, channels=setup.dense.in_channels, channel_axis=run.channel_axis, level=run.level
    )
    return TiledPredictor(source, setup, run, memory_check=memory_check)


def iter_predict(
    image: Any,
    model: Any,
    patch_size: int | tuple[int, int] | None = None,
    *,
    options: RunOptions | None = None,
    skip: Iterable[tuple[tuple[int, ...], tuple[int, int, int, int]]] = (),
    centre: tuple[float, float] | None = None,
    memory_check: MemoryCheck | None = None,
    **keywords: Any,
) -> Iterator[TileResult]:
    """Predict ``image`` tile by tile, yielding each tile's probabilities as soon as it is done.

    Parameters
    ----------
    image
        numpy/dask/zarr array or a path (``.zarr``, OME-Zarr, ``.tif``, ``.npy``, ...), with
        optional leading Z/T axes (see :func:`napari_dense.io.sources.open_image`).
    model
        A patch classifier (``nn.Module`` or exported program), a ``DenseClassifier``, a model
        file path or a loaded model file (its metadata supplies patch size, normalisation,
        activation and class names).
    patch_size
        ``Ph`` or ``(Ph, Pw)``; required for a patch classifier without metadata.
    options, **keywords
        The run options (:class:`napari_dense.RunOptions`: ``mode``, ``channel_axis``,
        ``level``, ``device``, ``precision``, ``border``, ``interpolation``, ``tile``,
        ``memory_budget``, ``normalisation``, ``activation``, ``class_names``, ``dtype``,
        ``non_finite``, ``compile``), as a ``RunOptions`` and/or as keywords (keywords win).
        The result equals :func:`napari_dense.predict`'s, tile by tile.
    skip
        ``(leading, box)`` pairs already done (resume).
    centre
        ``(y, x)``: compute the tiles nearest to it first (the GUI passes the field of view).
    memory_check
        Test hook called before each forward pass (see :data:`MemoryCheck`).

    Yields
    ------
    TileResult
        One per tile. Closing the generator stops after the current tile.
    """
    run = RunOptions.merge(options, caller="iter_predict", **keywords)
    predictor = make_predictor(image, model, patch_size, options=run, memory_check=memory_check)
    done = {(tuple(leading), tuple(box)) for leading, box in skip}
    tasks = [(lead, t) for lead, t in predictor.tasks(centre) if (lead, t.box) not in done]
    yield from predictor.run(tasks)
