"""Take the README's screenshots of the running demo (needs a display: ``xvfb-run -a``).

``xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python resources/screenshots.py``
writes ``resources/screenshot_overlay.png`` (an Advanced run mid-way, overlay filling in) and
``resources/screenshot_compare.png`` (the Compare panel after comparing the modes).
"""

from __future__ import annotations

import time
from pathlib import Path

from qtpy.QtWidgets import QApplication
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
    dense._tile.value = 64  # many small tiles: the overlay visibly fills in
    _pump(1.0)
    assert dense.run() is not None
    while dense._tiles_done < 0.45 * dense._bar.max and dense._worker is not None:
        _pump(0.05)
    _save(viewer, "screenshot_overlay.png")
    while dense._worker is not None:
        _pump(0.1)
    compare._region.value = "whole image"
    compare.run()
    while compare.comparison is None:
        _pump(0.1)
    _pump(1.0)
    _save(viewer, "screenshot_compare.png")
    viewer.close()


def _save(viewer: object, name: str) -> None:
    image = viewer.screenshot(canvas_only=False, flash=False)  # type: ignore[attr-defined]
    io.imsave(HERE / name, image, check_contrast=False)
    print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
