"""Lazy image sources: numpy, dask, zarr, OME-Zarr and TIFF, as ``(leading..., C, Y, X)``.

Nothing is read until a tile asks for its window, so images of any size open instantly and are
processed in constant memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from napari_dense.errors import InputError
from napari_dense.io.image import guess_channel_axis
from napari_dense.io.physical import PhysicalSpace, from_ome_zarr, from_tiff

__all__ = ["ImageSource", "open_image", "unreadable_error"]


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
    space
        Pixel size, offset, units and channel names from the image's metadata
        (:mod:`napari_dense.io.physical`); the default (1 per pixel, no units) without.
    """

    array: da.Array
    path: str | None
    source_shape: tuple[int, ...]
    space: PhysicalSpace = field(default_factory=PhysicalSpace)

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
        self, leading: tuple[int, ...], rows: np.ndarray, cols: np.ndarray,
        dtype: np.dtype[Any] | type | str = np.float32,
    ) -> np.ndarray:  # fmt: skip
        """Gather ``(C, len(rows), len(cols))`` pixels as ``dtype``; index ``-1`` reads as zero.

        Reads only the bounding box of the requested rows and columns (one contiguous block),
        then gathers: border reflection near the edge reuses pixels of that block. ``dtype``
        float32 by default; the engine passes the stored dtype where it travels to the device
        as it is (:func:`napari_dense.run._transfer.transfer_dtype`).
        """
        valid_rows, valid_cols = rows[rows >= 0], cols[cols >= 0]
        window = np.zeros((self.channels, len(rows), len(cols)), dtype=dtype)
        if not len(valid_rows) or not len(valid_cols):
            return window
        r0, r1 = int(valid_rows.min()), int(valid_rows.max()) + 1
        c0, c1 = int(valid_cols.min()), int(valid_cols.max()) + 1
        block = self.array[(*leading, slice(None), slice(r0, r1), slice(c0, c1))]
        # Tiles are already read in a background thread: no nested dask thread pool.
        (pixels,) = dask.compute(block, scheduler="synchronous")
        pixels = np.asarray(pixels, dtype=dtype)
        row_ok, col_ok = rows >= 0, cols >= 0
        gathered = pixels[:, rows[row_ok] - r0][:, :, cols[col_ok] - c0]
        window[np.ix_(np.arange(self.channels), np.flatnonzero(row_ok), np.flatnonzero(col_ok))] = (
            gathered
        )
        return window


def unreadable_error(
    array: da.Array,
    leading: tuple[int, ...],
    box: tuple[int, int, int, int],
    path: str | None,
    err: BaseException,
) -> InputError:
    """A one-line error naming the first stored chunk of ``box`` that cannot be read.

    ``array`` is ``(leading..., C, Y, X)``; ``box`` is ``(y0, y1, x0, x1)`` of the read that
    failed with ``err``. Each chunk of the box is read again, alone, to find the damaged one.
    """
    y0, y1, x0, x1 = box
    block = array[(*leading, slice(None), slice(y0, y1), slice(x0, x1))]
    bounds = [np.cumsum((0, *axis)) for axis in array.chunks[-2:]]
    where = f"rows {y0}:{y1}, columns {x0}:{x1}"
    for index in np.ndindex(*block.numblocks):
        try:
            block.blocks[index].compute(scheduler="synchronous")
        except Exception:
            # The stored chunk that holds the failing block's first pixel.
            first = (
                y0 + sum(block.chunks[-2][: index[-2]]),
                x0 + sum(block.chunks[-1][: index[-1]]),
            )
            spans = []
            for edges, start in zip(bounds, first, strict=True):
                i = int(np.searchsorted(edges, start, "right")) - 1
                spans.append(f"{int(edges[i])}:{int(edges[i + 1])}")
            where = f"the chunk at rows {spans[0]}, columns {spans[1]}"
            break
    reason = " ".join(f"{type(err).__name__}: {err}".split())[:160]
    image = f"the image {path}" if path else "the image"
    plane = f" of plane {leading}" if leading else ""
    return InputError(
        f"cannot read {where}{plane} of {image} ({reason}); the data there is damaged: restore "
        "or re-export the image; a store being written stays resumable (--resume)"
    )


#: What a path yields: the array-like, the channel axis its metadata names, its physical space.
_Opened = tuple[Any, int | None, PhysicalSpace]


def _is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def _read_path(image: str | Path, level: int) -> _Opened:
    """Open a file or URL lazily, with the channel axis and the physical space its metadata give."""
    if isinstance(image, str) and _is_url(image):
        return _read_zarr(image, level)  # remote stores: Zarr through fsspec
    path = Path(image)
    if not path.exists():
        raise InputError(f"image file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return _read_tiff(path, level)
    if suffix == ".npy":
        return np.load(path, mmap_mode="r"), None, PhysicalSpace()
    if path.is_dir() or suffix == ".zarr":
        return _read_zarr(str(path), level)
    from skimage import io

    return io.imread(path), None, PhysicalSpace()


def _read_tiff(path: Path, level: int) -> _Opened:
    import tifffile
    import zarr

    space, axes = from_tiff(path, level)
    node = zarr.open(tifffile.imread(path, aszarr=True, level=level), mode="r")
    # tifffile names the axes (C: channels, S: samples of RGB pixels); no guessing then.
    channel_axis = next((axes.index(a) for a in "CS" if a in axes), None)
    return node, channel_axis, space


def _read_zarr(location: str, level: int) -> _Opened:
    import zarr

    try:
        node = zarr.open(location, mode="r")
    except Exception as err:
        raise InputError(
            f"cannot open {location} as Zarr ({type(err).__name__}: {err}); give a Zarr array, "
            "an OME-Zarr image or a URL that serves one"
        ) from err
    if isinstance(node, zarr.Array):
        return node, None, PhysicalSpace()
    try:
        space, axes, array_path = from_ome_zarr(node, level)
    except IndexError as err:
        raise InputError(f"{location} has {err}") from None
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as err:
        reason = _validation_reason(str(err))
        raise InputError(
            f"{location} is a zarr group but not a valid OME-Zarr image ({reason}); pass the "
            "path of an array inside it"
        ) from err
    channel_axis = axes.index("c") if "c" in axes else None
    return node[array_path], channel_axis, space


def _validation_reason(message: str) -> str:
    """What ome-zarr-models found wrong with an image group: the Image model's first error."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for number, line in enumerate(lines):
        if line.endswith(".image.Image") and number + 1 < len(lines):
            return " ".join(lines[number + 1 : number + 3])[:200]
    return (lines[0] if lines else message)[:200]


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
        A numpy or dask array, a zarr array, a URL of a Zarr array or OME-Zarr image
        (``https://``, ``s3://``: read through fsspec), or a path: ``.zarr`` (array or OME-Zarr
        group),
        ``.tif``/``.tiff`` (read lazily through tifffile's zarr store), ``.npy`` (memory-mapped),
        or any format scikit-image reads (in memory).
    channels
        Channels the model expects; used to find the channel axis when not given.
    channel_axis
        Axis of the channels as stored (negative counts from the end). OME-Zarr metadata
        provides it; otherwise :func:`napari_dense.io.image.guess_channel_axis` (the one rule);
        2-D images and one-channel models without such an axis get one.
    level
        Resolution level of an OME-Zarr or pyramidal TIFF (0 = full resolution).
    """
    path = None
    space = PhysicalSpace()
    if isinstance(image, str | Path):
        path = str(image)
        image, metadata_axis, space = _read_path(image, level)
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
        axis = guess_channel_axis(shape, channels)
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
    return ImageSource(array=array, path=path, source_shape=shape, space=space)
