"""Load a ``.pt2`` (torch.export program): checked archive in, :class:`LoadedClassifier` out.

The archive is checked before torch reads it (:mod:`.archive`), torch reads the checked bytes
with every ``torch.load`` forced to ``weights_only=True``, and the loaded graph is checked
again: every node calls a torch operator or an allowed arithmetic function.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from napari_dense.convert import ExportedModule
from napari_dense.model_files import archive
from napari_dense.model_files.errors import ModelFileError
from napari_dense.model_files.graph_checks import REEXPORT, SAFE_FUNCTION_TARGETS
from napari_dense.model_files.infer import complete, first_line, metadata_of
from napari_dense.model_files.loaded import LoadedClassifier
from napari_dense.model_files.metadata import METADATA_ENTRY
from napari_dense.model_files.sidecar import FILE_FIELDS

__all__ = ["load_exported"]


def load_exported(
    path: Path, data: Mapping[str, Any], sidecar: Path | None, max_bytes: int | None
) -> LoadedClassifier:
    """Load the program at ``path`` with its metadata (embedded, then ``data`` of the sidecar)."""
    try:
        checked = archive.check_export_archive(path, max_bytes)
    except archive.ArchiveProblem as err:
        raise ModelFileError(f"{path.name} is refused: {err}") from err
    extra = {METADATA_ENTRY: ""}
    try:
        # The checked bytes, not the file again (it may have changed since).
        with archive.weights_only_loads(), _quiet_torch_logs():
            program = torch.export.load(io.BytesIO(checked.for_torch()), extra_files=extra)
    except Exception as err:
        raise ModelFileError(
            f"torch.export.load cannot read {path.name} ({type(err).__name__}: "
            f"{first_line(err)}); save it with torch.export.save (an AOTInductor package or a "
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
    merged = {**embedded, **{k: v for k, v in data.items() if k not in FILE_FIELDS}}
    source = f"{path.name}" + (f" + {sidecar.name}" if sidecar else "")
    metadata = complete(program, *metadata_of(merged, source), source)
    module = ExportedModule(program)
    digest = hashlib.sha256(checked.data).hexdigest()
    return LoadedClassifier(module, metadata, path.resolve(), digest, sidecar)


@contextmanager
def _quiet_torch_logs() -> Iterator[None]:
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
                    f"not a torch operator; {REEXPORT}"
                )


def _allowed_functions() -> list[Any]:
    import operator

    functions = []
    for name in SAFE_FUNCTION_TARGETS:
        module_name, attribute = name.rsplit(".", 1)
        module = {"_operator": operator, "math": math, "torch": torch}[module_name]
        if hasattr(module, attribute):
            functions.append(getattr(module, attribute))
    return functions
