"""Load a model file: find its sidecar, tell its format, and hand it to the loader for it.

``.pt2`` files go to :mod:`.exported` (runs no code), Python files and the weights of a class
a sidecar names to :mod:`.python_model` (runs the file, with ``trust_code=True`` only);
TorchScript archives and pickled modules are refused with the recipe to export instead.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Literal

from napari_dense.model_files.errors import EXPORT_RECIPE, ModelFileError
from napari_dense.model_files.exported import load_exported
from napari_dense.model_files.loaded import LoadedClassifier
from napari_dense.model_files.python_model import load_python, refuse_pickle
from napari_dense.model_files.sidecar import (
    SIDECAR_SUFFIXES,
    model_named_by,
    read_sidecar,
    sidecar_of,
)

__all__ = ["load_classifier"]


def load_classifier(
    path: str | os.PathLike[str],
    *,
    class_name: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    trust_code: bool = False,
    max_archive_bytes: int | None = None,
) -> LoadedClassifier:
    """Load a patch classifier and its metadata from a file.

    Parameters
    ----------
    path
        A ``.pt2`` (torch.export), a sidecar ``.yaml`` naming the model, a Python file defining
        the classifier (with ``class_name`` and ``weights``), or a weights file whose sidecar
        names the Python class.
    class_name
        For a Python file: the ``nn.Module`` class (or a function returning the module); the
        sidecar's ``class_name`` otherwise.
    weights
        For a Python file: its state dict (``torch.save(model.state_dict(), path)``); the
        sidecar's ``weights`` otherwise.
    trust_code
        Allow running the Python file that defines the classifier (named here or by a
        sidecar's ``python_file``). Without it such a model is refused with
        :class:`CodeExecutionRefused` before anything runs.
    max_archive_bytes
        Largest decompressed size of a ``.pt2`` (default 2 GiB, or the environment variable
        ``NAPARI_DENSE_MAX_MODEL_BYTES``).

    Nothing but an opted-in Python file runs code: ``.pt2`` archives are checked before
    :func:`torch.export.load` reads them (see the module docstring), weights are read with
    ``torch.load(..., weights_only=True)``.

    Returns
    -------
    LoadedClassifier

    Raises
    ------
    CodeExecutionRefused
        A Python file would run and ``trust_code`` is False (its ``path`` names the file).
    ModelFileError
        With one line naming the fix: missing file, unsupported format (TorchScript, pickled
        modules: with the torch.export recipe), an archive that is damaged, too large or holds
        pickles or code, class not found, weights that do not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SIDECAR_SUFFIXES:
        sidecar: Path | None = path
        data: dict[str, Any] = read_sidecar(path)
        model_path = model_named_by(path, data)
    else:
        sidecar = sidecar_of(path)
        data = read_sidecar(sidecar) if sidecar else {}
        model_path = path
    kind = _archive_kind(model_path)
    model_suffix = model_path.suffix.lower()
    # A Python file, or the weights of the class a sidecar names (never a file named .pt2).
    if model_suffix == ".py" or (
        data.get("python_file") and kind == "pickle" and model_suffix != ".pt2"
    ):
        return load_python(model_path, data, sidecar, class_name, weights, trust_code)
    if class_name is not None or weights is not None:
        raise ModelFileError(
            f"class_name= and weights= are for Python files; {model_path.name} is not one"
        )
    if model_suffix == ".pt2" and kind == "pickle":
        raise ModelFileError(
            f"{model_path.name} is named .pt2 but is a torch.save pickle (a state dict or a "
            "pickled module), not a torch.export program; napari-dense does not unpickle it: "
            + EXPORT_RECIPE
        )
    if kind == "export" or (kind is None and model_suffix == ".pt2"):
        return load_exported(model_path, data, sidecar, max_archive_bytes)
    if kind == "torchscript":
        raise ModelFileError(
            f"{model_path.name} is a TorchScript archive, which napari-dense cannot convert; "
            + EXPORT_RECIPE
        )
    if kind == "pickle":
        return refuse_pickle(model_path)
    raise ModelFileError(
        f"{model_path.name} is not a model file napari-dense reads: give a .pt2 "
        "(torch.export.save), a .yaml sidecar, or a Python file with class_name= and weights="
    )


def _archive_kind(path: Path) -> Literal["export", "torchscript", "pickle"] | None:
    """What a zip archive written by torch holds, from its entry names (nothing is loaded)."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n.endswith("/archive_format") or "/models/" in n for n in names):
        return "export"
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "pickle"
    return None
