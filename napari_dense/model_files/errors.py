"""Errors of model files (one line naming the fix), and the recipes for what to use instead."""

from __future__ import annotations

from pathlib import Path

from napari_dense.errors import NapariDenseError

__all__ = ["EXPORT_RECIPE", "REEXPORT", "ArchiveProblem", "CodeExecutionRefused", "ModelFileError"]

EXPORT_RECIPE = (
    "export it with torch.export instead: (1) model = YourClass(...); "
    "model.load_state_dict(torch.load('weights.pth', weights_only=True)) "
    "(2) program = torch.export.export(model.eval(), (torch.zeros(1, C, Ph, Pw),)) "
    "(3) torch.export.save(program, 'model.pt2') "
    "(or napari_dense.model_files.save_classifier(model, 'model.pt2', metadata=...))"
)
#: What to do with a refused ``.pt2``.
REEXPORT = (
    "re-export it from the model's Python class as a plain program: "
    "napari_dense.save_classifier(model, 'model.pt2'), or torch.export.save("
    "torch.export.export(model.eval(), (torch.zeros(1, C, Ph, Pw),)), 'model.pt2') "
    "with plain tensors as weights"
)


class ArchiveProblem(ValueError):
    """The archive is refused; the message (one line) says what was found and what to do."""


class ModelFileError(NapariDenseError, ValueError):
    """A model file (or its metadata) cannot be loaded as given; the message names the fix."""


class CodeExecutionRefused(ModelFileError):
    """Loading needs to run a Python file, and ``trust_code=True`` was not given.

    Nothing has run. A GUI asks the user (naming ``path`` and its folder) and loads again with
    ``trust_code=True``.

    Attributes
    ----------
    path
        The Python file that would run (resolved).
    sidecar
        The sidecar that names it, if any.
    """

    def __init__(self, message: str, path: Path, sidecar: Path | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.sidecar = sidecar
