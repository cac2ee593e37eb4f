"""Load patch classifiers from files, with the metadata the engine needs to run them.

Formats
-------
``.pt2`` (preferred)
    A :func:`torch.export.save` program: weights and graph only. Before torch reads it, the
    archive is checked (:mod:`napari_dense._archive`): intact (CRC-32 of every entry), at most
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
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import io
import json
import logging
import math
import numbers
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from . import _archive
from .convert import ExportedModule, SamplingSpec, accepted_patch_sizes, densify
from .dense import DenseClassifier
from .errors import NapariDenseError
from .geometry import Pair

__all__ = [
    "ACTIVATIONS",
    "CodeExecutionRefused",
    "LoadedClassifier",
    "ModelFileError",
    "ModelMetadata",
    "check_normalisation",
    "load_classifier",
    "save_classifier",
]

#: The name of the metadata entry embedded in ``.pt2`` files.
METADATA_ENTRY = "napari_dense.json"
FORMAT_VERSION = 1
ACTIVATIONS = ("softmax", "sigmoid", "none")
Activation = Literal["softmax", "sigmoid", "none"]
# Sidecar fields that say where the model is, not what it is.
_FILE_FIELDS = ("format_version", "model_file", "python_file", "class_name", "init_args", "weights")
_SIDECAR_SUFFIXES = (".yaml", ".yml")
_EXPORT_RECIPE = (
    "export it with torch.export instead: (1) model = YourClass(...); "
    "model.load_state_dict(torch.load('weights.pth', weights_only=True)) "
    "(2) program = torch.export.export(model.eval(), (torch.zeros(1, C, Ph, Pw),)) "
    "(3) torch.export.save(program, 'model.pt2') "
    "(or napari_dense.model_files.save_classifier(model, 'model.pt2', metadata=...))"
)


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


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


def check_normalisation(
    normalisation: Mapping[str, Any], channels: int | None = None
) -> dict[str, Any]:
    """Validate a normalisation and return it as plain data.

    Parameters
    ----------
    normalisation
        ``{"scale": s, "mean": [...], "std": [...]}`` (every key optional; a number stands for
        one value for all channels). The engine computes ``x' = (x * scale - mean[c]) / std[c]``
        for every channel ``c`` of the raw image ``x``.
    channels
        The model's input channels: mean and std must then have one value or one per channel.

    Returns
    -------
    dict
        ``{"scale": float, "mean": list[float], "std": list[float]}``.
    """
    unknown = set(normalisation) - {"scale", "mean", "std"}
    if unknown:
        raise ModelFileError(
            f"unknown normalisation field(s) {sorted(unknown)}; use scale, mean and std"
        )
    try:
        scale = float(normalisation.get("scale", 1.0))
        mean = _floats(normalisation.get("mean", 0.0))
        std = _floats(normalisation.get("std", 1.0))
    except (TypeError, ValueError) as err:
        raise ModelFileError(
            f"normalisation needs a number (scale) and numbers or lists of numbers (mean, std): "
            f"{err}"
        ) from err
    if not math.isfinite(scale) or scale == 0:
        raise ModelFileError(f"normalisation scale must be finite and non-zero, got {scale}")
    if not mean or not std or any(not (s > 0 and math.isfinite(s)) for s in std):
        raise ModelFileError(f"normalisation std must be positive numbers, got {std}")
    for name, values in (("mean", mean), ("std", std)):
        if channels is not None and len(values) not in (1, channels):
            raise ModelFileError(
                f"normalisation {name} has {len(values)} values for a {channels}-channel model: "
                f"give one value or {channels}"
            )
    return {"scale": scale, "mean": mean, "std": std}


@dataclass(frozen=True)
class ModelMetadata:
    """What a model file says about its classifier (see the module docstring for the schema).

    Attributes
    ----------
    patch_size
        ``(Ph, Pw)``; always set on a :class:`LoadedClassifier` (inferred when missing).
    in_channels
        Input channels; always set on a :class:`LoadedClassifier`.
    class_names
        One name per output class (empty when not given).
    normalisation
        ``{"scale": float, "mean": [...], "std": [...]}``: the engine feeds the network
        ``(x * scale - mean[c]) / std[c]`` per channel ``c``; None: raw values (see
        :func:`check_normalisation`).
    activation
        ``"softmax"``, ``"sigmoid"`` or ``"none"``: applied by the engine after the network, for
        models that output logits; ``"none"`` uses the output as is.
    name, description, training_command
        For display and provenance.
    accuracy
        A number, or named figures (``{"held_out_accuracy": 0.93, "recall_tumour": 0.9}``).
    """

    patch_size: Pair | None = None
    in_channels: int | None = None
    class_names: list[str] = field(default_factory=list)
    normalisation: dict[str, Any] | None = None
    activation: Activation = "none"
    name: str = ""
    description: str = ""
    accuracy: float | dict[str, float] | None = None
    training_command: str = ""

    def __post_init__(self) -> None:
        # Frozen: normalised values are set through object.__setattr__.
        if self.activation not in ACTIVATIONS:
            raise ModelFileError(
                f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.patch_size is not None:
            object.__setattr__(self, "patch_size", _patch_pair(self.patch_size))
        if self.in_channels is not None:
            object.__setattr__(self, "in_channels", _channel_count(self.in_channels))
        if self.normalisation is not None:
            if not isinstance(self.normalisation, Mapping):
                raise ModelFileError("normalisation must be a mapping {scale, mean, std}")
            object.__setattr__(
                self, "normalisation", check_normalisation(self.normalisation, self.in_channels)
            )
        if isinstance(self.class_names, str) or not isinstance(self.class_names, Sequence):
            raise ModelFileError("class_names must be a list of names")
        object.__setattr__(self, "class_names", [str(n) for n in self.class_names])
        if isinstance(self.accuracy, Mapping):
            object.__setattr__(
                self, "accuracy", {str(k): float(v) for k, v in self.accuracy.items()}
            )
        elif self.accuracy is not None:
            object.__setattr__(self, "accuracy", float(self.accuracy))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "metadata") -> ModelMetadata:
        """From plain data (a parsed sidecar or embedded JSON); file fields are ignored.

        ``normalization`` is accepted for ``normalisation``. Unknown fields are refused (typos).
        """
        data = dict(data)
        if "normalization" in data and "normalisation" not in data:
            data["normalisation"] = data.pop("normalization")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - set(_FILE_FIELDS)
        if unknown:
            raise ModelFileError(
                f"unknown field(s) {sorted(unknown)} in {source}; known: "
                f"{', '.join(sorted(known | set(_FILE_FIELDS)))}"
            )
        values = {k: v for k, v in data.items() if k in known and v is not None}
        for key in ("name", "description", "training_command"):
            if key in values:
                values[key] = str(values[key])
        if "activation" in values:
            values["activation"] = str(values["activation"]).lower()
        try:
            return cls(**values)
        except ModelFileError as err:
            raise ModelFileError(f"{err} (in {source})") from err
        except (TypeError, ValueError) as err:
            raise ModelFileError(f"invalid metadata in {source}: {err}") from err

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON and YAML serialisable) of the fields that are set."""
        data = asdict(self)
        data["patch_size"] = list(self.patch_size) if self.patch_size else None
        return {k: v for k, v in data.items() if v not in (None, "", [])}


