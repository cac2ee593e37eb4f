"""Check a ``.pt2`` archive before torch reads it: intact, of bounded size, and data only.

:func:`torch.export.load` can run code from an archive in several places: it unpickles sample
inputs (``data/sample_inputs/*.pt``, falling back to an unrestricted ``torch.load`` when the safe
one fails), weights and constants marked ``use_pickle`` (``torch.load(..., weights_only=False)``)
and opaque or TorchBind constants (``pickle.loads``); it evaluates every symbolic-shape string of
the graph with ``sympy.sympify`` (an ``eval``); ``ExportedProgram.module()`` ``exec``-s the
program's ``guards_code``; and a graph node's target is looked up by name under ``torch``,
``math`` or ``operator`` and called when the program runs. :func:`check_export_archive` refuses
all of these from the archive's bytes, before torch sees them:

- the zip must be intact (every entry's CRC-32 is verified), hold at most
  :data:`MAX_ENTRIES` entries, no two entries whose names differ only in case (torch's reader
  matches names case-insensitively), and declare at most ``max_bytes`` once decompressed
  (default :data:`DEFAULT_MAX_BYTES`, raised with the ``max_archive_bytes=`` keyword of
  :func:`napari_dense.load_classifier` or the environment variable :data:`MAX_BYTES_ENV`);
- only the entries ``torch.export.save`` writes for a plain program: raw weight and tensor
  constant files, JSON configs, the graph JSON, sample inputs and ``extra/`` text files; no
  pickled weight or constant, no legacy ``.pt`` weights, no AOTInductor or custom objects;
- the graph JSON (:mod:`.graph_checks`): targets only ``torch.ops.<namespace>.<op>[.<overload>]``
  and a few arithmetic functions, symbolic expressions only sympy constructors of symbols and
  numbers, guards only comparisons of input sizes;
- sample inputs (:mod:`.pickle_scan`; a pickle ``torch.save`` writes even for plain tensors) may
  name only the globals of tensors, read from the pickle's opcodes without running it; torch
  then gets the archive with them emptied (:meth:`CheckedArchive.for_torch`).

Nothing in the archive is unpickled, by napari-dense or by torch. :func:`weights_only_loads`
also forces every ``torch.load`` inside torch's loading to ``weights_only=True`` (belt and
braces).
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_dense.model_files.errors import REEXPORT, ArchiveProblem
from napari_dense.model_files.graph_checks import check_graph
from napari_dense.model_files.pickle_scan import check_sample_inputs

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_BYTES_ENV",
    "MAX_ENTRIES",
    "ArchiveProblem",
    "CheckedArchive",
    "check_export_archive",
    "max_archive_bytes",
    "weights_only_loads",
]

#: Largest decompressed size of a ``.pt2`` accepted by default: 2 GiB (a patch classifier's
#: weights are megabytes; a ResNet-152 in float32 is 240 MB).
DEFAULT_MAX_BYTES = 2 * 1024**3
#: Environment variable that raises (or lowers) the limit, in bytes.
MAX_BYTES_ENV = "NAPARI_DENSE_MAX_MODEL_BYTES"
#: Most entries accepted in one archive (torch writes one per weight tensor).
MAX_ENTRIES = 100_000

_FIXED_ENTRIES = frozenset(
    {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
)
_FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_UNSAFE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_ENV_LOCK = threading.Lock()


@dataclass(frozen=True)
class CheckedArchive:
    """The bytes of an archive that passed :func:`check_export_archive` (load these, not the
    file again: it may change in between).

    Attributes
    ----------
    data
        The whole file, as checked (its SHA-256 is the model's).
    root
        The archive's top folder (torch puts every entry under one).
    entries
        Entry names below ``root``.
    """

    data: bytes
    root: str
    entries: tuple[str, ...]

    def for_torch(self) -> bytes:
        """The archive as torch gets it: the same entries, sample inputs emptied.

        torch unpickles sample inputs; napari-dense does not need them, so torch reads none
        (an empty entry means "no sample inputs" to :func:`torch.export.load`), and nothing
        in the archive is unpickled at all.
        """
        output = io.BytesIO()
        with (
            zipfile.ZipFile(io.BytesIO(self.data)) as source,
            zipfile.ZipFile(output, "w", zipfile.ZIP_STORED) as target,
        ):
            for info in source.infolist():
                relative = info.filename[len(self.root) + 1 :]
                emptied = relative.startswith("data/sample_inputs/")
                target.writestr(info.filename, b"" if emptied else source.read(info))
        return output.getvalue()


def max_archive_bytes(limit: int | None = None) -> int:
    """The size limit: ``limit`` if given, else :data:`MAX_BYTES_ENV`, else the default."""
    if limit is not None:
        if int(limit) < 1:
            raise ArchiveProblem(f"max_archive_bytes must be a positive number, got {limit}")
        return int(limit)
    text = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value < 1:
        raise ArchiveProblem(f"{MAX_BYTES_ENV}={text!r} is not a positive number of bytes")
    return value


def check_export_archive(path: Path, max_bytes: int | None = None) -> CheckedArchive:
    """Read ``path`` once and check it as described in the module docstring.

    Parameters
    ----------
    path
        A ``.pt2`` written by :func:`torch.export.save`.
    max_bytes
        Size limit in bytes (see :func:`max_archive_bytes`).

    Returns
    -------
    CheckedArchive

    Raises
    ------
    ArchiveProblem
        One line naming what was found and what to do.
    """
    limit = max_archive_bytes(max_bytes)
    size = path.stat().st_size
    if size > limit:
        raise ArchiveProblem(_too_big(f"the file has {size:,} bytes", limit))
    with path.open("rb") as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:  # grew while being read
        raise ArchiveProblem(_too_big(f"the file has over {limit:,} bytes", limit))
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ArchiveProblem(
            f"not an intact zip archive ({err}): the file is damaged or incomplete; copy it "
            "again or save it again with torch.export.save"
        ) from err
    with archive:
        infos = archive.infolist()
        root, entries = _layout(infos)
        declared = sum(info.file_size for info in infos)
        if declared > limit:
            raise ArchiveProblem(_too_big(f"its entries declare {declared:,} bytes", limit))
        contents = _verified_contents(archive, infos, root)
    _check_entries(entries, contents)
    _check_same_in_torch(data, entries, contents)
    return CheckedArchive(data, root, tuple(entries))


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in the block runs with ``weights_only=True`` (torch's own switch)."""
    with _ENV_LOCK:
        saved = {name: os.environ.get(name) for name in (_FORCE_ENV, _UNSAFE_ENV)}
        os.environ[_FORCE_ENV] = "1"
        os.environ.pop(_UNSAFE_ENV, None)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


# --------------------------------------------------------------------------------------------
# The zip container
# --------------------------------------------------------------------------------------------


def _too_big(found: str, limit: int) -> str:
    return (
        f"{found}, more than the limit of {limit:,} bytes for a patch classifier (a zip bomb, "
        f"or a very large model); if you trust it, raise the limit with "
        f"load_classifier(..., max_archive_bytes=N) or the environment variable "
        f"{MAX_BYTES_ENV}=N"
    )


def _layout(infos: list[zipfile.ZipInfo]) -> tuple[str, list[str]]:
    """The top folder and the entry names below it; refuses layouts readers disagree on."""
    if len(infos) > MAX_ENTRIES:
        raise ArchiveProblem(
            f"the archive has {len(infos):,} entries (at most {MAX_ENTRIES:,} accepted): {REEXPORT}"
        )
    if not infos:
        raise ArchiveProblem("the archive is empty; save the model again with torch.export.save")
    root = infos[0].filename.split("/", 1)[0]
    seen: set[str] = set()
    entries = []
    for info in infos:
        name = info.filename
        if not name.startswith(root + "/") or name.endswith("/"):
            raise ArchiveProblem(
                f"entry {name!r} is not a file under the archive's folder {root!r}: not a "
                f"torch.export.save archive; {REEXPORT}"
            )
        if name.lower() in seen:
            raise ArchiveProblem(
                f"entry {name!r} appears twice (zip readers may pick different copies); {REEXPORT}"
            )
        seen.add(name.lower())
        entries.append(name[len(root) + 1 :])
    return root, entries


def _verified_contents(
    archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], root: str
) -> dict[str, bytes]:
    """Read every entry (zipfile checks its CRC-32); keep the ones inspected further."""
    kept: dict[str, bytes] = {}
    for info in infos:
        relative = info.filename[len(root) + 1 :]
        keep = not _is_raw_tensor(relative)
        chunks = []
        try:
            with archive.open(info) as stream:
                while block := stream.read(1 << 20):
                    if keep:
                        chunks.append(block)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as err:
            raise ArchiveProblem(
                f"entry {relative!r} is damaged ({err}): the file was altered or truncated "
                "(flipped bytes, an incomplete copy); copy it again from its source"
            ) from err
        if keep:
            kept[relative] = b"".join(chunks)
    return kept


