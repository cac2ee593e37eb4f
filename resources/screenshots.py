"""Take the README's screenshots of the running demo, each in its own process and X server.

``.venv/bin/python resources/screenshots.py`` runs every shot below, one process each under
``xvfb-run`` (vispy's software GL under Xvfb crashed when one process took them all);
``.venv/bin/python resources/screenshots.py overlay`` takes one shot on the current display.
The window is 1800 × 1150, so that the canvas and both docks show (1800 × 1480 for the
Frontier tab, whose plot and table sit below Dense inference).

- ``screenshot_overlay.png``: an Advanced run on the 16k mosaic sample mid-way, the multiscale
  overlay filling in around the view.
- ``screenshot_compare.png``: the Compare panel after comparing the modes on the IHC image.
- ``screenshot_frontier.png``: its Frontier tab after measuring every sampling, the cheapest
  within a 2 % budget applied to Dense inference.

Look at every image before committing it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
WINDOW = (1800, 1150)
FRONTIER_HEIGHT = 1480  # the Frontier tab's plot and table below Dense inference
SCREEN = "-screen 0 1920x1600x24"


def _pump(seconds: float) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def _open() -> tuple[Any, Any, Any]:
    from napari_dense.demo.run import run_gui

    viewer, dense, compare = run_gui(start=False)
    viewer.window._qt_window.resize(*WINDOW)
    _pump(0.5)
    return viewer, dense, compare


def overlay() -> None:
    """An Advanced run on the 16k mosaic, about 30 small tiles painted around the view."""
    viewer, dense, _ = _open()
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
    viewer.close()


def _compared() -> tuple[Any, Any, Any]:
    """The IHC image run to the end, then the modes compared on the whole image."""
    viewer, dense, compare = _open()
    assert dense.run() is not None
    while dense._worker is not None:
        _pump(0.1)
    compare._region.value = "whole image"
    compare.run()
    while compare.comparison is None:
        _pump(0.1)
    _pump(1.0)
    return viewer, dense, compare


def compare() -> None:
    """The Compare panel's table after comparing the modes."""
    viewer, _, _ = _compared()
    _save(viewer, "screenshot_compare.png")
    viewer.close()


def frontier() -> None:
    """The Frontier tab after measuring every sampling, 2 % budget applied."""
    from qtpy.QtCore import Qt

    viewer, dense, compare = _compared()
    compare._tabs.setCurrentIndex(1)  # the Frontier tab, on the same region
    window = viewer.window._qt_window
    window.resize(WINDOW[0], FRONTIER_HEIGHT)  # its plot and table unscrolled
    _pump(0.3)
    docks = [_dock_of(dense), _dock_of(compare)]
    window.resizeDocks(docks, [640, 640], Qt.Orientation.Horizontal)  # the plot unclipped
    # The height goes to the Compare panel; Dense inference keeps what it needs.
    window.resizeDocks(docks, [600, FRONTIER_HEIGHT - 600], Qt.Orientation.Vertical)
    # The canvas grew: the camera moves, so that napari slices the multiscale class layers
    # for the new field of view (a resize alone leaves the old one's region loaded).
    viewer.reset_view()
    _pump(0.5)
    assert compare._frontier.run() is not None
    while compare._frontier._worker is not None:
        _pump(0.1)
    compare._frontier._budget.value = 2.0  # at most 2 % of pixels may change class
    compare._frontier.use_selected()  # the switches of Dense inference show the pick
    _pump(1.0)
    _save(viewer, "screenshot_frontier.png")
    viewer.close()


SHOTS: dict[str, Callable[[], None]] = {
    "overlay": overlay,
    "compare": compare,
    "frontier": frontier,
}


def _dock_of(widget: Any) -> Any:
    """The napari dock around a plugin widget."""
    from qtpy.QtWidgets import QDockWidget

    native = widget.native
    while not isinstance(native, QDockWidget):
        native = native.parentWidget()
    return native


def _save(viewer: Any, name: str) -> None:
    from skimage import io

    image = viewer.screenshot(canvas_only=False, flash=False)
    io.imsave(HERE / name, image, check_contrast=False)
    print(f"wrote {HERE / name} ({image.shape[1]} x {image.shape[0]})")


def main(argv: list[str]) -> int:
    """One shot by name on this display, or every shot in its own process."""
    if argv:
        for name in argv:
            if name not in SHOTS:
                raise SystemExit(f"unknown shot {name!r}: choose from {', '.join(SHOTS)}")
            SHOTS[name]()
        return 0
    xvfb = shutil.which("xvfb-run")
    prefix = [xvfb, "-a", "-s", SCREEN] if xvfb else []
    for name in SHOTS:
        subprocess.run([*prefix, sys.executable, __file__, name], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