def _patch_pair(value: Any) -> Pair:
    """``patch_size`` as ``(Ph, Pw)``: one positive int, or a list of one or two."""
    items = list(value) if isinstance(value, list | tuple) else [value]
    if 1 <= len(items) <= 2 and all(_is_count(v) for v in items):
        return (int(items[0]), int(items[-1]))
    raise ModelFileError(
        f"patch_size must be a positive whole number (square patches) or [height, width], got "
        f"{value!r}"
    )


def _is_count(value: Any) -> bool:
    """A positive whole number (not a bool, not a float such as 24.5 or 24.0)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0


def _channel_count(value: Any) -> int:
    if _is_count(value):
        return int(value)
    raise ModelFileError(
        f"in_channels must be a positive whole number (the image channels the model reads), got "
        f"{value!r}"
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedClassifier:
    """A classifier loaded from a file, ready for :func:`napari_dense.densify`.

    Attributes
    ----------
    module
        The classifier, an ``nn.Module`` mapping ``(N, C, Ph, Pw)`` to scores: for a ``.pt2``
        an :class:`~napari_dense.convert.ExportedModule` (its ``exported_program`` is the loaded
        program), for a Python class the instance in eval mode. ``densify``, ``explain``, the
        engine and per-patch code (``reference.patchwise``) all accept it.
    metadata
        Its metadata, with ``patch_size`` and ``in_channels`` always set.
    path
        The file holding the trained model: the ``.pt2``, or the weights of a Python class.
    sha256
        Hex SHA-256 of the file at ``path`` (provenance: which weights produced a result).
    sidecar
        The sidecar yaml that was read, if any.
    """

    module: nn.Module
    metadata: ModelMetadata
    path: Path
    sha256: str
    sidecar: Path | None = None

    @property
    def patch_size(self) -> Pair:
        """``(Ph, Pw)``."""
        assert self.metadata.patch_size is not None
        return self.metadata.patch_size

    def densify(
        self, sampling: SamplingSpec = "all", *, phases: str = "dilated"
    ) -> DenseClassifier:
        """:func:`napari_dense.densify` of the classifier at its patch size."""
        return densify(
            self.module,
            self.patch_size,
            sampling=sampling,
            phases=phases,
            in_channels=self.metadata.in_channels,
        )


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
    if suffix in _SIDECAR_SUFFIXES:
        sidecar: Path | None = path
        data = _read_yaml(path)
        model_path = _model_named_by(path, data)
    else:
        sidecar = _sidecar_of(path)
        data = _read_yaml(sidecar) if sidecar else {}
        model_path = path
    kind = _archive_kind(model_path)
    model_suffix = model_path.suffix.lower()
    # A Python file, or the weights of the class a sidecar names (never a file named .pt2).
    if model_suffix == ".py" or (
        data.get("python_file") and kind == "pickle" and model_suffix != ".pt2"
    ):
        return _load_python(model_path, data, sidecar, class_name, weights, trust_code)
    if class_name is not None or weights is not None:
        raise ModelFileError(
            f"class_name= and weights= are for Python files; {model_path.name} is not one"
        )
    if model_suffix == ".pt2" and kind == "pickle":
        raise ModelFileError(
            f"{model_path.name} is named .pt2 but is a torch.save pickle (a state dict or a "
            "pickled module), not a torch.export program; napari-dense does not unpickle it: "
            + _EXPORT_RECIPE
        )
    if kind == "export" or (kind is None and model_suffix == ".pt2"):
        return _load_exported(model_path, data, sidecar, max_archive_bytes)
    if kind == "torchscript":
        raise ModelFileError(
            f"{model_path.name} is a TorchScript archive, which napari-dense cannot convert; "
            + _EXPORT_RECIPE
        )
    if kind == "pickle":
        return _refuse_pickle(model_path)
    raise ModelFileError(
        f"{model_path.name} is not a model file napari-dense reads: give a .pt2 "
        "(torch.export.save), a .yaml sidecar, or a Python file with class_name= and weights="
    )


def _load_exported(
    path: Path, data: Mapping[str, Any], sidecar: Path | None, max_bytes: int | None
) -> LoadedClassifier:
    try:
        checked = _archive.check_export_archive(path, max_bytes)
    except _archive.ArchiveProblem as err:
        raise ModelFileError(f"{path.name} is refused: {err}") from err
    extra = {METADATA_ENTRY: ""}
    try:
        # The checked bytes, not the file again (it may have changed since).
        with _archive.weights_only_loads(), _quiet_torch_logs():
            program = torch.export.load(io.BytesIO(checked.for_torch()), extra_files=extra)
    except Exception as err:
        raise ModelFileError(
            f"torch.export.load cannot read {path.name} ({type(err).__name__}: "
            f"{_first_line(err)}); save it with torch.export.save (an AOTInductor package or a "
            "file from another torch version may not load)"
        ) from err
    embedded: dict[str, Any] = {}
    if extra[METADATA_ENTRY]:
        try:
            embedded = json.loads(extra[METADATA_ENTRY])
        except json.JSONDecodeError as err:
            raise ModelFileError(
                f"the metadata embedded in {path.name} is not JSON: {err}"
            ) from err
        if not isinstance(embedded, dict):
            raise ModelFileError(f"the metadata embedded in {path.name} is not a JSON object")
    _check_program_targets(program, path)
    merged = {**embedded, **{k: v for k, v in data.items() if k not in _FILE_FIELDS}}
    source = f"{path.name}" + (f" + {sidecar.name}" if sidecar else "")
    metadata = _complete(program, *_metadata_of(merged, source), source)
    module = ExportedModule(program)
    digest = hashlib.sha256(checked.data).hexdigest()
    return LoadedClassifier(module, metadata, path.resolve(), digest, sidecar)


@contextmanager
def _quiet_torch_logs() -> Any:
    """torch.export logs tracebacks while it tries other formats; the error says it in a line."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _check_program_targets(program: ExportedProgram, path: Path) -> None:
    """After loading: every node calls a torch operator or an allowed arithmetic function."""
    allowed = _allowed_functions()
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
            target = node.target
            if node.op in ("call_method", "call_module") or (
                node.op == "call_function"
                and not isinstance(target, torch._ops.OpOverload | torch._ops.HigherOrderOperator)
                and not any(target is function for function in allowed)
            ):
                raise ModelFileError(
                    f"{path.name} is refused: its graph calls {target!r} ({node.op}), which is "
                    f"not a torch operator; {_archive.REEXPORT}"
                )


