"""Drop a model file (``.pt2`` or its sidecar ``.yaml``) on the viewer: load it, add no layer.

The reader itself runs nothing from the file: :func:`get_reader` only looks at the name (and,
for YAML, at the text), and the loading is the Dense inference widget's
``load_model(path)``, which calls :func:`napari_dense.load_classifier` with
``trust_code=False``. A ``.pt2`` is checked before torch reads it (a refused one is reported,
nothing is loaded); a sidecar naming a ``python_file`` raises
:class:`~napari_dense.model_files.CodeExecutionRefused` there, and the widget asks the user
(naming the file and its folder) before loading again with ``trust_code=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["get_reader"]

_MODEL_SUFFIXES = (".pt2",)
_SIDECAR_SUFFIXES = (".yaml", ".yml")


def _is_model_sidecar(path: Path) -> bool:
    """A YAML file is ours when it has the model metadata keys (not any YAML)."""
    try:
        text = path.read_text(errors="replace")[:20000]
    except OSError:
        return False
    return "patch_size" in text and ("class_names" in text or "model" in text)


def get_reader(path: str | list[str]) -> Callable[[str], list[Any]] | None:
    """napari reader hook: a function for model files, None for anything else."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    candidate = Path(path)
    suffix = candidate.suffix.lower()
    if suffix in _MODEL_SUFFIXES or (suffix in _SIDECAR_SUFFIXES and _is_model_sidecar(candidate)):
        return _load_into_widget
    return None


def _load_into_widget(path: str | list[str]) -> list[Any]:
    import napari

    from napari_dense._napari.widget import dense_widget_of

    if isinstance(path, list):
        path = path[0]
    viewer = napari.current_viewer()
    if viewer is not None:
        dense_widget_of(viewer).load_model(path)
    return [(None,)]  # napari's sentinel for "read, but no layer to add"
