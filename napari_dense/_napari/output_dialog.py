"""Where a GUI run writes: the user's output (asked what to do when it exists) or a session cache.

Runs without an explicit output go to one per-session cache folder, removed when napari exits;
saving is explicit (*File › Save Selected Layers*, or an output path). An existing output is
never replaced silently: :func:`ask_existing_output` offers Resume / Overwrite / Choose another.
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["ask_existing_output", "choose_output", "confirm_code_execution", "session_cache"]

_SESSION: list[Path] = []


def session_cache() -> Path:
    """This session's cache folder (created once, removed at exit).

    A folder of its own inside the plugin setting *cache folder* when set, else in the system's
    temporary folder; only that folder, which this session made, is removed.
    """
    if not _SESSION or not _SESSION[0].is_dir():
        from napari_dense._napari.settings import run_settings

        parent = run_settings().cache_folder or None
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="napari-dense-session-", dir=parent))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _SESSION[:] = [folder]
    return _SESSION[0]


def in_session_cache(path: str | Path) -> bool:
    """Whether ``path`` is inside this session's cache folder (removed at exit)."""
    return bool(_SESSION) and Path(path).resolve().is_relative_to(_SESSION[0].resolve())


def cache_output(*parts: str) -> Path:
    """The cache path of a run named by ``parts`` (input layer, model, mode): the same run gets
    the same path, so running it again after Cancel offers Resume."""
    name = "-".join(re.sub(r"[^A-Za-z0-9._]+", "_", part).strip("_") or "x" for part in parts)
    return session_cache() / f"{name[:120]}.zarr"


def ask_existing_output(path: Path, parent: object = None) -> str:
    """Ask what to do with an existing output: ``"resume"``, ``"overwrite"``, ``"choose"`` or
    ``"cancel"`` (tests replace this function)."""
    from qtpy.QtWidgets import QMessageBox

    box = QMessageBox(parent)  # type: ignore[call-overload]
    box.setIcon(QMessageBox.Icon.Question)
    box.setWindowTitle("napari-dense: the output exists")
    box.setText(f"{path.name} already exists in {path.parent}.")
    box.setInformativeText(
        "Resume computes only the tiles it lacks (same image, model and tile size); Overwrite "
        "replaces it."
    )
    buttons = {
        "resume": box.addButton("Resume", QMessageBox.ButtonRole.AcceptRole),
        "overwrite": box.addButton("Overwrite", QMessageBox.ButtonRole.DestructiveRole),
        "choose": box.addButton("Choose another…", QMessageBox.ButtonRole.ActionRole),
        "cancel": box.addButton(QMessageBox.StandardButton.Cancel),
    }
    box.setDefaultButton(buttons["resume"])
    box.exec()
    clicked = box.clickedButton()
    return next((name for name, button in buttons.items() if button is clicked), "cancel")


def choose_output(start: Path, parent: object = None) -> Path | None:
    """A save dialog for a ``.zarr`` output (None when cancelled; tests replace this)."""
    from qtpy.QtWidgets import QFileDialog

    name, _ = QFileDialog.getSaveFileName(
        parent,  # type: ignore[arg-type]
        "napari-dense: write the probability map to",
        str(start),
        "OME-Zarr (*.zarr)",
    )
    if not name:
        return None
    path = Path(name)
    return path if path.suffix == ".zarr" else path.with_suffix(".zarr")


def confirm_code_execution(path: Path, parent: object = None) -> bool:
    """Ask before running a model's Python file (tests replace this function)."""
    from qtpy.QtWidgets import QMessageBox

    answer = QMessageBox.question(
        parent,  # type: ignore[arg-type]
        "napari-dense: run this model's Python code?",
        f"{path.name} runs Python code from {path.parent} to build the model. Run it only if "
        "you trust that folder.",
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
        QMessageBox.StandardButton.No,
    )
    return answer == QMessageBox.StandardButton.Yes
