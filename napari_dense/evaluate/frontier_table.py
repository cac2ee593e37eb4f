"""The measured frontier: one :class:`FrontierRow` per sampling setting, and the
:class:`Frontier` of all of them (Pareto front, the fastest within an error budget, a table)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from napari_dense.convert.plan import SAMPLINGS, _fmt_count
from napari_dense.errors import InputError

if TYPE_CHECKING:  # matplotlib is imported only when plotting
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["LETTERS", "LEVELS", "METRICS", "Frontier", "FrontierRow"]

#: Per-layer sampling values, cheapest first.
LEVELS: tuple[str, ...] = SAMPLINGS
#: Error measures :meth:`Frontier.pick` accepts (all measured against advanced).
METRICS: tuple[str, ...] = ("class_change", "mean_abs_diff", "p99_abs_diff")
#: The letter of each level in a row's label.
LETTERS = {"none": "N", "checkered": "C", "all": "A"}


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
        from napari_dense.evaluate.frontier_plot import plot_frontier

        return plot_frontier(self, path, ax=ax, picked=picked)


def _dominated(row: FrontierRow, rows: Sequence[FrontierRow]) -> bool:
    """Whether another row is at least as fast and as accurate, and strictly better in one."""
    return any(
        other.seconds <= row.seconds
        and other.class_change <= row.class_change
        and (other.seconds < row.seconds or other.class_change < row.class_change)
        for other in rows
    )


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise InputError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
