"""The "Compare modes" panel: simple vs custom vs advanced on the image or the field of view.

The "Modes" tab shows time, throughput, peak memory and the difference to advanced (exact) for
each mode, the exactness check of advanced against per-patch evaluation, a |simple − advanced|
layer (where interpolation fails: object boundaries) and bars of time and memory. Copyable as
markdown. The "Frontier" tab (:mod:`napari_dense._napari.frontier_view`) measures every per-layer
sampling on the same region and picks the cheapest within an error budget.
"""

from __future__ import annotations

from typing import Any

import napari
import numpy as np
from magicgui.widgets import Container, Label, PushButton, RadioButtons, Widget
from napari.qt.threading import FunctionWorker, create_worker
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QApplication, QTabWidget

from napari_dense._napari.frontier_view import FrontierView, _holding
from napari_dense._napari.layers import image_data as _image_data
from napari_dense._napari.layers import visible_box as _visible_box
from napari_dense._napari.table import read_only_table, set_columns, set_rows
from napari_dense._napari.widget import dense_widget_of
from napari_dense.evaluate.compare import HOST_MEMORY, ModeComparison, compare_modes

__all__ = ["CompareModesWidget"]

BAR_WIDTH = 160  # pixels of the longest bar
MAX_PIXELS = 4096 * 4096  # compare_modes holds every mode's map of the region in memory


#: The table's columns (short, so that they fit the dock; the tooltips say what each is).
COLUMNS = ("mode", "stride", "time s", "Mpx/s", "host MiB", "max |Δp|", "mean |Δp|")
COLUMN_TIPS = (
    "the dense mode",
    "output stride: pixels between computed samples (the rest are interpolated)",
    "wall time on the region (conversion and self-check included)",
    "megapixels per second",
    f"{HOST_MEMORY}: the mode's peak host memory, measured as it ran",
    "largest |difference to advanced| over pixels and classes, in probabilities",
    "mean |difference to advanced| over pixels and classes, in probabilities",
)


def _sig(value: float) -> str:
    """Three significant digits (one format for every number of the panel)."""
    return "0" if value == 0 else f"{value:.3g}"


