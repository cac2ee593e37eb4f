"""The frontier as a figure: time against class change, the Pareto front as a line."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from napari_dense.evaluate.frontier_table import Frontier, FrontierRow

__all__ = ["plot_frontier"]


def plot_frontier(
    frontier: Frontier,
    path: str | Path | None = None,
    *,
    ax: Axes | None = None,
    picked: FrontierRow | None = None,
) -> Figure:
    """:meth:`Frontier.plot <napari_dense.evaluate.frontier_table.Frontier.plot>`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if ax is None:
        figure = Figure(figsize=(6.4, 4.8), layout="constrained")
        FigureCanvasAgg(figure)  # attaches itself: savefig needs no pyplot or display
        ax = figure.add_subplot()
    else:  # the top-level figure of the given axes (they may sit in a subfigure)
        parent = ax.figure
        figure = parent if isinstance(parent, Figure) else parent.figure
    change = [100 * row.class_change for row in frontier.rows]
    seconds = [row.seconds for row in frontier.rows]
    ax.scatter(change, seconds, s=18, color="0.55", zorder=2, label="setting")
    front = sorted(frontier.pareto_front(), key=lambda row: (row.class_change, row.seconds))
    ax.plot(
        [100 * row.class_change for row in front],
        [row.seconds for row in front],
        "-o",
        color="tab:blue",
        markersize=4,
        zorder=3,
        label="Pareto front",
    )
    for row, x, y in zip(frontier.rows, change, seconds, strict=True):
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
            label=f"picked ({picked.label or 'A'}, {frontier.speedup(picked):.2f}x)",
        )
    ax.set_xlabel("pixels whose class changes vs advanced (%)")
    ax.set_ylabel("time (s)")
    height, width = frontier.image_shape
    ax.set_title(
        f"{height}x{width} px on {frontier.device}; groups: {', '.join(frontier.layers) or '-'}",
        fontsize=9,
    )
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    if path is not None:
        figure.savefig(path, format="png", dpi=120)
    return figure
