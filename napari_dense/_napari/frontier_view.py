"""The Compare panel's "Frontier" view: what each per-layer sampling costs and how wrong it is.

:func:`napari_dense.evaluate.frontier.iter_frontier` runs in a napari thread worker on the field
of view (or the whole image), one sampling setting per yield: the table fills in as settings are
measured and Cancel stops after the current one. Then the plot (time against class change, the
Pareto front), the cheapest setting within an error budget, and "Use this setting", which copies
the selected row into the Dense inference widget's layer switches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import napari
import numpy as np
from magicgui.widgets import (
    Container,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    RadioButtons,
    SpinBox,
)
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QSizePolicy

from napari_dense._napari.layers import image_data as _image_data
from napari_dense._napari.layers import visible_box as _visible_box
from napari_dense._napari.table import headers, read_only_table, set_rows
from napari_dense._napari.widget import dense_widget_of
from napari_dense._napari.workers import reporting_errors
from napari_dense.evaluate.frontier import (
    Frontier,
    FrontierRow,
    frontier_size,
    iter_frontier,
    layer_groups,
)
from napari_dense.run.device import resolve_device

__all__ = ["FrontierView"]

COLUMNS = (
    "setting",
    "exact px",  # fraction of pixels computed exactly (the rest interpolated)
    "time s",
    "speedup",  # over advanced
    "Δ class",  # pixels whose class differs from advanced
    "p99 |Δp|",
    "Pareto",
)
TABLE_ROWS_SHOWN = 10  # the table grows to this many rows, then scrolls
DEFAULT_BUDGET_PERCENT = 1.0
MAX_EXHAUSTIVE = 4  # layer groups searched exhaustively (3**4 = 81 settings); greedy beyond


class FrontierView(Container):
    """Measure the sampling settings of the Dense inference widget's model on the image.

    Parameters
    ----------
    viewer
        The viewer whose Dense inference widget provides the image layer, model, normalisation
        and device, and receives the chosen setting.
    region
        The Compare panel's region choice (``"field of view"`` or ``"whole image"``), shared
        so that both views measure the same pixels.
    """

    def __init__(self, viewer: napari.viewer.Viewer, region: RadioButtons):
        # Scrollable: the plot and table would otherwise make the dock (and napari's window)
        # taller than a laptop screen.
        super().__init__(scrollable=True, labels=False)
        self._viewer = viewer
        self._region = region
        self._compute_button = PushButton(text="Compute frontier")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._repeats = SpinBox(
            label="timed runs",
            value=3,
            min=1,
            max=9,
            tooltip="runs per setting; the median time is kept (one more run warms up)",
        )
        self._bar = ProgressBar(value=0, min=0, max=1)
        self._status = _wrapping(Label(value=""))
        self._figure = Figure(figsize=(4.2, 2.6), layout="constrained")
        self._canvas = FigureCanvasQTAgg(self._figure)
        self._canvas.setMinimumHeight(220)
        # As wide as the dock gives (the figure's 4.2 in would widen it and clip the legend).
        self._canvas.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self._axes = self._figure.add_subplot()
        self._axes.set_axis_off()
        plot = _holding(self._canvas)
        self._budget = FloatSpinBox(
            value=DEFAULT_BUDGET_PERCENT,
            min=0.0,
            max=100.0,
            step=0.1,
            tooltip="the error budget: the cheapest setting within it is selected",
        )
        self._budget.native.setSuffix(" %")
        self._budget.max_width = 110
        # A plain table (napari_dense._napari.table): magicgui's Table re-formats numbers.
        self._table = table = read_only_table(
            COLUMNS,
            (
                "one letter per layer group (N none, C checkered, A all)",
                "pixels computed exactly; the others are interpolated",
                "median time on the region",
                "advanced's time / this setting's time",
                "pixels whose class differs from advanced",
                "99th percentile of |p - p_advanced| over pixels and classes",
                "no other setting is both faster and more accurate",
            ),
        )
        self._picked = _wrapping(Label(value=""))
        self._use_button = PushButton(text="Use this setting", enabled=False)
        self.extend(
            [
                Container(
                    widgets=[self._compute_button, self._cancel_button, self._repeats],
                    layout="horizontal",
                ),
                self._bar,
                self._status,
                plot,
                _row(
                    Label(value="at most"),
                    self._budget,
                    _tip(Label(value="of pixels may change class"), "compared with advanced"),
                ),
                _holding(table),
                self._picked,
                self._use_button,
            ]
        )
        self._compute_button.changed.connect(self.run)
        self._cancel_button.changed.connect(self.cancel)
        self._budget.changed.connect(self._pick_within_budget)
        self._use_button.changed.connect(self.use_selected)
        table.itemSelectionChanged.connect(self._on_selection)

        #: The last completed frontier (None before the first, or after a cancel).
        self.frontier: Frontier | None = None
        self._rows: list[FrontierRow] = []  # in table order
        self._worker: GeneratorWorker | None = None
        self._total: int | None = None
        self._show_rows()  # the empty table at its height

    # -- computing -----------------------------------------------------------------------------

    def run(self, _: Any = None) -> GeneratorWorker | None:
        """Measure every setting in a worker thread; returns the worker (tests wait on it)."""
        dense = dense_widget_of(self._viewer)
        inputs = dense.run_inputs()
        if inputs is None:
            return None
        layer, loaded, normalisation = inputs
        image = _image_data(layer)
        shape = np.shape(image)
        height, width = (shape[-3], shape[-2]) if layer.rgb else (shape[-2], shape[-1])
        box = (0, height, 0, width)
        if self._region.value == "field of view":
            box = _visible_box(layer, height, width)
        module, patch = loaded.module, loaded.metadata.patch_size
        options = dense.run_options(layer, loaded, normalisation)
        device = dense.device()
        try:
            groups = layer_groups(module, patch)
            self._total = frontier_size(module, patch, max_exhaustive=MAX_EXHAUSTIVE)
        except Exception as err:  # conversion errors name their fix
            show_error(f"napari-dense: {err}")
            return None
        measuring = _measure(
            # Called in the worker: iter_frontier reads the region and checks its arguments
            # before the first row, which must not hold up the GUI.
            lambda: iter_frontier(
                module,
                image,
                patch,
                region=box,
                options=options,
                repeats=self._repeats.value,
                max_exhaustive=MAX_EXHAUSTIVE,
            ),
            lambda rows: _assemble(rows, groups, box, device),
        )
        worker = create_worker(
            reporting_errors,
            measuring,
            _start_thread=False,
            _ignore_errors=True,  # shown as a notification below, not raised in the event loop
        )
        assert isinstance(worker, GeneratorWorker)
        self.frontier, self._rows = None, []
        self._show_rows()
        self._draw()
        self._picked.value = ""
        self._use_button.enabled = False
        # A greedy search's length is unknown: the bar shows "busy" (max 0) instead.
        self._bar.max, self._bar.value = self._total or 0, 0
        where = "the field of view" if self._region.value == "field of view" else "the image"
        self._status.value = (
            f"measuring on {where} ({box[1] - box[0]}x{box[3] - box[2]} px); "
            f"letters = layer groups {', '.join('+'.join(g) for g in groups)}"
        )
        worker.yielded.connect(self._on_row)
        worker.returned.connect(self._on_done)
        worker.errored.connect(lambda err: show_error(f"napari-dense: {err}"))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_running(True)
        worker.start()
        return worker

    def cancel(self, _: Any = None) -> None:
        """Stop after the current setting; the rows measured so far stay in the table."""
        if self._worker is not None:
            self._worker.quit()
            self._status.value = "cancelling after the current setting…"

    def _on_row(self, row: FrontierRow) -> None:
        self._rows.append(row)
        self._bar.value = len(self._rows)
        total = f"/{self._total}" if self._total else ""
        self._status.value = (
            f"setting {len(self._rows)}{total}: {row.label or 'A'} · {row.seconds:.3f} s · "
            f"{row.class_change:.2%} of pixels change class"
        )
        self._show_rows()

    def _on_done(self, frontier: Frontier) -> None:
        self.frontier = frontier
        self._rows = list(frontier.rows)
        height, width = frontier.image_shape
        self._status.value = (
            f"{len(frontier.rows)} settings ({frontier.search} search) on {height}x{width} px; "
            f"letters: layers {', '.join(frontier.layers) or '-'} (N none, C checkered, A all)"
        )
        self._show_rows()
        self._pick_within_budget()

    def _on_finished(self) -> None:
        worker = self._worker
        if worker is not None and worker.abort_requested:
            self._status.value = (
                f"cancelled after {len(self._rows)} settings (rows kept; no front or pick)"
            )
        self._worker = None
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self._compute_button.enabled = not running
        self._cancel_button.enabled = running

    # -- showing and choosing ------------------------------------------------------------------

    def _show_rows(self) -> None:
        frontier = self.frontier
        advanced = next((row for row in self._rows if row.is_advanced), None)
        data = []
        for row in self._rows:
            speedup = (
                frontier.speedup(row)
                if frontier is not None
                else advanced.seconds / row.seconds
                if advanced is not None and row.seconds > 0
                else math.nan
            )
            data.append(
                [
                    row.label or "A",
                    f"{row.density:.0%}" if row.density >= 0.1 else f"{row.density:.1%}",
                    f"{row.seconds:.3f}",
                    f"{speedup:.2f}x" if math.isfinite(speedup) else "–",
                    f"{row.class_change:.2%}",
                    f"{row.p99_abs_diff:.3f}",
                    "●" if row.pareto else "",
                ]
            )
        table = self._table
        with _signals_blocked(table):  # refilling is no selection by the user
            set_rows(table, data)
        # Every row visible up to TABLE_ROWS_SHOWN: the view scrolls, not the table inside it.
        shown = min(max(len(data), 4), TABLE_ROWS_SHOWN)
        header, row_header = headers(table)
        row_height = table.rowHeight(0) if data else row_header.defaultSectionSize()
        table.setMinimumHeight(header.sizeHint().height() + shown * row_height + 4)

    def _pick_within_budget(self, _: Any = None) -> None:
        if self.frontier is None:
            return
        row = self.frontier.pick(self._budget.value / 100)
        self._table.selectRow(self._rows.index(row))  # -> _on_selection

    def selected_row(self) -> FrontierRow | None:
        """The row selected in the table (the budget's pick unless the user chose another)."""
        if self.frontier is None:
            return None
        selection = self._table.selectionModel()
        selected = selection.selectedRows() if selection is not None else []
        return self._rows[selected[0].row()] if selected else None

    def _on_selection(self) -> None:
        row = self.selected_row()
        self._use_button.enabled = row is not None
        self._draw(row)
        if row is None or self.frontier is None:
            self._picked.value = ""
            return
        cheapest = row == self.frontier.pick(self._budget.value / 100)
        self._picked.value = (
            f"{'cheapest within the budget' if cheapest else 'selected'}: "
            f"<b>{row.label or 'A'}</b>, {self.frontier.speedup(row):.2f}x faster than advanced, "
            f"{row.class_change:.2%} of pixels change class"
        )

    def _draw(self, picked: FrontierRow | None = None) -> None:
        self._axes.clear()
        if self.frontier is None:
            self._axes.set_axis_off()
        else:
            self._axes.set_axis_on()
            self.frontier.plot(ax=self._axes, picked=picked)
        self._canvas.draw_idle()

    def use_selected(self, _: Any = None) -> FrontierRow | None:
        """Set the Dense inference widget's layer switches to the selected row's sampling."""
        row = self.selected_row()
        if row is None:
            return None
        try:
            dense_widget_of(self._viewer).apply_sampling(row.sampling)
        except ValueError as err:  # another model was loaded since
            show_error(f"napari-dense: {err}; compute the frontier again")
            return None
        show_info(f"napari-dense: Dense inference now samples {row.label or 'A'}")
        return row


def _holding(widget: Any) -> Container:
    """A magicgui container holding one Qt widget (the plot canvas, the table)."""
    holder: Container = Container(labels=False)
    holder.margins = (0, 0, 0, 0)
    holder.native.layout().addWidget(widget)
    return holder


def _wrapping(label: Label) -> Label:
    """A label whose long lines wrap at the dock's width instead of widening the dock."""
    label.native.setWordWrap(True)
    label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    return label


def _tip(widget: Any, text: str) -> Any:
    """``widget`` with a tooltip."""
    widget.tooltip = text
    return widget


def _row(*widgets: Any) -> Container:
    """Widgets side by side, packed to the left."""
    row = Container(widgets=widgets, layout="horizontal", labels=False)
    row.margins = (0, 0, 0, 0)
    row.native.layout().addStretch()
    return row


@contextmanager
def _signals_blocked(widget: Any) -> Iterator[None]:
    blocked = widget.blockSignals(True)
    try:
        yield
    finally:
        widget.blockSignals(blocked)


def _measure(
    start: Callable[[], Iterator[FrontierRow]],
    assemble: Callable[[Sequence[FrontierRow]], Frontier],
) -> Generator[FrontierRow, None, Frontier]:
    """Pass the rows on one by one (progress, cancel), then return them as a Frontier."""
    measured = []
    rows: Iterator[FrontierRow] = iter(())
    try:
        rows = start()
        for row in rows:
            measured.append(row)
            yield row
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # on cancel: iter_frontier stops before the next setting
    return assemble(measured)


def _assemble(
    rows: Sequence[FrontierRow],
    groups: Sequence[Sequence[str]],
    box: tuple[int, int, int, int],
    device: str,
) -> Frontier:
    """The Frontier that :func:`~napari_dense.evaluate.frontier.frontier` gives for these rows."""
    return Frontier.from_rows(
        rows,
        layers=tuple("+".join(group) for group in groups),
        image_shape=(box[1] - box[0], box[3] - box[2]),
        device=str(resolve_device(device)),
        search="exhaustive" if len(groups) <= MAX_EXHAUSTIVE else "greedy",
    )
