"""The viewer during whole-slide runs: event-loop gaps, first tile, memory, cancel, click-to-done.

A real napari viewer (1800 × 1150, under Xvfb when there is no display), the demo model
``ihc_patchnet``, Advanced, CPU. For the 16k mosaic and the 100k virtual slide: a 10 ms QTimer
records the gaps of the event loop from pressing Run until the run, cancelled after
``--seconds`` (25), has finished; printed are the max, p50 and p99 gap, the time from Run to
the first painted tile, RSS before Run and the peak during the run, and cancel-to-finished;
then the estimate line's figure (its probe finished before Run) next to the run's own
projection (its seconds per computed tile times the tiles of the whole run). The first slide's
class layers are added (a fresh viewer); the second slide's run reuses them, as a second run
does in the GUI. Then click-to-done on the 512² IHC image (the first click adds the class
layers, the second reuses them; done = finished and every class layer added) next to headless
:func:`napari_dense.predict_to_zarr`. The GUI's tile size is automatic: 512 px (sized for
latency, ``estimate.GUI_TILE``).

    python benchmarks/bench_gui.py [--seconds 25] [--samples ihc_mosaic ihc_virtual_slide]
    python benchmarks/bench_gui.py --samples      # click-to-done only, in its own process

Takes a few minutes. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

WINDOW = (1800, 1150)


class _NoActivity:
    """Stands in for ``napari.utils.progress`` (see ``main``)."""

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def update(self, *_: Any) -> None:
        pass

    def set_description(self, *_: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _display() -> subprocess.Popen[bytes] | None:
    """Start Xvfb when there is no display (returns the process to stop)."""
    if os.environ.get("DISPLAY"):
        return None
    display = f":{100 + os.getpid() % 800}"  # one per benchmark process
    process = subprocess.Popen(
        ["Xvfb", display, "-screen", "0", "1920x1200x24", "-nolisten", "tcp"]
    )
    os.environ["DISPLAY"] = display
    time.sleep(1.5)
    return process


def _wait(app: Any, condition: Any, timeout: float) -> float:
    """Process events until ``condition()``; returns the seconds waited."""
    start = time.perf_counter()
    while not condition() and time.perf_counter() - start < timeout:
        app.processEvents()
        time.sleep(0.002)
    return time.perf_counter() - start


class GapRecorder:
    """A 10 ms QTimer: the gaps between its ticks, and the peak RSS sampled on each tick."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        from napari_dense.run._memory import current_rss

        self._rss = current_rss
        self.ticks: list[float] = []
        self.peak = 0
        self._timer = QTimer()
        self._timer.setInterval(10)
        self._timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        self.ticks.append(time.perf_counter())
        self.peak = max(self.peak, self._rss())

    def start(self) -> None:
        self.ticks = [time.perf_counter()]
        self._timer.start()

    def stop(self) -> np.ndarray:
        self._timer.stop()
        self._tick()
        return np.diff(self.ticks) * 1000


def _estimate(app: Any, widget: Any) -> tuple[float, str]:
    """The estimate line's seconds and source ("probe", or "last run" once a run measured the
    machine) when it is calibrated (nan if it never was)."""
    _wait(app, lambda: "probing" not in widget._estimate.value, 300)
    estimate, line = widget.last_estimate, widget._estimate.value
    source = "last run" if "(last run)" in line else "probe" if "(probe)" in line else "none"
    return (float(estimate.seconds) if estimate is not None else float("nan")), source


def _large(app: Any, viewer: Any, widget: Any, key: str, seconds: float) -> dict[str, Any]:
    from napari_dense._napari import overlay as _overlay
    from napari_dense._napari.layers import is_output_layer
    from napari_dense.run._memory import current_rss, peak_rss, reset_peak_rss

    print(f"[bench_gui] {key}: opening", flush=True)
    for layer in list(viewer.layers):
        if not is_output_layer(layer):  # the previous run's class layers are reused
            viewer.layers.remove(layer)
    reused = any(is_output_layer(layer) for layer in viewer.layers)
    viewer.open_sample("napari-dense", key)
    viewer.reset_view()
    widget._preset.value = "Advanced"
    widget._device.value = "cpu"
    widget._image.value = viewer.layers[-1]
    estimated, source = _estimate(app, widget)
    _wait(app, lambda: False, 2.0)  # let the first draw settle
    painted: list[float] = []
    original = _overlay.LiveOverlay.refresh

    def recording(self: Any, force: bool = False) -> bool:
        drawn = original(self, force)
        if drawn and not painted:
            painted.append(time.perf_counter())
        return drawn

    _overlay.LiveOverlay.refresh = recording  # type: ignore[method-assign]
    try:
        rss_before = current_rss()
        reset_peak_rss()
        recorder = GapRecorder()
        recorder.start()
        print(f"[bench_gui] {key}: Run", flush=True)
        pressed = time.perf_counter()
        widget._run_button.native.click()
        _wait(app, lambda: time.perf_counter() - pressed >= seconds, seconds + 5)
        tiles = widget._tiles_done
        computed, total = widget._computed, widget._tiles_total
        per_tile = (time.perf_counter() - widget._prepared_at) / max(computed, 1)
        print(f"[bench_gui] {key}: Cancel after {tiles} tiles", flush=True)
        cancelled = time.perf_counter()
        widget._cancel_button.native.click()
        cancel_seconds = _wait(app, lambda: widget._worker is None, 120)
        gaps = recorder.stop()
    finally:
        _overlay.LiveOverlay.refresh = original  # type: ignore[method-assign]
    peak = max(recorder.peak, peak_rss())
    del cancelled
    return {
        "image": key,
        "max gap ms": float(gaps.max()),
        "p50 ms": float(np.percentile(gaps, 50)),
        "p99 ms": float(np.percentile(gaps, 99)),
        "first tile s": (painted[0] - pressed) if painted else float("nan"),
        "tiles": tiles,
        "RSS before MiB": rss_before / 2**20,
        "peak RSS MiB": peak / 2**20,
        "cancel s": cancel_seconds,
        "layers": "reused" if reused else "added",
        "estimate s": estimated,
        "estimate source": source,
        "projected s": per_tile * total,
    }


