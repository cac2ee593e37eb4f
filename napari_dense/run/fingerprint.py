"""The fingerprint of a run: what must be equal for a resumed run to continue the same map.

:func:`run_fingerprint` is stored in the store's provenance when a run starts;
:func:`check_resume` compares it with the fingerprint of the run asking to resume and refuses,
listing every difference, unless they are equal. Covered: the network (architecture and weights,
SHA-256), the model file's SHA-256, sampling per layer, patch size, border, interpolation,
normalisation, activation, precision, NaN policy, output dtype, tile size, class names, the output
shape and the image (resolved path, shape as stored, level, a cheap content identity).

The image's content identity: the SHA-256 of all its pixels when it is small (≤ 16 MiB), else of
a few windows (corners and centre of the first and last plane); for files and Zarr folders also the
size and modification time of the file, or of the Zarr metadata files. Not covered on purpose:
the device and ``compile`` (same model, same numbers up to float rounding).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import dask
import numpy as np
import torch

from napari_dense.errors import InputError

__all__ = [
    "FINGERPRINT_KEY",
    "Difference",
    "ResumeMismatchError",
    "check_resume",
    "differences",
    "image_identity",
    "network_sha256",
    "run_fingerprint",
]

#: Key of the fingerprint inside the store's ``napari_dense`` provenance.
FINGERPRINT_KEY: Final = "fingerprint"
#: Version of the fingerprint's layout: stores with another version cannot be compared.
FINGERPRINT_VERSION: Final = 1
#: Images up to this size (as stored) are hashed whole.
_WHOLE_IMAGE_BYTES: Final = 16 * 2**20
#: Side of the windows hashed in larger images.
_WINDOW: Final = 64
#: Zarr metadata files whose size and modification time identify a Zarr input.
_ZARR_METADATA: Final = ("zarr.json", ".zarray", ".zgroup", ".zattrs")

#: Human names of the fingerprint's entries, in the order differences are listed.
LABELS: Final = {
    "version": "fingerprint version",
    "network_sha256": "model (network and weights)",
    "model_file_sha256": "model file",
    "patch_size": "patch size",
    "sampling": "sampling per layer (mode)",
    "border": "border",
    "interpolation": "interpolation",
    "normalisation": "normalisation",
    "activation": "activation",
    "precision": "precision",
    "non_finite": "NaN policy",
    "dtype": "output dtype",
    "tile": "tile size",
    "class_names": "class names",
    "output_shape": "output shape",
    "image.path": "image path",
    "image.shape": "image shape",
    "image.level": "image level",
    "image.dtype": "image dtype",
    "image.files": "image file (size, modification time)",
    "image.content_sha256": "image content",
}


class ResumeMismatchError(InputError):
    """The store was started by another run (other model, settings or image); resume refused.

    Attributes
    ----------
    differences : tuple[Difference, ...]
        What differs, one entry per fingerprint item.
    """

    def __init__(self, message: str, differences: Sequence[Difference]) -> None:
        super().__init__(message)
        self.differences: tuple[Difference, ...] = tuple(differences)


@dataclass(frozen=True)
class Difference:
    """One fingerprint item that differs between the stored run and the resuming one."""

    key: str
    stored: Any
    current: Any

    @property
    def label(self) -> str:
        """Human name of the item (e.g. ``"border"``)."""
        return LABELS.get(self.key, self.key)

    def __str__(self) -> str:
        return f"{self.label} {_short(self.stored)} → {_short(self.current)}"


def network_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a network's structure (fx code or ``repr``) and of every parameter and buffer."""
    digest = hashlib.sha256()
    code = getattr(getattr(module, "network", module), "code", None)
    digest.update(str(code if code is not None else module).encode())
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def image_identity(
    array: Any,
    *,
    path: str | None,
    source_shape: Sequence[int],
    level: int = 0,
) -> dict[str, Any]:
    """Path, shape and a cheap content identity of the image a run reads.

    Parameters
    ----------
    array
        The source as the run reads it (a dask array ``(leading..., C, Y, X)``).
    path
        The image's path (None for in-memory arrays).
    source_shape
        Shape as stored.
    level
        Resolution level the run reads (the channel axis needs no entry: the content is hashed
        as the run sees it, channels first).
    """
    resolved = str(Path(path).resolve()) if path is not None else None
    return {
        "path": resolved,
        "shape": [int(size) for size in source_shape],
        "level": int(level),
        "dtype": str(array.dtype),
        "files": _file_stats(Path(resolved)) if resolved is not None else None,
        "content_sha256": _content_sha256(array, path),
    }


