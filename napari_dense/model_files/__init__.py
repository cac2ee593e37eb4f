"""Load patch classifiers from files, with the metadata the engine needs to run them.

Formats
-------
``.pt2`` (preferred)
    A :func:`torch.export.save` program: weights and graph only. Before torch reads it, the
    archive is checked (:mod:`.archive`): intact (CRC-32 of every entry), at most
    2 GiB decompressed (``max_archive_bytes=`` or ``NAPARI_DENSE_MAX_MODEL_BYTES`` raise it), no
    pickled weights, constants or objects, sample inputs of tensors only, graph targets that are
    torch operators, symbolic shapes and guards that are plain expressions; torch then loads the
    checked bytes (sample inputs emptied: nothing is unpickled) with every ``torch.load`` forced
    to ``weights_only=True``. Loading a ``.pt2``
    runs no code from the file, and a file named ``.pt2`` is never read as a pickle. Metadata
    is embedded as the extra file ``napari_dense.json`` (:func:`save_classifier` writes it)
    and/or read from a sidecar ``<model>.yaml`` (or ``.yml``) next to the model; the sidecar
    wins, field by field.
Python file + class + state dict
    ``load_classifier("net.py", class_name="PatchNet", weights="net.pth", trust_code=True)``, or
    a sidecar that names ``python_file``, ``class_name`` and ``weights``. The Python file is
    *run*: without ``trust_code=True`` (CLI ``--trust-code``; in napari a confirmation dialog)
    it is refused with :class:`CodeExecutionRefused`, wherever it lies (with the opt-in, also
    outside the sidecar's folder: the opt-in names the file). The weights are read with
    ``torch.load(..., weights_only=True)``, which unpickles tensors and containers only.
A sidecar ``.yaml``
    May itself be given: it names the model file (``model_file`` or ``python_file``).

TorchScript archives and pickled modules are refused with the recipe to export instead.
:func:`load_classifier` returns a :class:`LoadedClassifier`: the classifier as an ``nn.Module``
(a ``.pt2`` becomes a :class:`~napari_dense.convert.ExportedModule`) with its completed
:class:`ModelMetadata`, path and SHA-256. :func:`save_classifier` writes ``.pt2`` files.

Sidecar schema (every field optional; relative paths are resolved next to the yaml)::

    format_version: 1
    model_file: nuclei.pt2            # a torch.export program, or instead:
    python_file: net.py               #   a Python file defining the class,
    class_name: PatchNet              #   the class (or a function returning the module),
    init_args: {num_classes: 2}       #   its keyword arguments (a list: positional; default none),
    weights: net.pth                  #   its state dict (torch.save(model.state_dict(), ...)).
    name: Nuclei vs background
    description: Trained on 40 H&E tiles of the 2024 cohort.
    patch_size: [32, 32]              # (Ph, Pw), or one int for square patches
    in_channels: 3
    class_names: [background, nucleus]
    normalisation:                    # x' = (x * scale - mean[c]) / std[c], per channel c
      scale: 0.00392156862745098      # 1/255: uint8 images to [0, 1]
      mean: [0.485, 0.456, 0.406]     # one value per channel, or one for all
      std: [0.229, 0.224, 0.225]
    activation: softmax               # softmax | sigmoid | none: applied after the network
    accuracy: 0.93                    # or named figures: {held_out: 0.93, recall_tumour: 0.9}
    training_command: python train.py --epochs 20

The embedded ``napari_dense.json`` holds the same metadata fields (no file fields). Missing
fields are inferred: ``in_channels`` from the exported input shape or the first ``Conv2d``,
``patch_size`` from the exported input shape or, for modules, the unique square size at which the
head reduces the patch to one vector. Without ``normalisation`` or ``activation`` nothing is
applied (``activation: none``: the network's output is used as is).

The schema is :class:`ModelMetadata` and :class:`~.metadata.Sidecar` (pydantic models); its JSON
Schema ships as ``napari_dense/model_files/sidecar.schema.json`` (:func:`sidecar_schema`).

Modules: :mod:`.metadata` (the schema), :mod:`.messages` (its errors in one line),
:mod:`.sidecar` (reading sidecars), :mod:`.load` (format dispatch), :mod:`.exported` (``.pt2``),
:mod:`.archive`, :mod:`.graph_checks` and :mod:`.pickle_scan` (the archive checks),
:mod:`.python_model` (Python files), :mod:`.infer` (inferred fields), :mod:`.save`.
"""

from __future__ import annotations

from napari_dense.model_files.errors import CodeExecutionRefused, ModelFileError
from napari_dense.model_files.load import load_classifier
from napari_dense.model_files.loaded import LoadedClassifier
from napari_dense.model_files.metadata import (
    ACTIVATIONS,
    FORMAT_VERSION,
    METADATA_ENTRY,
    ModelMetadata,
    Normalisation,
    Sidecar,
    check_normalisation,
)
from napari_dense.model_files.save import save_classifier
from napari_dense.model_files.sidecar import sidecar_schema

__all__ = [
    "ACTIVATIONS",
    "FORMAT_VERSION",
    "METADATA_ENTRY",
    "CodeExecutionRefused",
    "LoadedClassifier",
    "ModelFileError",
    "ModelMetadata",
    "Normalisation",
    "Sidecar",
    "check_normalisation",
    "load_classifier",
    "save_classifier",
    "sidecar_schema",
]
