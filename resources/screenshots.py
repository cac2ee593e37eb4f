"""Take the README's screenshots of the running demo (needs a display: ``xvfb-run -a``).

``xvfb-run -a -s "-screen 0 1600x1500x24" .venv/bin/python resources/screenshots.py``
writes ``resources/screenshot_overlay.png`` (an Advanced run on the 16k mosaic sample mid-way,
the multiscale overlay filling in around the view),
``resources/screenshot_compare.png`` (the Compare panel after comparing the modes) and
``resources/screenshot_frontier.png`` (its Frontier tab after measuring every sampling).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QApplication, QDockWidget
from skimage import io

from napari_dense.demo.run import run_gui

HERE = Path(__file__).parent


def _pump(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def main() -> None:
    viewer, dense, compare = run_gui(start=False)
    viewer.window._qt_window.resize(1560, 960)  # wide enough for both docks
    ihc = viewer.layers["IHC"]
    [mosaic] = viewer.open_sample("napari-dense", "ihc_mosaic")
    dense._image.value = mosaic
    viewer.camera.center = (8192, 8192)  # the middle of the 16k mosaic, about 1 px per px
    viewer.camera.zoom = 0.9
    dense._tile.value = 128  # small tiles: the overlay visibly fills in around the view
    _pump(1.0)
    assert dense.run() is not None
    while dense._tiles_done < 30 and dense._worker is not None:
        _pump(0.05)
    _pump(0.5)
    _save(viewer, "screenshot_overlay.png")
    dense.cancel()
    while dense._worker is not None:
        _pump(0.1)
    for layer in [*dense._output_layers, mosaic]:
        viewer.layers.remove(layer)
    dense._image.value = ihc
    viewer.reset_view()
    assert dense.run() is not None
    while dense._worker is not None:
        _pump(0.1)
    compare._region.value = "whole image"
    compare.run()
    while compare.comparison is None:
        _pump(0.1)
    _pump(1.0)
    _save(viewer, "screenshot_compare.png")
    compare._tabs.setCurrentIndex(1)  # the Frontier tab, on the same region
    window = viewer.window._qt_window
    window.resize(1560, 1480)  # tall enough for its plot and table unscrolled
    _pump(0.3)
    # The height goes to the Compare panel; Dense inference keeps what it needs.
    window.resizeDocks([_dock_of(dense), _dock_of(compare)], [430, 960], Qt.Orientation.Vertical)
    assert compare._frontier.run() is not None
    while compare._frontier._worker is not None:
        _pump(0.1)
    compare._frontier._budget.value = 2.0  # at most 2 % of pixels may change class
    compare._frontier.use_selected()  # the switches of Dense inference show the pick
    _pump(1.0)
    _save(viewer, "screenshot_frontier.png")
    viewer.close()


def _dock_of(widget: Any) -> QDockWidget:
    """The napari dock around a plugin widget."""
    native = widget.native
    while not isinstance(native, QDockWidget):
        native = native.parentWidget()
    return native


def _save(viewer: object, name: str) -> None:
    image = viewer.screenshot(canvas_only=False, flash=False)  # type: ignore[attr-defined]
    io.imsave(HERE / name, image, check_contrast=False)
    print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
