"""Save classifiers as ``.pt2`` files (torch.export) with their metadata embedded."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from napari_dense.convert import ExportedModule
from napari_dense.model_files.errors import ModelFileError
from napari_dense.model_files.infer import complete, first_line
from napari_dense.model_files.metadata import FORMAT_VERSION, METADATA_ENTRY, ModelMetadata

__all__ = ["save_classifier"]


def save_classifier(
    module: nn.Module | ExportedProgram,
    path: str | os.PathLike[str],
    *,
    metadata: ModelMetadata | None = None,
    example_input: torch.Tensor | None = None,
    sidecar: bool = False,
) -> Path:
    """Export a classifier to a ``.pt2`` file with its metadata embedded.

    Parameters
    ----------
    module
        An ``nn.Module`` (exported here, from a copy in eval mode, with a dynamic batch
        dimension when the model allows it) or an ``ExportedProgram`` (saved as is; also the
        ``module`` of a loaded ``.pt2``).
    path
        Where to write; must end in ``.pt2``.
    metadata
        Embedded as ``napari_dense.json``; ``patch_size`` and ``in_channels`` are filled in
        (from ``example_input``, or inferred as :func:`load_classifier` does).
    example_input
        A ``(N, C, Ph, Pw)`` example for the export; zeros of the metadata's shape by default.
    sidecar
        Also write ``<path stem>.yaml`` with the same metadata and ``model_file``.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    if path.suffix.lower() != ".pt2":
        raise ModelFileError(f"save_classifier writes .pt2 files (torch.export); got {path.name}")
    metadata = metadata or ModelMetadata()
    if example_input is not None:
        if example_input.ndim != 4:
            raise ModelFileError(
                f"example_input must be (N, C, Ph, Pw), got shape {tuple(example_input.shape)}"
            )
        shape = tuple(example_input.shape)
        metadata = metadata.replace(
            in_channels=metadata.in_channels or shape[1],
            patch_size=metadata.patch_size or (shape[2], shape[3]),
        )
    # Work on an eval-mode copy: inferring the metadata runs the model, which must neither switch
    # the caller's model to eval mode nor update its BatchNorm statistics.
    if isinstance(module, ExportedModule):  # a loaded .pt2: save its program again
        module = module.exported_program
    model = module if isinstance(module, ExportedProgram) else copy.deepcopy(module).eval()
    metadata = complete(
        model,
        metadata.replace(in_channels=None),
        metadata.in_channels,
        path.name,
        "in metadata= (or pass example_input=)",
    )
    if isinstance(model, ExportedProgram):
        program = model
    else:
        assert metadata.in_channels is not None and metadata.patch_size is not None
        if example_input is None:
            example_input = torch.zeros(1, metadata.in_channels, *metadata.patch_size)
        program = _export(model, example_input)
    entry = json.dumps({"format_version": FORMAT_VERSION, **metadata.as_dict()})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path, extra_files={METADATA_ENTRY: entry})
    if sidecar:
        import yaml

        data = {"format_version": FORMAT_VERSION, "model_file": path.name, **metadata.as_dict()}
        path.with_suffix(".yaml").write_text(yaml.safe_dump(data, sort_keys=False), "utf-8")
    return path


def _export(model: nn.Module, example: torch.Tensor) -> ExportedProgram:
    """torch.export of ``model`` with a dynamic batch dimension when possible.

    A batch of 2 is exported: torch specialises a batch of 1 (so the program would refuse other
    batch sizes). Models that fix their batch size (``x.view(1, -1)``) are exported as given.
    """
    batch = example[:1].expand(2, *example.shape[1:]).clone()
    try:
        return torch.export.export(model, (batch,), dynamic_shapes=({0: Dim("batch")},))
    except Exception:
        pass
    try:
        return torch.export.export(model, (example,))
    except Exception as err:
        raise ModelFileError(
            f"torch.export cannot export {type(model).__name__} ({type(err).__name__}: "
            f"{first_line(err)}); see https://pytorch.org/docs/stable/export.html"
        ) from err