def _small(app: Any, viewer: Any, widget: Any, model: Path) -> dict[str, Any]:
    from skimage import data

    import napari_dense as nd
    from napari_dense._napari import output_dialog as _output_dialog

    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    viewer.open_sample("napari-dense", "ihc")
    _wait(app, lambda: False, 1.0)
    widget._preset.value = "Advanced"
    widget._device.value = "cpu"
    clicks = []
    # The first click adds the class layers, the second reuses them (removing them and adding
    # new ones crashed vispy's software GL under Xvfb on this machine).
    for attempt in range(2):
        print(f"[bench_gui] ihc: click {attempt + 1}", flush=True)
        widget._output.value = ""
        for path in _output_dialog.session_cache().glob("*.zarr"):
            shutil.rmtree(path)
        _wait(app, lambda: False, 1.0)
        start = time.perf_counter()
        widget._run_button.native.click()
        _wait(app, lambda: _done(widget), 120)
        clicks.append(time.perf_counter() - start)
    image = data.immunohistochemistry()
    headless = []
    with tempfile.TemporaryDirectory() as folder:
        for n in range(3):
            start = time.perf_counter()
            nd.predict_to_zarr(image, model, f"{folder}/map{n}.zarr", device="cpu", channel_axis=-1)
            headless.append(time.perf_counter() - start)
    return {"clicks s": clicks, "headless s": float(np.median(headless))}


def _done(widget: Any) -> bool:
    """The run finished and every class layer is in the viewer."""
    overlay = widget._overlay
    finished = widget._worker is None and widget._store is not None and overlay is not None
    return finished and len(overlay.added) == widget._store.num_classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=25.0, help="run time before Cancel")
    parser.add_argument(
        "--samples", nargs="*", default=["ihc_mosaic", "ihc_virtual_slide"], help="sample keys"
    )
    parser.add_argument(
        "--no-small", action="store_true", help="skip click-to-done on the 512² IHC image"
    )
    args = parser.parse_args()
    xvfb = _display()
    try:
        import napari
        import torch
        from qtpy.QtWidgets import QApplication

        from napari_dense._napari import output_dialog as _output_dialog
        from napari_dense._napari import run_panel as _run_panel
        from napari_dense._napari.widget import dense_widget_of

        # napari's activity-dock progress bar crashes vispy under Xvfb's software GL (seen
        # here, not on a desktop): the widget's own progress bar and status line remain.
        _run_panel.progress = _NoActivity

        model = Path(str(resources.files("napari_dense.demo") / "models" / "ihc_patchnet.pt2"))
        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(*WINDOW)
        app = QApplication.instance()
        widget = dense_widget_of(viewer)
        widget.load_model(model)
        _output_dialog.ask_existing_output = lambda path, parent=None: "overwrite"
        device = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        print(
            f"\nbench_gui on {device}, CPU; window {WINDOW[0]}x{WINDOW[1]}; Advanced, ihc_patchnet"
        )
        print(
            "| image | class layers | max gap | p50 | p99 | first tile | tiles in "
            f"{args.seconds:.0f} s | RSS before | peak RSS (Δ) | cancel | estimate | run "
            "(projected) |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key in args.samples:  # each row printed once measured
            row = _large(app, viewer, widget, key, args.seconds)
            print(
                f"| {row['image']} | {row['layers']} | {row['max gap ms']:.0f} ms | "
                f"{row['p50 ms']:.0f} ms | "
                f"{row['p99 ms']:.0f} ms | {row['first tile s']:.2f} s | {row['tiles']} | "
                f"{row['RSS before MiB']:.0f} MiB | {row['peak RSS MiB']:.0f} MiB "
                f"(+{row['peak RSS MiB'] - row['RSS before MiB']:.0f}) | {row['cancel s']:.2f} s | "
                f"{row['estimate s'] / 60:.1f} min ({row['estimate source']}) | "
                f"{row['projected s'] / 60:.1f} min "
                f"({row['projected s'] / row['estimate s']:.2f}×) |",
                flush=True,
            )
        if not args.no_small:
            small = _small(app, viewer, widget, model)
            first, second = small["clicks s"]
            headless = small["headless s"]
            print(
                f"\n512² IHC, click to done: {first:.2f} s adding the class layers "
                f"({first / headless:.2f}×), {second:.2f} s reusing them "
                f"({second / headless:.2f}×); headless predict_to_zarr: {headless:.2f} s",
                flush=True,
            )
        viewer.close()
    finally:
        if xvfb is not None:
            xvfb.terminate()


if __name__ == "__main__":
    main()
