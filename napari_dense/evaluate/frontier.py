"""The speed/accuracy frontier of per-layer sampling: which layers are worth densifying.

Every striding layer can be kept strided (``"none"``: cheap, interpolated between samples),
sampled at half its phases (``"checkered"``) or densified (``"all"``: exact everywhere).
:func:`frontier` measures settings of these on one image region — time, memory and the error
against advanced (every layer ``"all"``) — and :meth:`Frontier.pick` returns the fastest setting
within an error budget.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from napari_dense.convert import densify, explain
from napari_dense.convert.plan import SAMPLINGS, _fmt_count
from napari_dense.errors import InputError
from napari_dense.io.image import _guess_channel_axis, as_batch, normalise
from napari_dense.run._memory import PeakMemory
from napari_dense.run.device import resolve_device
from napari_dense.run.predict import predict

if TYPE_CHECKING:  # matplotlib is imported only when plotting
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "LEVELS",
    "METRICS",
    "Frontier",
    "FrontierRow",
    "frontier",
    "frontier_size",
    "iter_frontier",
    "layer_groups",
]

#: Per-layer sampling values, cheapest first.
LEVELS: tuple[str, ...] = SAMPLINGS
#: Error measures :meth:`Frontier.pick` accepts (all measured against advanced).
METRICS: tuple[str, ...] = ("class_change", "mean_abs_diff", "p99_abs_diff")
_LETTERS = {"none": "N", "checkered": "C", "all": "A"}
_ACTIVATIONS = ("softmax", "sigmoid", None)


@dataclass(frozen=True)
class FrontierRow:
    """One evaluated sampling setting.

    Attributes
    ----------
    sampling
        Every striding layer name -> ``"none" | "checkered" | "all"`` (a :func:`densify`
        sampling mapping).
    label
        One letter per layer group in plan order, ``N`` / ``C`` / ``A``, space separated.
    density
        Fraction of output pixels computed exactly (1.0 for advanced).
    macs_per_pixel, bytes_per_megapixel
        The plan's multiply-adds per pixel and estimated peak activation bytes per megapixel.
    seconds
        Median wall time of ``repeats`` runs of :func:`napari_dense.predict` on the region.
    peak_bytes
        Peak memory of one run: host RSS rise on CPU, allocated device memory on CUDA.
    mean_abs_diff, p99_abs_diff
        Mean and 99th percentile of ``|p - p_advanced|`` over pixels and classes (probabilities).
    class_change
        Fraction of pixels whose arg-max class differs from advanced.
    pareto
        On the Pareto front of ``(seconds, class_change)`` among the rows of its
        :class:`Frontier` (always False on rows yielded by :func:`iter_frontier`: the front is
        known only once every row is).
    """

    sampling: dict[str, str]
    label: str
    density: float
    macs_per_pixel: float
    bytes_per_megapixel: float
    seconds: float
    peak_bytes: int
    mean_abs_diff: float
    p99_abs_diff: float
    class_change: float
    pareto: bool = False

    @property
    def is_advanced(self) -> bool:
        """Whether every layer is densified (the reference)."""
        return all(value == "all" for value in self.sampling.values())


@dataclass(frozen=True)
class Frontier:
    """Measured sampling settings of one model on one image region.

    Attributes
    ----------
    rows
        Every evaluated setting, fastest first.
    layers
        The layer groups in plan order (the letters of ``label`` refer to these); layers that
        must share a sampling form one group named ``"a+b"``.
    image_shape
        ``(H, W)`` of the region evaluated.
    device
        Where it ran.
    search
        ``"exhaustive"`` (every combination of levels) or ``"greedy"`` (see :func:`iter_frontier`).
    """

    rows: tuple[FrontierRow, ...]
    layers: tuple[str, ...]
    image_shape: tuple[int, int]
    device: str
    search: str

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[FrontierRow],
        *,
        layers: Sequence[str],
        image_shape: tuple[int, int],
        device: str,
        search: str,
    ) -> Frontier:
        """The frontier of measured rows (from :func:`iter_frontier`): Pareto flags set, rows
        sorted fastest first."""
        marked = [replace(row, pareto=not _dominated(row, rows)) for row in rows]
        return cls(
            rows=tuple(sorted(marked, key=lambda row: row.seconds)),
            layers=tuple(layers),
            image_shape=image_shape,
            device=device,
            search=search,
        )

    @property
    def advanced(self) -> FrontierRow:
        """The all-``"all"`` row: the reference every error is measured against."""
        return next(row for row in self.rows if row.is_advanced)

    def pick(self, error_budget: float, metric: str = "class_change") -> FrontierRow:
        """The fastest row whose ``metric`` is at most ``error_budget``.

        Parameters
        ----------
        error_budget
            The largest error accepted, in the metric's unit: a fraction of pixels for
            ``"class_change"`` (0.01 = 1 %), a probability for the others.
        metric
            ``"class_change"``, ``"mean_abs_diff"`` or ``"p99_abs_diff"``.

        Returns
        -------
        FrontierRow
            Advanced always qualifies (its error is zero), so there is always an answer.
        """
        _check_metric(metric)
        if not error_budget >= 0:  # also refuses NaN
            raise InputError(f"error_budget must be a number >= 0, got {error_budget!r}")
        qualifying = [row for row in self.rows if getattr(row, metric) <= error_budget]
        return min([*qualifying, self.advanced], key=lambda row: row.seconds)

    def speedup(self, row: FrontierRow) -> float:
        """``advanced.seconds / row.seconds``: how much faster ``row`` is than advanced."""
        return self.advanced.seconds / row.seconds if row.seconds > 0 else math.inf

    def pareto_front(self) -> tuple[FrontierRow, ...]:
        """The rows on the Pareto front of ``(seconds, class_change)``, fastest first."""
        return tuple(row for row in self.rows if row.pareto)

    def to_markdown(self) -> str:
        """The rows as a markdown table, fastest first (Pareto rows marked)."""
        lines = [
            f"Layer groups (one letter each, N = none, C = checkered, A = all): "
            f"{', '.join(self.layers) or '(none)'}",
            "",
            "| setting | exact px | MAC/px | est. MB/Mpx | time (s) | speedup | peak MiB "
            "| mean \\|Δp\\| | p99 \\|Δp\\| | class change | Pareto |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
        ]
        for row in self.rows:
            lines.append(
                f"| {row.label or 'A'} | {row.density:.0%} | {_fmt_count(row.macs_per_pixel)} | "
                f"{row.bytes_per_megapixel / 1e6:.1f} | {row.seconds:.4f} | "
                f"{self.speedup(row):.2f}x | {row.peak_bytes / 2**20:.0f} | "
                f"{row.mean_abs_diff:.2e} | {row.p99_abs_diff:.2e} | {row.class_change:.2%} | "
                f"{'*' if row.pareto else ''} |"
            )
        lines.append("")
        height, width = self.image_shape
        lines.append(
            f"{len(self.rows)} settings ({self.search} search) on {height}x{width} px, "
            f"{self.device}; errors against advanced (A for every group)."
        )
        return "\n".join(lines)

    def plot(
        self,
        path: str | Path | None = None,
        *,
        ax: Axes | None = None,
        picked: FrontierRow | None = None,
    ) -> Figure:
        """Time against class change of every row, the Pareto front as a line.

        Parameters
        ----------
        path
            Where to save the figure as PNG (not saved when None).
        ax
            Matplotlib axes to draw into (a new figure when None; Agg canvas, no display
            needed).
        picked
            A row to highlight, e.g. the result of :meth:`pick`.

        Returns
        -------
        matplotlib.figure.Figure
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if ax is None:
            figure = Figure(figsize=(6.4, 4.8), layout="constrained")
            FigureCanvasAgg(figure)  # attaches itself: savefig needs no pyplot or display
            ax = figure.add_subplot()
        else:  # the top-level figure of the given axes (they may sit in a subfigure)
            parent = ax.figure
            figure = parent if isinstance(parent, Figure) else parent.figure
        change = [100 * row.class_change for row in self.rows]
        seconds = [row.seconds for row in self.rows]
        ax.scatter(change, seconds, s=18, color="0.55", zorder=2, label="setting")
        front = sorted(self.pareto_front(), key=lambda row: (row.class_change, row.seconds))
        ax.plot(
            [100 * row.class_change for row in front],
            [row.seconds for row in front],
            "-o",
            color="tab:blue",
            markersize=4,
            zorder=3,
            label="Pareto front",
        )
        for row, x, y in zip(self.rows, change, seconds, strict=True):
            ax.annotate(
                row.label or "A",
                (x, y),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=7,
                color="0.25",
            )
        if picked is not None:
            ax.scatter(
                [100 * picked.class_change],
                [picked.seconds],
                s=120,
                facecolors="none",
                edgecolors="tab:red",
                linewidths=2,
                zorder=4,
                label=f"picked ({picked.label or 'A'}, {self.speedup(picked):.2f}x)",
            )
        ax.set_xlabel("pixels whose class changes vs advanced (%)")
        ax.set_ylabel("time (s)")
        height, width = self.image_shape
        ax.set_title(
            f"{height}x{width} px on {self.device}; groups: {', '.join(self.layers) or '-'}",
            fontsize=9,
        )
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
        if path is not None:
            figure.savefig(path, format="png", dpi=120)
        return figure