def run_fingerprint(
    *,
    network: torch.nn.Module,
    model_file_sha256: str | None,
    patch_size: Sequence[int],
    sampling: Any,
    border: str,
    interpolation: str,
    normalisation: Mapping[str, Any] | None,
    activation: str,
    precision: str,
    non_finite: str | None,
    dtype: str,
    tile: Sequence[int],
    class_names: Sequence[str],
    output_shape: Sequence[int],
    image: Mapping[str, Any],
) -> dict[str, Any]:
    """The fingerprint stored when a run starts (JSON-serialisable; see the module docstring)."""
    return {
        "version": FINGERPRINT_VERSION,
        "network_sha256": network_sha256(network),
        "model_file_sha256": model_file_sha256,
        "patch_size": [int(size) for size in patch_size],
        "sampling": _plain(sampling),
        "border": border,
        "interpolation": interpolation,
        "normalisation": _plain(dict(normalisation)) if normalisation else None,
        "activation": activation,
        "precision": precision,
        "non_finite": non_finite,
        "dtype": str(np.dtype(dtype).name),
        "tile": [int(size) for size in tile],
        "class_names": [str(name) for name in class_names],
        "output_shape": [int(size) for size in output_shape],
        "image": _plain(dict(image)),
    }


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[Difference]:
    """Every item of the two fingerprints that differs (nested ``image`` items one by one)."""
    flat_stored, flat_current = _flatten(stored), _flatten(current)
    keys = [key for key in LABELS if key in flat_stored or key in flat_current]
    keys += sorted((set(flat_stored) | set(flat_current)) - set(keys))
    return [
        Difference(key, flat_stored.get(key), flat_current.get(key))
        for key in keys
        if flat_stored.get(key) != flat_current.get(key)
    ]


def check_resume(path: Path, stored: Any, current: Mapping[str, Any]) -> None:
    """Refuse (:class:`ResumeMismatchError`) unless ``stored`` equals ``current``.

    Parameters
    ----------
    path
        The store (named in the message).
    stored
        The fingerprint found in the store (None for stores written before fingerprints).
    current
        :func:`run_fingerprint` of the run asking to resume.
    """
    fix = "resume with the same image, model and settings, or pass overwrite=True (--overwrite)"
    if not isinstance(stored, Mapping):
        raise ResumeMismatchError(
            f"{path} has no run fingerprint (written by an older napari-dense), so resuming could "
            f"mix two runs; {fix} to start again",
            [Difference("version", None, current.get("version"))],
        )
    found = differences(stored, current)
    if found:
        listed = "; ".join(str(item) for item in found)
        raise ResumeMismatchError(
            f"{path} was started by another run ({listed}); {fix} to start again", found
        )


# ---------------------------------------------------------------------- helpers


def _file_stats(path: Path) -> list[list[Any]]:
    """``[name, size, mtime_ns]`` of a file, or of a Zarr folder's metadata files."""
    candidates = [path] if path.is_file() else [path / name for name in _ZARR_METADATA]
    stats = []
    for candidate in candidates:
        try:
            info = candidate.stat()
        except OSError:
            continue
        stats.append([candidate.name, info.st_size, info.st_mtime_ns])
    return stats


def _content_sha256(array: Any, path: str | None = None) -> str:
    """SHA-256 of all pixels (small images) or of a few windows (corners and centre).

    A window that cannot be read (a damaged chunk) raises the engine's one-line error naming
    the chunk, before any store is created.
    """
    digest = hashlib.sha256(f"{array.dtype}:{tuple(array.shape)}".encode())
    leading = array.shape[:-3]
    height, width = array.shape[-2:]
    if array.size * array.dtype.itemsize <= _WHOLE_IMAGE_BYTES:
        regions = [(plane, (0, height, 0, width)) for plane in np.ndindex(*leading)]
    else:
        planes = {tuple(0 for _ in leading), tuple(size - 1 for size in leading)}
        side_y, side_x = min(_WINDOW, height), min(_WINDOW, width)
        corners = {
            (0, 0),
            (0, width - side_x),
            (height - side_y, 0),
            (height - side_y, width - side_x),
        }
        starts = sorted(corners | {((height - side_y) // 2, (width - side_x) // 2)})
        regions = [
            (plane, (y, y + side_y, x, x + side_x)) for plane in sorted(planes) for y, x in starts
        ]
    blocks = [
        array[(*plane, slice(None), slice(y0, y1), slice(x0, x1))]
        for plane, (y0, y1, x0, x1) in regions
    ]
    # One synchronous compute: reading a few windows needs no thread pool.
    try:
        computed = dask.compute(*blocks, scheduler="synchronous")
    except Exception as err:
        from napari_dense.io.sources import unreadable_error

        for (plane, box), block in zip(regions, blocks, strict=True):
            try:
                block.compute(scheduler="synchronous")
            except Exception:
                raise unreadable_error(array, plane, box, path, err) from err
        raise
    for block in computed:
        digest.update(np.ascontiguousarray(block).tobytes())
    return digest.hexdigest()


def _flatten(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    flat = {key: value for key, value in fingerprint.items() if key != "image"}
    image = fingerprint.get("image")
    if isinstance(image, Mapping):
        flat.update({f"image.{key}": value for key, value in image.items()})
    return flat


def _plain(value: Any) -> Any:
    """Tuples as lists, numpy scalars as Python numbers: the form a JSON round trip gives."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a SHA-256
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
