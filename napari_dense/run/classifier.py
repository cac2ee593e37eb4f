"""From what the user gave (module, dense classifier, model file) to a dense classifier and
what the engine applies around it (normalisation, activation, class names)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from napari_dense.convert import densify
from napari_dense.convert.dense import DenseClassifier
from napari_dense.convert.upsample import check_activation
from napari_dense.errors import InputError
from napari_dense.run.options import RunOptions

__all__ = ["ClassifierSetup", "resolve_classifier"]


@dataclass(frozen=True)
class ClassifierSetup:
    """A dense classifier and what the engine applies around it (from model metadata)."""

    dense: DenseClassifier
    class_names: tuple[str, ...]
    normalisation: Mapping[str, Any] | None = None
    activation: str = "none"
    provenance: Mapping[str, Any] = field(default_factory=dict)


def resolve_classifier(
    model: Any,
    patch_size: int | tuple[int, int] | None = None,
    options: RunOptions | None = None,
    *,
    trust_code: bool = False,
) -> ClassifierSetup:
    """Turn what the user gave (module, dense classifier, loaded file, path) into a setup.

    Metadata of a loaded model file (``napari_dense.model_files.load_classifier``) provides the
    patch size, normalisation, activation and class names unless ``options`` set them
    (:class:`~napari_dense.run.options.RunOptions`: ``mode``, ``normalisation``,
    ``activation``, ``class_names``). A path is loaded with ``load_classifier(path,
    trust_code=trust_code)``: a model that runs a Python file is refused unless ``trust_code``
    is True.
    """
    options = options or RunOptions()
    normalisation, activation = options.normalisation, options.activation
    class_names = options.class_names
    provenance: dict[str, Any] = {}
    if isinstance(model, str | os.PathLike):
        from napari_dense.model_files import load_classifier

        model = load_classifier(model, trust_code=trust_code)
    metadata = getattr(model, "metadata", None)
    if metadata is not None:  # a LoadedClassifier
        provenance = {"model_path": str(model.path), "model_sha256": model.sha256}
        patch_size = patch_size or metadata.patch_size
        normalisation = normalisation if normalisation is not None else metadata.normalisation
        activation = activation or metadata.activation
        class_names = class_names or metadata.class_names
        model = model.module
    if isinstance(model, DenseClassifier):
        dense = model
    elif isinstance(model, nn.Module) or hasattr(model, "graph_module"):
        if patch_size is None:
            raise InputError("patch_size is required to convert a patch classifier")
        dense = densify(model, patch_size, sampling=options.sampling)
    else:
        raise InputError(f"model must be a torch module or a model file, got {type(model)}")
    activation = check_activation(activation)
    names = tuple(class_names) if class_names else ()
    if names and len(names) != dense.num_classes:
        raise InputError(
            f"{len(names)} class names given for a model with {dense.num_classes} outputs"
        )
    names = names or tuple(f"class {k}" for k in range(dense.num_classes))
    provenance["verified"] = dense.plan.as_dict()["verified"]  # the conversion's self-check
    return ClassifierSetup(dense, names, normalisation, activation, provenance)