def _allowed_functions() -> list[Any]:
    import operator

    functions = []
    for name in _archive.SAFE_FUNCTION_TARGETS:
        module_name, attribute = name.rsplit(".", 1)
        module = {"_operator": operator, "math": math, "torch": torch}[module_name]
        if hasattr(module, attribute):
            functions.append(getattr(module, attribute))
    return functions


def _metadata_of(fields_: Mapping[str, Any], source: str) -> tuple[ModelMetadata, int | None]:
    """Metadata without ``in_channels``, and the declared ``in_channels``.

    ``in_channels`` is checked against the model before the normalisation is checked against
    ``in_channels``: a wrong channel count is reported as such.
    """
    declared = fields_.get("in_channels")
    if declared is not None:
        try:
            declared = _channel_count(declared)
        except ModelFileError as err:
            raise ModelFileError(f"{err} (in {source})") from err
    metadata = ModelMetadata.from_dict(
        {k: v for k, v in fields_.items() if k != "in_channels"}, source
    )
    return metadata, declared


def _load_python(
    path: Path,
    data: Mapping[str, Any],
    sidecar: Path | None,
    class_name: str | None,
    weights: str | os.PathLike[str] | None,
    trust_code: bool,
) -> LoadedClassifier:
    base = sidecar.parent if sidecar else path.parent
    if path.suffix.lower() == ".py":
        python_file = path
        weights_file = (
            Path(weights) if weights is not None else _relative(base, data.get("weights"))
        )
    else:  # a weights file whose sidecar names the Python file
        python_file = _relative(base, data.get("python_file")) or path
        weights_file = Path(weights) if weights is not None else path
    class_name = class_name or data.get("class_name")
    if not class_name:
        raise ModelFileError(
            f"which class in {python_file.name} is the classifier? pass class_name=... "
            "(or class_name: in the sidecar yaml)"
        )
    if weights_file is None:
        raise ModelFileError(
            f"no weights for {class_name}: pass weights='state_dict.pth' (or weights: in the "
            "sidecar yaml), saved with torch.save(model.state_dict(), ...)"
        )
    for file in (python_file, weights_file):
        if not file.is_file():
            raise ModelFileError(f"model file not found: {file}")
    if weights_file.suffix.lower() == ".pt2":
        raise ModelFileError(
            f"weights {weights_file.name} is named .pt2 (a torch.export program, never read as a "
            "state dict): give the .pt2 as the model, or weights saved with "
            "torch.save(model.state_dict(), 'weights.pth')"
        )
    if not trust_code:
        raise _code_refusal(python_file, sidecar)
    module = _construct(python_file, str(class_name), data.get("init_args"))
    state = _read_state_dict(weights_file)
    _load_state_dict(module, state, weights_file, str(class_name))
    module.eval()
    source = sidecar.name if sidecar else python_file.name
    metadata_fields = {k: v for k, v in data.items() if k not in _FILE_FIELDS}
    metadata = _complete(module, *_metadata_of(metadata_fields, source), source)
    return LoadedClassifier(
        module, metadata, weights_file.resolve(), _sha256(weights_file), sidecar
    )


