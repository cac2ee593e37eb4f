"""What the metadata leaves out, inferred from the model; and what it says, checked against it.

``in_channels`` comes from the exported input shape or the first ``Conv2d``, ``patch_size`` from
the exported input shape or, for modules, the unique square size at which the head reduces the
patch to one vector; the number of outputs is checked against ``class_names``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from napari_dense.convert import accepted_patch_sizes
from napari_dense.convert.geometry import Pair
from napari_dense.errors import NapariDenseError
from napari_dense.model_files.errors import ModelFileError
from napari_dense.model_files.metadata import ModelMetadata

__all__ = ["complete", "first_line", "metadata_of"]


def metadata_of(fields_: Mapping[str, Any], source: str) -> tuple[ModelMetadata, int | None]:
    """Metadata without ``in_channels``, and the declared ``in_channels``.

    ``in_channels`` is checked against the model before the normalisation is checked against
    ``in_channels``: a wrong channel count is reported as such.
    """
    declared = ModelMetadata.from_dict({"in_channels": fields_.get("in_channels")}, source)
    metadata = ModelMetadata.from_dict(
        {k: v for k, v in fields_.items() if k != "in_channels"}, source
    )
    return metadata, declared.in_channels


def _exported_input_shape(program: ExportedProgram) -> tuple[int | None, ...] | None:
    """The user input's shape the program was exported with (None for dynamic dimensions)."""
    inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in inputs:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                return tuple(d if isinstance(d, int) else None for d in value.shape)
    return None


def complete(
    model: nn.Module | ExportedProgram,
    metadata: ModelMetadata,
    declared_channels: int | None,
    source: str,
    where: str = "in the sidecar yaml",
) -> ModelMetadata:
    """Fill in ``in_channels`` and ``patch_size``; check them against the model.

    ``declared_channels`` is the ``in_channels`` the metadata gives (checked here, before the
    normalisation is checked against it); ``where`` tells the user where missing fields go.
    """
    shape = _exported_input_shape(model) if isinstance(model, ExportedProgram) else None
    channels = declared_channels
    if shape is not None and len(shape) == 4 and shape[1] is not None:
        if channels is not None and channels != shape[1]:
            raise ModelFileError(
                f"{source}: in_channels is {channels} but the program was exported with "
                f"{shape[1]} channel(s); fix in_channels"
            )
        channels = shape[1]
    first_conv = _first_conv_channels(model)
    if channels is not None and first_conv is not None and channels != first_conv:
        raise ModelFileError(
            f"{source}: in_channels is {channels} but the model's first Conv2d takes "
            f"{first_conv} channel(s); fix in_channels"
        )
    channels = channels or first_conv
    if channels is None:
        raise ModelFileError(
            f"{source}: cannot tell the input channels (no Conv2d); set in_channels {where}"
        )
    patch = metadata.patch_size
    height, width = shape[2:] if shape is not None and len(shape) == 4 else (None, None)
    if height is not None and width is not None:
        exported = (height, width)
        if patch is not None and patch != exported:
            raise ModelFileError(
                f"{source}: patch_size is {patch[0]}x{patch[1]} but the program was exported for "
                f"{exported[0]}x{exported[1]}; fix patch_size or export again"
            )
        patch = exported
    if patch is None:
        patch = _unique_patch_size(model, channels, source, where)
    classes = _num_classes(model, channels, patch, source)
    if metadata.class_names and classes is not None and len(metadata.class_names) != classes:
        raise ModelFileError(
            f"{source}: {len(metadata.class_names)} class_names for a model with {classes} "
            "outputs; give one name per output"
        )
    try:
        return metadata.replace(in_channels=channels, patch_size=patch)
    except ModelFileError as err:  # the normalisation does not fit the channels
        raise ModelFileError(f"{err} (in {source})") from err


def _num_classes(
    model: nn.Module | ExportedProgram, channels: int, patch: Pair, source: str
) -> int | None:
    """Outputs per patch: from the exported output shape, or one forward pass of a patch."""
    if isinstance(model, ExportedProgram):
        output = next(n for n in model.graph.nodes if n.op == "output").args[0]
        result = output[0] if isinstance(output, tuple | list) and output else output
        value = result.meta.get("val") if isinstance(result, torch.fx.Node) else None
        if isinstance(value, torch.Tensor) and value.ndim >= 2 and isinstance(value.shape[1], int):
            return int(value.shape[1])
        return None
    try:
        with torch.no_grad():
            scores = model(torch.zeros(1, channels, *patch))
    except Exception as err:
        raise ModelFileError(
            f"{source}: the model does not run on a {patch[0]}x{patch[1]} patch with {channels} "
            f"channel(s) ({type(err).__name__}: {first_line(err)}); fix patch_size/in_channels"
        ) from err
    return int(scores.shape[1]) if isinstance(scores, torch.Tensor) and scores.ndim >= 2 else None


def _first_conv_channels(model: nn.Module | ExportedProgram) -> int | None:
    if isinstance(model, nn.Module):
        for layer in model.modules():
            if isinstance(layer, nn.Conv2d):
                return int(layer.in_channels)
    return None


def _unique_patch_size(
    model: nn.Module | ExportedProgram, channels: int, source: str, where: str
) -> Pair:
    try:
        sizes = accepted_patch_sizes(model, in_channels=channels)
    except NapariDenseError as err:
        raise ModelFileError(
            f"{source}: cannot infer the patch size ({err}); set patch_size {where}"
        ) from err
    if len(sizes) == 1:
        return (sizes[0], sizes[0])
    if not sizes:
        raise ModelFileError(
            f"{source}: no square patch size up to 160 reduces to one vector; set patch_size "
            f"{where}"
        )
    raise ModelFileError(
        f"{source}: the model accepts several patch sizes ({', '.join(map(str, sizes))}); set "
        f"patch_size (the size it was trained on) {where}"
    )


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
