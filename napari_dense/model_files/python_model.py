"""Models defined by a Python file: a class, its arguments and a state dict.

The Python file is *run* to build the model, so it is refused with :class:`CodeExecutionRefused`
unless ``trust_code=True``; its weights are read with ``torch.load(..., weights_only=True)``,
which unpickles tensors and containers only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from napari_dense.model_files.errors import EXPORT_RECIPE, CodeExecutionRefused, ModelFileError
from napari_dense.model_files.infer import complete, first_line, metadata_of
from napari_dense.model_files.loaded import LoadedClassifier
from napari_dense.model_files.sidecar import FILE_FIELDS, relative

__all__ = ["load_python", "read_state_dict", "refuse_pickle"]


def load_python(
    path: Path,
    data: Mapping[str, Any],
    sidecar: Path | None,
    class_name: str | None,
    weights: str | os.PathLike[str] | None,
    trust_code: bool,
) -> LoadedClassifier:
    """Build the class of ``path`` (a Python file, or weights whose sidecar names one)."""
    base = sidecar.parent if sidecar else path.parent
    if path.suffix.lower() == ".py":
        python_file = path
        weights_file = Path(weights) if weights is not None else relative(base, data.get("weights"))
    else:  # a weights file whose sidecar names the Python file
        python_file = relative(base, data.get("python_file")) or path
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
    state = read_state_dict(weights_file)
    _load_state_dict(module, state, weights_file, str(class_name))
    module.eval()
    source = sidecar.name if sidecar else python_file.name
    metadata_fields = {k: v for k, v in data.items() if k not in FILE_FIELDS}
    metadata = complete(module, *metadata_of(metadata_fields, source), source)
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
            f"{first_line(err)}); set init_args in the sidecar yaml"
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
            f"running {path.name} failed ({type(err).__name__}: {first_line(err)})"
        ) from err
    finally:
        sys.path.remove(directory)
    return namespace


def read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """A state dict (name -> tensor), unwrapped from a training checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelFileError(
            f"{path.name} holds more than weights (a pickled object; napari-dense does not "
            "unpickle code): save model.state_dict() with torch.save, or " + EXPORT_RECIPE
        ) from err
    except Exception as err:
        raise ModelFileError(
            f"cannot read weights from {path.name} ({type(err).__name__}: {first_line(err)})"
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


def refuse_pickle(path: Path) -> LoadedClassifier:
    """A torch.save file given as the model: weights without their class, or a pickled module."""
    read_state_dict(path)  # raises for pickled modules
    raise ModelFileError(
        f"{path.name} holds weights but no architecture: load_classifier('net.py', "
        f"class_name='YourClass', weights='{path.name}'), or a sidecar {path.stem}.yaml naming "
        "python_file and class_name, or a .pt2 (torch.export)"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