def _code_refusal(python_file: Path, sidecar: Path | None) -> CodeExecutionRefused:
    resolved = python_file.resolve()
    where = f"in {resolved.parent}"
    if sidecar is not None:
        where += f", named by {sidecar.name}"
        if not resolved.is_relative_to(sidecar.resolve().parent):
            where += " from outside the sidecar's folder"
    return CodeExecutionRefused(
        f"{python_file.name} ({where}) is Python code that would run to build the model; "
        "napari-dense runs it only if you trust it: pass trust_code=True to load_classifier "
        "(CLI: --trust-code), or use a .pt2 (torch.export), which runs no code",
        resolved,
        sidecar,
    )


def _construct(python_file: Path, class_name: str, init_args: Any) -> nn.Module:
    namespace = _import_python_file(python_file)
    factory = getattr(namespace, class_name, None)
    if factory is None or not callable(factory):
        defined = sorted(
            name
            for name, obj in vars(namespace).items()
            if inspect.isclass(obj)
            and issubclass(obj, nn.Module)
            and obj.__module__ == namespace.__name__
        )
        raise ModelFileError(
            f"{python_file.name} defines no class {class_name!r}; nn.Module classes there: "
            f"{', '.join(defined) or 'none'}"
        )
    if init_args is None:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
    elif isinstance(init_args, Mapping):
        args, kwargs = [], dict(init_args)
    elif isinstance(init_args, list | tuple):
        args, kwargs = list(init_args), {}
    else:
        raise ModelFileError(f"init_args must be a mapping (keywords) or a list, got {init_args!r}")
    try:
        module = factory(*args, **kwargs)
    except Exception as err:
        raise ModelFileError(
            f"{class_name}(...) failed with init_args {init_args!r} ({type(err).__name__}: "
            f"{_first_line(err)}); set init_args in the sidecar yaml"
        ) from err
    if not isinstance(module, nn.Module):
        raise ModelFileError(
            f"{class_name} in {python_file.name} made a {type(module).__name__}, not a "
            "torch.nn.Module"
        )
    return module


