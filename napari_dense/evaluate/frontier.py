"""The speed/accuracy frontier of per-layer sampling: which layers are worth densifying.

Every striding layer can be kept strided (``"none"``: cheap, interpolated between samples),
sampled at half its phases (``"checkered"``) or densified (``"all"``: exact everywhere).
:func:`frontier` measures settings of these on one image region — time, memory and the error
against advanced (every layer ``"all"``) — and :meth:`Frontier.pick` returns the fastest setting
within an error budget. The rows and the table are :mod:`~napari_dense.evaluate.frontier_table`,
the search :mod:`~napari_dense.evaluate.frontier_search`, the figure
:mod:`~napari_dense.evaluate.frontier_plot`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from napari_dense.convert import explain
from napari_dense.evaluate.frontier_search import (
    FrontierRun,
    check_levels,
    groups_of,
    rows_expected,
    unwrap,
)
from napari_dense.evaluate.frontier_table import LEVELS, METRICS, Frontier, FrontierRow
from napari_dense.run.options import RunOptions

__all__ = [
    "FRONTIER_OPTIONS",
    "LEVELS",
    "METRICS",
    "Frontier",
    "FrontierRow",
    "frontier",
    "frontier_size",
    "iter_frontier",
    "layer_groups",
]

#: The run options a frontier applies (each setting runs in memory, on the region).
FRONTIER_OPTIONS = frozenset(
    {"channel_axis", "normalisation", "activation", "device", "border", "non_finite"}
)
#: A frontier compares probabilities: softmax unless the options say otherwise.
_DEFAULTS = RunOptions(activation="softmax")


def layer_groups(model: Any, patch_size: int | tuple[int, int] | None = None) -> list[list[str]]:
    """The striding layers of ``model`` grouped by what must share a sampling, in plan order."""
    module, patch, _ = unwrap(model, patch_size, None)
    return groups_of(explain(module, patch).layers)


def frontier_size(
    model: Any,
    patch_size: int | tuple[int, int] | None = None,
    levels: Sequence[str] = LEVELS,
    max_exhaustive: int = 4,
) -> int | None:
    """How many rows :func:`iter_frontier` will yield, or None where that is not known ahead.

    Exhaustive search: ``L ** n`` (``L`` levels, ``n`` groups). Greedy search: with two levels
    ``1 + n (n + 1) / 2``; with three the length depends on the path (between
    ``1 + n (n + 1)`` and ``1 + n² + n (n + 1) / 2``), so None.
    """
    groups = len(layer_groups(model, patch_size))
    return rows_expected(len(check_levels(levels)), groups, max_exhaustive)


def iter_frontier(
    model: Any,
    image: Any,
    patch_size: int | tuple[int, int] | None = None,
    *,
    region: tuple[int, int, int, int] | None = None,
    repeats: int = 3,
    levels: Sequence[str] = LEVELS,
    max_exhaustive: int = 4,
    options: RunOptions | None = None,
    **keywords: Any,
) -> Iterator[FrontierRow]:
    """Measure sampling settings one at a time (the unit of progress and of cancelling).

    Advanced comes first: it is the reference every error is measured against. With at most
    ``max_exhaustive`` layer groups every combination of ``levels`` is measured
    (``len(levels) ** groups`` rows); otherwise a greedy path: from every group at the
    cheapest level, each step measures every one-level upgrade of one group and moves to the
    one with the largest drop in class change (ties: mean ``|Δp|``) per added multiply-add per
    pixel, until every group is ``"all"``.

    Parameters
    ----------
    model
        A patch classifier (module or torch.export program) or a loaded model file
        (:func:`napari_dense.load_classifier`; its patch size and normalisation are used unless
        given here).
    image
        ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``, any array; only ``region`` is read.
    patch_size
        ``Ph`` or ``(Ph, Pw)``; required for a module without metadata.
    region
        ``(y0, y1, x0, x1)`` of the image to evaluate (default: the whole image).
    repeats
        Timed runs per setting (median); one more, untimed, warms up and measures memory.
    levels
        The samplings tried per group, a subset of :data:`LEVELS` that includes ``"all"``.
    max_exhaustive
        The most groups searched exhaustively.
    options, **keywords
        The run options (:class:`napari_dense.RunOptions`) a frontier applies:
        ``channel_axis``, ``border``, ``device``, ``non_finite``, ``normalisation`` (applied
        before the network) and ``activation``, which turns the outputs into the probabilities
        that are compared: ``"softmax"`` (the default here), ``"sigmoid"``, or None /
        ``"none"`` when the outputs are probabilities.

    Yields
    ------
    FrontierRow
        One per measured setting (``pareto`` is False: see :func:`frontier`). Closing the
        generator stops after the current setting. Arguments are checked when this is called,
        before the first setting runs.
    """
    run = FrontierRun.prepare(
        model,
        image,
        patch_size,
        _options(options, keywords, "iter_frontier"),
        region=region,
        repeats=repeats,
        levels=levels,
        max_exhaustive=max_exhaustive,
    )
    return run.rows()


def frontier(
    model: Any,
    image: Any,
    patch_size: int | tuple[int, int] | None = None,
    *,
    region: tuple[int, int, int, int] | None = None,
    repeats: int = 3,
    levels: Sequence[str] = LEVELS,
    max_exhaustive: int = 4,
    progress: Callable[[int, int | None, FrontierRow], None] | None = None,
    options: RunOptions | None = None,
    **keywords: Any,
) -> Frontier:
    """Measure sampling settings of ``model`` on ``image`` (see :func:`iter_frontier`).

    Parameters
    ----------
    model, image, patch_size, region, repeats, levels, max_exhaustive, options, **keywords
        As in :func:`iter_frontier`.
    progress
        Called after each setting with ``(done, total, row)``; ``total`` is
        :func:`frontier_size` (None for a greedy search).

    Returns
    -------
    Frontier
        The rows fastest first, with their Pareto flags.
    """
    run = FrontierRun.prepare(
        model,
        image,
        patch_size,
        _options(options, keywords, "frontier"),
        region=region,
        repeats=repeats,
        levels=levels,
        max_exhaustive=max_exhaustive,
    )
    rows: list[FrontierRow] = []
    for row in run.rows():
        rows.append(row)
        if progress is not None:
            progress(len(rows), run.size, row)
    height, width = run.image.shape[-2:]
    return Frontier.from_rows(
        rows,
        layers=tuple("+".join(group) for group in run.groups),
        image_shape=(int(height), int(width)),
        device=str(run.device),
        search=run.search,
    )


def _options(options: RunOptions | None, keywords: dict[str, Any], caller: str) -> RunOptions:
    base = options if options is not None else _DEFAULTS
    return RunOptions.merge(base, used=FRONTIER_OPTIONS, caller=caller, **keywords)
