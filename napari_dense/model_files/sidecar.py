"""Sidecar files: find them, read them (checked against :class:`~.metadata.Sidecar`), resolve
the files they name, and their JSON Schema (shipped as ``sidecar.schema.json``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from napari_dense.model_files.errors import ModelFileError
from napari_dense.model_files.metadata import FORMAT_VERSION, ModelMetadata, Sidecar

__all__ = [
    "FILE_FIELDS",
    "SCHEMA_FILE",
    "SIDECAR_SUFFIXES",
    "model_named_by",
    "read_sidecar",
    "relative",
    "sidecar_of",
    "sidecar_schema",
    "write_schema",
]

SIDECAR_SUFFIXES = (".yaml", ".yml")
#: Sidecar fields that say where the model is, not what it is.
FILE_FIELDS = tuple(name for name in Sidecar.model_fields if name not in ModelMetadata.model_fields)
#: The JSON Schema of sidecars, as shipped with the package (see :func:`sidecar_schema`).
SCHEMA_FILE = Path(__file__).with_name("sidecar.schema.json")


def sidecar_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a sidecar ``.yaml`` (the content of
    :data:`SCHEMA_FILE`; editors and CI can validate sidecars with it)."""
    schema = Sidecar.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def sidecar_of(path: Path) -> Path | None:
    """The sidecar next to a model file (``<stem>.yaml`` or ``.yml``), if there is one."""
    for suffix in SIDECAR_SUFFIXES:
        candidate = path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def read_sidecar(path: Path) -> dict[str, Any]:
    """The fields a sidecar gives, checked against the schema (as validated values)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ModelFileError(
            f"{path.name} is not a text YAML file (byte {err.object[err.start]:#04x} at offset "
            f"{err.start} is not UTF-8): give the model's sidecar, a text file of fields (see "
            f"the schema {SCHEMA_FILE.name})"
        ) from err
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())  # PyYAML's message spans lines
        raise ModelFileError(f"{path.name} is not valid YAML: {problem}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ModelFileError(
            f"{path.name} must be a mapping of fields (see the schema {SCHEMA_FILE.name})"
        )
    version = data.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path.name} has format_version {version!r}; this napari-dense reads version "
            f"{FORMAT_VERSION}"
        )
    sidecar = Sidecar.from_dict(data, path.name)
    return sidecar.model_dump(exclude_unset=True)


def model_named_by(sidecar: Path, data: Mapping[str, Any]) -> Path:
    """The model file a sidecar names (``model_file``, ``python_file``, or ``<stem>.pt2``)."""
    named = relative(sidecar.parent, data.get("model_file") or data.get("python_file"))
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


def relative(base: Path, value: Any) -> Path | None:
    """``value`` as a path, relative ones resolved in ``base``; None when not given."""
    if value in (None, ""):
        return None
    candidate = Path(str(value)).expanduser()
    return candidate if candidate.is_absolute() else base / candidate


def write_schema(path: Path = SCHEMA_FILE) -> Path:
    """Write :func:`sidecar_schema` to ``path`` (after changing the schema)."""
    path.write_text(json.dumps(sidecar_schema(), indent=2) + "\n", encoding="utf-8")
    return path