def _import_python_file(path: Path) -> ModuleType:
    """Run a Python file as a module (its directory importable while it runs)."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"napari_dense_user_model_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"cannot import {path.name} as a Python module")
    namespace = importlib.util.module_from_spec(spec)
    # Registered before running: dataclasses and pickling look classes up in sys.modules.
    sys.modules[module_name] = namespace
    directory = str(path.resolve().parent)
    sys.path.insert(0, directory)
    try:
        spec.loader.exec_module(namespace)
    except Exception as err:
        del sys.modules[module_name]
        raise ModelFileError(
            f"running {path.name} failed ({type(err).__name__}: {_first_line(err)})"
        ) from err
    finally:
        sys.path.remove(directory)
    return namespace


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelFileError(
            f"{path.name} holds more than weights (a pickled object; napari-dense does not "
            "unpickle code): save model.state_dict() with torch.save, or " + _EXPORT_RECIPE
        ) from err
    except Exception as err:
        raise ModelFileError(
            f"cannot read weights from {path.name} ({type(err).__name__}: {_first_line(err)})"
        ) from err
    # Training checkpoints often wrap the state dict.
    for key in ("state_dict", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ModelFileError(
            f"{path.name} is not a state dict (name -> tensor); save model.state_dict()"
        )
    return state


def _load_state_dict(
    module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, class_name: str
) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = [
        f"{label} {_some(items)}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch (file vs class)", mismatched),
        )
        if items
    ]
    if problems:
        raise ModelFileError(
            f"{path.name} does not fit {class_name}: {'; '.join(problems)}. Check class_name and "
            "init_args"
        )
    module.load_state_dict(state, strict=True)


def _some(items: list[str], shown: int = 3) -> str:
    more = f" (+{len(items) - shown} more)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _refuse_pickle(path: Path) -> LoadedClassifier:
    """A torch.save file given as the model: weights without their class, or a pickled module."""
    _read_state_dict(path)  # raises for pickled modules
    raise ModelFileError(
        f"{path.name} holds weights but no architecture: load_classifier('net.py', "
        f"class_name='YourClass', weights='{path.name}'), or a sidecar {path.stem}.yaml naming "
        "python_file and class_name, or a .pt2 (torch.export)"
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


def _sidecar_of(path: Path) -> Path | None:
    for suffix in _SIDECAR_SUFFIXES:
        candidate = path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ModelFileError(
            f"{path.name} is not a text YAML file (byte {err.object[err.start]:#04x} at offset "
            f"{err.start} is not UTF-8): give the model's sidecar, a text file of fields (see "
            "the schema in the README)"
        ) from err
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())  # PyYAML's message spans lines
        raise ModelFileError(f"{path.name} is not valid YAML: {problem}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ModelFileError(f"{path.name} must be a mapping of fields (see the schema)")
    version = data.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path.name} has format_version {version!r}; this napari-dense reads version "
            f"{FORMAT_VERSION}"
        )
    return data


def _model_named_by(sidecar: Path, data: Mapping[str, Any]) -> Path:
    """The model file a sidecar names (``model_file``, ``python_file``, or ``<stem>.pt2``)."""
    named = _relative(sidecar.parent, data.get("model_file") or data.get("python_file"))
    if named is None:
        default = sidecar.with_suffix(".pt2")
        if default.is_file():
            return default
        raise ModelFileError(
            f"{sidecar.name} names no model: add model_file: model.pt2, or python_file, "
            "class_name and weights"
        )
    if not named.is_file():
        raise ModelFileError(f"model file not found: {named} (named in {sidecar.name})")
    return named


def _relative(base: Path, value: Any) -> Path | None:
    if value in (None, ""):
        return None
    candidate = Path(str(value)).expanduser()
    return candidate if candidate.is_absolute() else base / candidate


# --------------------------------------------------------------------------------------------
# Inferring what the metadata leaves out
# --------------------------------------------------------------------------------------------


def _exported_input_shape(program: ExportedProgram) -> tuple[int | None, ...] | None:
    """The user input's shape the program was exported with (None for dynamic dimensions)."""
    inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in inputs:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                return tuple(d if isinstance(d, int) else None for d in value.shape)
    return None


def _complete(
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
        return replace(metadata, in_channels=channels, patch_size=patch)
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
            f"channel(s) ({type(err).__name__}: {_first_line(err)}); fix patch_size/in_channels"
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _floats(values: Any) -> list[float]:
    if isinstance(values, int | float):
        return [float(values)]
    return [float(v) for v in values]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


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
        metadata = replace(
            metadata,
            in_channels=metadata.in_channels or shape[1],
            patch_size=metadata.patch_size or (shape[2], shape[3]),
        )
    # Work on an eval-mode copy: inferring the metadata runs the model, which must neither switch
    # the caller's model to eval mode nor update its BatchNorm statistics.
    if isinstance(module, ExportedModule):  # a loaded .pt2: save its program again
        module = module.exported_program
    model = module if isinstance(module, ExportedProgram) else copy.deepcopy(module).eval()
    metadata = _complete(
        model,
        replace(metadata, in_channels=None),
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
            f"{_first_line(err)}); see https://pytorch.org/docs/stable/export.html"
        ) from err