def _is_raw_tensor(name: str) -> bool:
    return bool(re.fullmatch(r"data/weights/weight_[0-9]+|data/constants/tensor_[0-9]+", name))


# --------------------------------------------------------------------------------------------
# What the entries hold
# --------------------------------------------------------------------------------------------


def _check_entries(entries: list[str], contents: dict[str, bytes]) -> None:
    models = [n[len("models/") : -len(".json")] for n in entries if _is_model_json(n)]
    if not models or contents.get("archive_format") != b"pt2":
        kind = "a TorchScript archive" if any("code/" in n for n in entries) else "no models/*.json"
        raise ArchiveProblem(f"the archive is not a torch.export program ({kind}); {REEXPORT}")
    allowed_configs = {
        f"data/{part}/{model}_{part}_config.json"
        for model in models
        for part in ("weights", "constants")
    }
    samples = {f"data/sample_inputs/{model}.pt" for model in models}
    for name in entries:
        if not (
            name in _FIXED_ENTRIES
            or _is_model_json(name)
            or _is_raw_tensor(name)
            or name in allowed_configs
            or name in samples
            or (name.startswith("extra/") and len(name) > len("extra/"))
        ):
            raise ArchiveProblem(
                f"{_describe_entry(name)}; napari-dense loads data only: {REEXPORT}"
            )
    for model in models:
        for part in ("weights", "constants"):
            name = f"data/{part}/{model}_{part}_config.json"
            if name not in contents:
                raise ArchiveProblem(
                    f"{name} is missing: not a complete torch.export archive; {REEXPORT}"
                )
            _check_payload_config(name, _json(name, contents[name]), part, entries)
        check_graph(
            f"models/{model}.json", _json(f"models/{model}.json", contents[f"models/{model}.json"])
        )
        sample = f"data/sample_inputs/{model}.pt"
        if sample not in contents:
            raise ArchiveProblem(
                f"{sample} is missing: not a complete torch.export archive; {REEXPORT}"
            )
        check_sample_inputs(sample, contents[sample])
    for name, text in contents.items():
        if name.startswith("extra/"):
            try:
                text.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ArchiveProblem(
                    f"extra file {name} is not UTF-8 text ({err}); {REEXPORT}"
                ) from err