def layer_groups(model: Any, patch_size: int | tuple[int, int] | None = None) -> list[list[str]]:
    """The striding layers of ``model`` grouped by what must share a sampling, in plan order."""
    module, patch, _ = _unwrap(model, patch_size, None)
    return _groups(explain(module, patch).layers)


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
    return _size(len(_check_levels(levels)), len(layer_groups(model, patch_size)), max_exhaustive)


def _size(levels: int, groups: int, max_exhaustive: int) -> int | None:
    if groups <= max_exhaustive or levels == 1:
        return levels**groups
    # Greedy: advanced, the start, then one row per non-top group per step (the last step's
    # only candidate is advanced, not measured twice). With two levels every path is as long.
    return 1 + groups * (groups + 1) // 2 if levels == 2 else None


def iter_frontier(
    model: Any,
    image: Any,
    patch_size: int | tuple[int, int] | None = None,
    *,
    region: tuple[int, int, int, int] | None = None,
    channel_axis: int | None = None,
    normalisation: Mapping[str, Any] | None = None,
    activation: str | None = "softmax",
    device: str | torch.device = "auto",
    border: str = "reflect",
    repeats: int = 3,
    levels: Sequence[str] = LEVELS,
    max_exhaustive: int = 4,
    non_finite: str = "refuse",
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
    channel_axis, border
        As in :func:`napari_dense.predict`.
    normalisation
        ``{"scale", "mean", "std"}`` as in the model's metadata: applied before the network.
    activation
        Turns the network's outputs into the probabilities that are compared: ``"softmax"``
        over classes, ``"sigmoid"``, or None (``"none"``) when the outputs are probabilities.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    repeats
        Timed runs per setting (median); one more, untimed, warms up and measures memory.
    levels
        The samplings tried per group, a subset of :data:`LEVELS` that includes ``"all"``.
    max_exhaustive
        The most groups searched exhaustively.
    non_finite
        NaN/infinite pixels: ``"refuse"`` or ``"zero"`` (:mod:`napari_dense.io.input_checks`).

    Yields
    ------
    FrontierRow
        One per measured setting (``pareto`` is False: see :func:`frontier`). Closing the
        generator stops after the current setting. Arguments are checked when this is called,
        before the first setting runs.
    """
    run = _Run.prepare(
        model, image, patch_size, region=region, channel_axis=channel_axis,
        normalisation=normalisation, activation=activation, device=device, border=border,
        repeats=repeats, levels=levels, max_exhaustive=max_exhaustive, non_finite=non_finite,
    )  # fmt: skip
    return run.rows()


def frontier(
    model: Any,
    image: Any,
    patch_size: int | tuple[int, int] | None = None,
    *,
    region: tuple[int, int, int, int] | None = None,
    channel_axis: int | None = None,
    normalisation: Mapping[str, Any] | None = None,
    activation: str | None = "softmax",
    device: str | torch.device = "auto",
    border: str = "reflect",
    repeats: int = 3,
    levels: Sequence[str] = LEVELS,
    max_exhaustive: int = 4,
    progress: Callable[[int, int | None, FrontierRow], None] | None = None,
    non_finite: str = "refuse",
) -> Frontier:
    """Measure sampling settings of ``model`` on ``image`` (see :func:`iter_frontier`).

    Parameters
    ----------
    model, image, patch_size, region, channel_axis, normalisation, activation, device, border, \
repeats, levels, max_exhaustive, non_finite
        As in :func:`iter_frontier`.
    progress
        Called after each setting with ``(done, total, row)``; ``total`` is
        :func:`frontier_size` (None for a greedy search).

    Returns
    -------
    Frontier
        The rows fastest first, with their Pareto flags.
    """
    run = _Run.prepare(
        model, image, patch_size, region=region, channel_axis=channel_axis,
        normalisation=normalisation, activation=activation, device=device, border=border,
        repeats=repeats, levels=levels, max_exhaustive=max_exhaustive, non_finite=non_finite,
    )  # fmt: skip
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


@dataclass
class _Run:
    """What every setting of one frontier shares: the model, its layer groups, the region."""

    module: Any
    patch: int | tuple[int, int]
    groups: list[list[str]]
    image: np.ndarray  # (C, H, W), normalised
    device: torch.device
    activation: str | None
    border: str
    repeats: int
    levels: tuple[str, ...]
    max_exhaustive: int

    @classmethod
    def prepare(
        cls,
        model: Any,
        image: Any,
        patch_size: int | tuple[int, int] | None,
        *,
        region: tuple[int, int, int, int] | None,
        channel_axis: int | None,
        normalisation: Mapping[str, Any] | None,
        activation: str | None,
        device: str | torch.device,
        border: str,
        repeats: int,
        levels: Sequence[str],
        max_exhaustive: int,
        non_finite: str = "refuse",
    ) -> _Run:
        checked_levels = _check_levels(levels)
        if activation == "none":
            activation = None
        if activation not in _ACTIVATIONS:
            raise InputError(f"activation must be 'softmax', 'sigmoid' or None, got {activation!r}")
        if repeats < 1:
            raise InputError(f"repeats must be at least 1, got {repeats}")
        module, patch, normalisation = _unwrap(model, patch_size, normalisation)
        plan = explain(module, patch)
        if not plan.exact:
            warnings.warn(
                "the dense network is not exact: "
                + "; ".join(plan.inexact_reasons)
                + ". The frontier's errors are against advanced, which itself deviates from "
                "per-patch evaluation (napari_dense.evaluate.compare measures by how much).",
                stacklevel=3,
            )
        batch = as_batch(
            _crop(image, region, channel_axis, plan.in_channels),
            channel_axis=channel_axis,
            channels=plan.in_channels,
            non_finite=non_finite,
        )
        return cls(
            module=module,
            patch=patch,
            groups=_groups(plan.layers),
            image=normalise(batch[0], normalisation),
            device=resolve_device(device),
            activation=activation,
            border=border,
            repeats=repeats,
            levels=checked_levels,
            max_exhaustive=max_exhaustive,
        )

    @property
    def search(self) -> str:
        return "exhaustive" if len(self.groups) <= self.max_exhaustive else "greedy"

    @property
    def size(self) -> int | None:
        """Rows :meth:`rows` yields (None where it depends on the greedy path)."""
        return _size(len(self.levels), len(self.groups), self.max_exhaustive)

    def rows(self) -> Iterator[FrontierRow]:
        """Advanced first, then the exhaustive product or the greedy path."""
        levels, top = self.levels, len(self.levels) - 1
        advanced_choice = (levels[top],) * len(self.groups)
        advanced, reference = self.measure(advanced_choice, None)
        yield advanced
        if self.search == "exhaustive" or top == 0:
            for choice in itertools.product(levels, repeat=len(self.groups)):
                if choice != advanced_choice:
                    yield self.measure(choice, reference)[0]
            return
        # Greedy: a path from the cheapest setting to advanced, one group one level at a time.
        state = (0,) * len(self.groups)
        current = self.measure(tuple(levels[i] for i in state), reference)[0]
        yield current
        while any(i < top for i in state):
            candidates = []
            for g in range(len(self.groups)):
                if state[g] < top:
                    upgraded = (*state[:g], state[g] + 1, *state[g + 1 :])
                    choice = tuple(levels[i] for i in upgraded)
                    if choice == advanced_choice:
                        row = advanced  # measured first; not measured (nor yielded) twice
                    else:
                        row = self.measure(choice, reference)[0]
                        yield row
                    candidates.append((upgraded, row))
            state, current = max(candidates, key=lambda c: _gain(current, c[1]))

    def measure(
        self, choice: tuple[str, ...], reference: np.ndarray | None
    ) -> tuple[FrontierRow, np.ndarray]:
        """One setting's row and probabilities; errors against ``reference`` (None: itself)."""
        sampling = {name: level for group, level in zip(self.groups, choice, strict=True)
                    for name in group}  # fmt: skip
        with warnings.catch_warnings():  # said once, in prepare(), not once per setting
            warnings.filterwarnings("ignore", message="the dense network is not exact")
            dense = densify(self.module, self.patch, sampling=sampling)

        def run() -> np.ndarray:
            return predict(self.image, dense, channel_axis=0, border=self.border,
                           device=self.device, activation=self.activation)  # fmt: skip

        # The first run warms up (kernel selection, allocator) and measures memory, untimed.
        with PeakMemory(self.device) as memory:
            probabilities = run()  # activated by predict, as the engine does
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            run()  # returns a numpy array: the device has finished
            times.append(time.perf_counter() - start)
        if reference is None:
            reference = probabilities
        diff = np.abs(probabilities - reference)
        changed = probabilities.argmax(0) != reference.argmax(0)
        row = FrontierRow(
            sampling=sampling,
            label=" ".join(_LETTERS[level] for level in choice),
            density=float(dense.plan.density),
            macs_per_pixel=float(dense.plan.macs_per_pixel),
            bytes_per_megapixel=float(dense.plan.bytes_per_megapixel),
            seconds=statistics.median(times),
            peak_bytes=memory.device_bytes if self.device.type == "cuda" else memory.host_bytes,
            mean_abs_diff=float(diff.mean()),
            p99_abs_diff=float(np.percentile(diff, 99)),
            class_change=float(changed.mean()),
        )
        return row, probabilities


def _gain(current: FrontierRow, candidate: FrontierRow) -> tuple[float, float]:
    """Error removed per multiply-add per pixel added: (class change, mean |Δp|)."""
    added = max(candidate.macs_per_pixel - current.macs_per_pixel, 1e-9)
    return (
        (current.class_change - candidate.class_change) / added,
        (current.mean_abs_diff - candidate.mean_abs_diff) / added,
    )


def _dominated(row: FrontierRow, rows: Sequence[FrontierRow]) -> bool:
    """Whether another row is at least as fast and as accurate, and strictly better in one."""
    return any(
        other.seconds <= row.seconds
        and other.class_change <= row.class_change
        and (other.seconds < row.seconds or other.class_change < row.class_change)
        for other in rows
    )


def _groups(layers: Sequence[Any]) -> list[list[str]]:
    """Each layer with the layers tied to it, in plan order, each layer in one group."""
    order = {layer.name: number for number, layer in enumerate(layers)}
    groups: list[list[str]] = []
    seen: set[str] = set()
    for layer in layers:
        if layer.name in seen:
            continue
        group = sorted({layer.name, *layer.tied_with}, key=lambda name: order.get(name, 0))
        seen.update(group)
        groups.append(group)
    return groups


def _unwrap(
    model: Any,
    patch_size: int | tuple[int, int] | None,
    normalisation: Mapping[str, Any] | None,
) -> tuple[Any, int | tuple[int, int], Mapping[str, Any] | None]:
    """(module, patch size, normalisation), from a loaded model file's metadata where missing."""
    metadata = getattr(model, "metadata", None)
    if metadata is not None:  # a LoadedClassifier
        patch_size = patch_size or metadata.patch_size
        normalisation = normalisation if normalisation is not None else metadata.normalisation
        model = model.module
    if patch_size is None:
        raise InputError("patch_size is required to convert a patch classifier")
    return model, patch_size, normalisation


def _crop(
    image: Any, region: tuple[int, int, int, int] | None, channel_axis: int | None, channels: int
) -> Any:
    """The region of ``image`` (its spatial axes), read from lazy arrays without the rest."""
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    if region is None:
        return image
    ndim = len(np.shape(image))
    if ndim not in (2, 3):
        return image  # as_batch names the problem
    spatial = [0, 1]
    if ndim == 3:
        axis = channel_axis if channel_axis is not None else _guess_channel_axis(image, channels)
        spatial = [a for a in range(3) if a != axis % 3]
    shape = np.shape(image)
    try:
        y0, y1, x0, x1 = (int(v) for v in region)
    except (TypeError, ValueError):
        raise InputError(f"region must be (y0, y1, x0, x1), got {region!r}") from None
    height, width = shape[spatial[0]], shape[spatial[1]]
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise InputError(
            f"region {region} is empty or outside the image ({height}x{width}); "
            "give 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width"
        )
    index: list[slice] = [slice(None)] * ndim
    index[spatial[0]], index[spatial[1]] = slice(y0, y1), slice(x0, x1)
    return image[tuple(index)]


def _check_levels(levels: Sequence[str]) -> tuple[str, ...]:
    """``levels`` in :data:`LEVELS` order; it must include ``"all"`` (the reference)."""
    unknown = [level for level in levels if level not in LEVELS]
    if unknown or "all" not in levels:
        raise InputError(
            f"levels must be a subset of {LEVELS} that includes 'all' (advanced, the reference "
            f"every error is measured against), got {tuple(levels)!r}"
        )
    return tuple(level for level in LEVELS if level in levels)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise InputError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
