"""Lazy image sources: numpy, dask, zarr, OME-Zarr and TIFF, as ``(leading..., C, Y, X)``.

Nothing is read until a tile asks for its window, so images of any size open instantly and are
processed in constant memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from .errors import InputError

__all__ = ["ImageSource", "open_image"]


@dataclass(frozen=True)
class ImageSource:
    """An image seen as ``(leading..., C, Y, X)``; leading axes (Z, T) are processed plane by plane.

    Attributes
    ----------
    array
        The lazy dask array in that axis order.
    path
        Where it came from (None for in-memory arrays).
    source_shape
        Shape as stored, before moving the channel axis.
    """

    array: da.Array
    path: str | None
    source_shape: tuple[int, ...]

    @property
    def leading_shape(self) -> tuple[int, ...]:
        """Shape of the Z/T axes (empty for a single plane)."""
        return tuple(self.array.shape[:-3])

    @property
    def channels(self) -> int:
        """Number of channels."""
        return int(self.array.shape[-3])

    @property
    def plane_shape(self) -> tuple[int, int]:
        """``(H, W)``."""
        return (int(self.array.shape[-2]), int(self.array.shape[-1]))

    def read_window(
        self, leading: tuple[int, ...], rows: np.ndarray, cols: np.ndarray
    ) -> np.ndarray:
        """Gather ``(C, len(rows), len(cols))`` float32 pixels; index ``-1`` reads as zero.

        Reads only the bounding box of the requested rows and columns (one contiguous block),
        then gathers: border reflection near the edge reuses pixels of that block.
        """
        valid_rows, valid_cols = rows[rows >= 0], cols[cols >= 0]
        window = np.zeros((self.channels, len(rows), len(cols)), dtype=np.float32)
        if not len(valid_rows) or not len(valid_cols):
            return window
        r0, r1 = int(valid_rows.min()), int(valid_rows.max()) + 1
        c0, c1 = int(valid_cols.min()), int(valid_cols.max()) + 1
        block = self.array[(*leading, slice(None), slice(r0, r1), slice(c0, c1))]
        # Tiles are already read in a background thread: no nested dask thread pool.
        (pixels,) = dask.compute(block, scheduler="synchronous")
        pixels = np.asarray(pixels, dtype=np.float32)
        row_ok, col_ok = rows >= 0, cols >= 0
        gathered = pixels[:, rows[row_ok] - r0][:, :, cols[col_ok] - c0]
        window[np.ix_(np.arange(self.channels), np.flatnonzero(row_ok), np.flatnonzero(col_ok))] = (
            gathered
        )
        return window


def _read_path(path: Path, level: int) -> tuple[Any, int | None]:
    """Open a file lazily; returns the array-like and the channel axis its metadata names."""
    if not path.exists():
        raise InputError(f"image file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile
        import zarr

        node = zarr.open(tifffile.imread(path, aszarr=True, level=level), mode="r")
        return node, None
    if suffix == ".npy":
        return np.load(path, mmap_mode="r"), None
    if path.is_dir() or suffix == ".zarr":
        return _read_zarr(path, level)
    from skimage import io

    return io.imread(path), None


def _read_zarr(path: Path, level: int) -> tuple[Any, int | None]:
    import zarr

    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        return node, None
    attrs: dict[str, Any] = dict(node.attrs)
    multiscales = (attrs.get("ome") or attrs).get("multiscales")
    if not multiscales:
        raise InputError(
            f"{path} is a zarr group but not an OME-Zarr image (no 'multiscales'); "
            "pass the path of an array inside it"
        )
    datasets = multiscales[0]["datasets"]
    if not 0 <= level < len(datasets):
        raise InputError(f"{path} has levels 0-{len(datasets) - 1}; level {level} does not exist")
    axes = [a["name"] if isinstance(a, dict) else a for a in multiscales[0].get("axes", [])]
    channel_axis = axes.index("c") if "c" in axes else None
    return node[datasets[level]["path"]], channel_axis


def _guess_channel_axis(shape: tuple[int, ...], channels: int | None) -> int | None:
    """Channel axis of an image with ≥ 3 axes, from the model's channel count."""
    if channels is None:
        return len(shape) - 1 if shape[-1] <= 4 else len(shape) - 3
    if channels > 1 and shape[-1] == channels:
        return len(shape) - 1
    if shape[-3] == channels and channels > 1:
        return len(shape) - 3
    if channels == 1:
        return None  # every axis before (Y, X) is a Z/T axis
    raise InputError(
        f"the model expects {channels} channel(s) but no axis of the image {shape} next to "
        f"(Y, X) has that size; pass channel_axis=... (CLI: --channel-axis) or convert the image"
    )


def open_image(
    image: Any,
    *,
    channels: int | None = None,
    channel_axis: int | None = None,
    level: int = 0,
) -> ImageSource:
    """Open ``image`` lazily as ``(leading..., C, Y, X)``.

    Parameters
    ----------
    image
        A numpy or dask array, a zarr array, or a path: ``.zarr`` (array or OME-Zarr group),
        ``.tif``/``.tiff`` (read lazily through tifffile's zarr store), ``.npy`` (memory-mapped),
        or any format scikit-image reads (in memory).
    channels
        Channels the model expects; used to find the channel axis when not given.
    channel_axis
        Axis of the channels as stored (negative counts from the end). OME-Zarr metadata
        provides it; otherwise it is inferred: the last axis, or the one before (Y, X), whose
        size equals ``channels``; 2-D images and one-channel models without such an axis get one.
    level
        Resolution level of an OME-Zarr or pyramidal TIFF (0 = full resolution).
    """
    path = None
    if isinstance(image, str | Path):
        path = str(image)
        image, metadata_axis = _read_path(Path(image), level)
        channel_axis = channel_axis if channel_axis is not None else metadata_axis
    if isinstance(image, da.Array):
        array = image
    else:
        # A chunked store (zarr, tifffile's zarr store) is read in its own chunks: dask's
        # "auto" chunks of up to 128 MiB would read far more than a tile needs.
        chunks = getattr(image, "chunks", None)
        array = da.from_array(image, chunks=tuple(chunks) if chunks else "auto")
    shape = tuple(int(s) for s in array.shape)
    if array.dtype.kind not in "biuf":
        raise InputError(f"image dtype {array.dtype} is not numeric; convert it to a number type")
    if array.ndim < 2:
        raise InputError(f"expected an image with at least 2 axes (Y, X), got shape {shape}")
    if array.ndim == 2:
        axis = None
    elif channel_axis is not None:
        axis = channel_axis % array.ndim
        if not (axis == array.ndim - 1 or axis < array.ndim - 2) or channel_axis >= array.ndim:
            raise InputError(
                f"channel_axis={channel_axis} is neither the last axis nor an axis before (Y, X) "
                f"of the image {shape}"
            )
    else:
        axis = _guess_channel_axis(shape, channels)
    if axis is None:
        array = array[..., None, :, :]
    else:
        array = da.moveaxis(array, axis, -3)
    if channels is not None and array.shape[-3] != channels:
        fix = "drop or merge channels" if array.shape[-3] > channels else "pass channel_axis=..."
        raise InputError(
            f"the model expects {channels} channel(s) but the image {shape} has "
            f"{array.shape[-3]}; {fix}"
        )
    return ImageSource(array=array, path=path, source_shape=shape)