def _is_model_json(name: str) -> bool:
    return bool(re.fullmatch(r"models/[A-Za-z0-9_]+\.json", name))


def _describe_entry(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    if base.startswith(("custom_obj_", "opaque_obj_")):
        return f"the archive holds a pickled Python object ({name})"
    if name.startswith("data/aotinductor/"):
        return f"the archive holds compiled AOTInductor code ({name})"
    if name.endswith((".pt", ".pkl", ".pth")):
        return f"the archive holds a pickle ({name}, legacy torch.export weights or other)"
    return f"the archive holds an entry torch.export.save does not write ({name})"


def _json(name: str, raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArchiveProblem(f"{name} is not valid JSON ({err}); {REEXPORT}") from err


def _check_payload_config(name: str, config: Any, part: str, entries: list[str]) -> None:
    payloads = config.get("config") if isinstance(config, dict) else None
    if not isinstance(payloads, dict):
        raise ArchiveProblem(f"{name} is not a torch.export payload config; {REEXPORT}")
    prefix = "weight_" if part == "weights" else "tensor_"
    for fqn, meta in payloads.items():
        file = meta.get("path_name") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise ArchiveProblem(
                f"the {part[:-1]} {fqn!r} ({file}) is stored as a pickle, which can run code "
                f"(a tensor subclass or a Python object); {REEXPORT}"
            )
        if not (
            isinstance(file, str) and file.startswith(prefix) and f"data/{part}/{file}" in entries
        ):
            raise ArchiveProblem(
                f"the {part[:-1]} {fqn!r} names no raw tensor file ({file!r}); {REEXPORT}"
            )


def _check_same_in_torch(data: bytes, entries: list[str], contents: dict[str, bytes]) -> None:
    """torch's zip reader (miniz) must see the same entries and bytes as Python's zipfile."""
    import torch

    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = sorted(reader.get_all_records())
        differs = records != sorted(entries) or any(
            bytes(reader.get_record(name)) != raw for name, raw in contents.items()
        )
    except RuntimeError as err:
        raise ArchiveProblem(
            f"torch cannot read the archive ({' '.join(str(err).split())[:160]}); save it again "
            "with torch.export.save"
        ) from err
    if differs:
        raise ArchiveProblem(
            f"torch's zip reader sees other entries than Python's (a crafted archive); {REEXPORT}"
        )