class CompareModesWidget(Container):
    """Side panel comparing the dense modes of the Dense inference widget's model."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self._viewer = viewer
        self._region = RadioButtons(
            label="region",
            choices=["field of view", "whole image"],
            value="field of view",
            orientation="horizontal",
        )
        self._run_button = PushButton(text="Compare")
        # A plain table (napari_dense._napari.table): magicgui's Table re-formats numbers.
        self._table = read_only_table(COLUMNS, COLUMN_TIPS)
        self._table.setMinimumHeight(130)  # all modes visible without scrolling
        self._exactness = Label(value="")
        self._bars = Label(value="")
        self._copy_button = PushButton(text="Copy as markdown", enabled=False)
        modes: list[Widget] = [
            self._run_button,
            _holding(self._table),
            self._exactness,
            self._bars,
            self._copy_button,
        ]
        self._modes = Container(widgets=modes)
        self._frontier = FrontierView(viewer, self._region)
        self._modes.margins = (0, 4, 0, 0)  # the tab's frame is margin enough
        self._tabs = QTabWidget()
        self._tabs.setDocumentMode(True)
        self._tabs.addTab(self._modes.native, "Modes")
        self._tabs.addTab(self._frontier.root_native_widget, "Frontier")  # its scroll area
        self.append(self._region)  # shared: both tabs measure the same pixels
        self.native.layout().addWidget(self._tabs)  # Qt's tabs inside the magicgui layout
        self._run_button.changed.connect(self.run)
        self._copy_button.changed.connect(self.copy_markdown)
        self.comparison: ModeComparison | None = None
        self._worker: FunctionWorker | None = None

    def run(self, _: Any = None) -> FunctionWorker | None:
        """Compare in a worker thread; returns the worker (tests wait on it)."""
        dense = dense_widget_of(self._viewer)
        inputs = dense.run_inputs()
        if inputs is None:
            return None
        layer, loaded, normalisation = inputs
        data = _image_data(layer)  # level 0; only the region is read
        offset = (0, 0)
        if self._region.value == "field of view":
            data, offset = _visible_region(self._viewer, layer, data)
        pixels = int(np.prod(np.shape(data)[:2] if layer.rgb else np.shape(data)[-2:]))
        if pixels > MAX_PIXELS:
            show_error(
                f"napari-dense: {pixels / 1e6:.0f} Mpx are too many to compare in memory (at most "
                f"{MAX_PIXELS / 1e6:.0f}); choose region 'field of view' and zoom in"
            )
            return None
        image = np.asarray(data)  # only the region: a lazy slide is read here, not whole
        sampling = dense.sampling()
        modes: list[Any] = ["simple"]
        if set(sampling.values()) not in ({"all"}, {"none"}, set()):  # custom: not a preset
            modes.append(sampling)
        modes.append("advanced")
        worker = create_worker(
            compare_modes,
            image,
            loaded.module,
            loaded.metadata.patch_size,
            modes=modes,
            options=dense.run_options(layer, loaded, normalisation),
            _start_thread=False,
            _ignore_errors=True,  # shown as a notification below, not raised in the event loop
        )
        worker.returned.connect(lambda result: self._show(result, layer, offset))
        worker.errored.connect(lambda err: show_error(f"napari-dense: {err}"))
        worker.finished.connect(lambda: setattr(self._run_button, "enabled", True))
        self._run_button.enabled = False
        self._worker = worker
        worker.start()
        return worker

    def _show(self, comparison: ModeComparison, layer: Any, offset: tuple[int, int]) -> None:
        self.comparison = comparison
        probabilities = comparison.delta_unit == "probabilities"
        gpu = any(r.peak_device_bytes for r in comparison.results)  # a GPU column only with one
        columns, tips = list(COLUMNS), list(COLUMN_TIPS)
        if not probabilities:
            columns[-2:] = ["max |Δs|", "mean |Δs|"]
            tips[-2:] = [tip.replace("probabilities", "raw scores") for tip in tips[-2:]]
        if gpu:
            columns.insert(5, "GPU MiB")
            tips.insert(5, "peak CUDA memory allocated")
        rows = []
        for r in comparison.results:
            cells = [
                r.mode,
                f"{r.output_stride[0]}x{r.output_stride[1]}",
                _sig(r.seconds),
                _sig(r.megapixels_per_second),
                _sig(r.peak_host_bytes / 2**20),
                _sig(r.max_abs_diff),
                _sig(r.mean_abs_diff),
            ]
            if gpu:
                cells.insert(5, _sig(r.peak_device_bytes / 2**20))
            rows.append(cells)
        set_columns(self._table, columns, tips)
        set_rows(self._table, rows)
        self._exactness.value = (
            f"advanced vs per-patch on {comparison.oracle_pixels} random pixels: "
            f"max |Δ| = {_sig(comparison.oracle_max_abs_diff)}"
            + ("" if comparison.exact else " (model not exact: padding)")
            + (
                f"\nconversion self-check: {comparison.verified.summary()}"
                if comparison.verified is not None
                else ""
            )
        )
        self._exactness.native.setWordWrap(True)
        self._bars.value = _bar_chart(comparison)
        self._copy_button.enabled = True
        if comparison.difference is not None:
            name = "|simple − advanced| (napari-dense)"
            if name in self._viewer.layers:
                self._viewer.layers.remove(name)
            self._viewer.add_image(
                comparison.difference,
                name=name,
                colormap="inferno",
                blending="translucent",
                opacity=0.5,  # added hidden, at half opacity: the overlay stays readable
                visible=False,
                metadata={"napari_dense": {"difference": "simple - advanced"}},
                scale=layer.scale[-2:],
                units=tuple(layer.units)[-2:],
                translate=np.asarray(layer.translate[-2:])
                + np.asarray(offset) * np.asarray(layer.scale[-2:]),
            )

    def copy_markdown(self, _: Any = None) -> str:
        """Copy the comparison as a markdown table to the clipboard (and return it)."""
        if self.comparison is None:
            return ""
        text = self.comparison.to_markdown()
        clipboard = QApplication.clipboard()
        if clipboard is not None:
            clipboard.setText(text)
        return text


def _visible_region(viewer: Any, layer: Any, image: Any) -> tuple[Any, tuple[int, int]]:
    """The part of ``image`` (lazy or not) in the current field of view (at least 64 px a side)."""
    height, width = image.shape[:2] if layer.rgb else image.shape[-2:]
    y0, y1, x0, x1 = _visible_box(layer, height, width)
    region = image[y0:y1, x0:x1] if layer.rgb else image[..., y0:y1, x0:x1]
    return region, (y0, x0)


def _bar_chart(comparison: ModeComparison) -> str:
    """Time and memory per mode as HTML bars (a QLabel renders them)."""
    longest = max(r.seconds for r in comparison.results) or 1.0
    biggest = max(max(r.peak_host_bytes, r.peak_device_bytes) for r in comparison.results) or 1
    rows = []
    for r in comparison.results:
        memory = max(r.peak_host_bytes, r.peak_device_bytes)
        rows.append(
            f"<tr><td>{r.mode}</td>"
            f"<td><div style='background:#5b8def;width:{int(BAR_WIDTH * r.seconds / longest)}px'>"
            f"&nbsp;</div></td><td>{_sig(r.seconds)} s</td>"
            f"<td><div style='background:#e08a3c;width:{int(BAR_WIDTH * memory / biggest)}px'>"
            f"&nbsp;</div></td><td>{_sig(memory / 2**20)} MiB</td></tr>"
        )
    return (
        "<table><tr><th></th><th colspan=2>time</th><th colspan=2>memory</th></tr>"
        + "".join(rows)
        + "</table>"
    )
