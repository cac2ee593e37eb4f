"""Pyramid levels of a store: the 2×2 local mean, level arrays, and the live per-tile update.

The mean stays hand-written (not ``dask.array.coarsen``): it is bit-exact between a level built
at the end and one updated tile by tile as tiles land (the same float32 sums in the same order),
which a viewer of a live run relies on, and runs several times faster than a reshape-and-sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from napari_dense.errors import InputError
from napari_dense.io.store._checks import jsonable
from napari_dense.io.store._errors import StoreIncompleteError, StoreWriteError, reason
from napari_dense.io.store._layout import ATTRIBUTES_KEY, PYRAMID_MARKER_DIR
from napari_dense.io.store._ngff import ome_attributes

if TYPE_CHECKING:
    from pathlib import Path

    from napari_dense.io.physical import PhysicalSpace

__all__ = [
    "AUTO_PYRAMID_SIDE",
    "LEVEL_CHUNK_FLOOR",
    "PyramidMixin",
    "auto_pyramid_levels",
    "check_pyramid_levels",
    "create_level",
    "halved",
    "level_array",
    "level_chunks",
    "local_mean_2x",
    "to_probabilities",
    "to_stored",
]

#: Smallest chunk side of a pyramid level (unless the tiles are smaller).
LEVEL_CHUNK_FLOOR: Final = 256
#: ``pyramid_levels="auto"`` halves the plane until its longer side is at most this.
AUTO_PYRAMID_SIDE: Final = 512
#: Bytes of float32 source data read per step while building a pyramid level.
_PYRAMID_STEP_BYTES: Final = 64 * 2**20

Box = tuple[int, int, int, int]


# ---------------------------------------------------------------------- data conversion


def to_stored(probabilities: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """Probabilities as stored: cast, or ``round(p * 255)`` clipped for uint8.

    Values already in the store's ``dtype`` (the device's ``output_dtype``: uint8 as
    ``round(p * 255)``, or float16) pass unchanged; uint8 into another dtype is read as ``/255``.
    """
    values = np.asarray(probabilities)
    if values.dtype == dtype:
        return values
    if values.dtype == np.uint8:
        values = to_probabilities(values)
    if dtype == np.uint8:
        scaled = np.rint(values.astype(np.float32, copy=False) * np.float32(255))
        return np.clip(scaled, 0, 255).astype(np.uint8)
    return values.astype(dtype, copy=False)


def to_probabilities(stored: np.ndarray) -> np.ndarray:
    """Stored values as float32 probabilities."""
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) / np.float32(255)
    return stored.astype(np.float32, copy=False)


def local_mean_2x(block: np.ndarray) -> np.ndarray:
    """Mean of 2×2 blocks over the last two axes; a block cut by the edge averages its pixels."""
    *leading, height, width = block.shape
    out_height, out_width = -(-height // 2), -(-width // 2)
    if height % 2 or width % 2:
        padded = np.zeros((*leading, 2 * out_height, 2 * out_width), dtype=np.float32)
        padded[..., :height, :width] = block
    else:
        padded = np.asarray(block, dtype=np.float32)
    # Strided sums: several times faster than a reshape and a sum over two axes.
    sums = padded[..., 0::2, 0::2] + padded[..., 0::2, 1::2]
    sums += padded[..., 1::2, 0::2]
    sums += padded[..., 1::2, 1::2]
    rows = np.full(out_height, 2, dtype=np.float32)
    cols = np.full(out_width, 2, dtype=np.float32)
    rows[-1] -= height % 2
    cols[-1] -= width % 2
    return sums / np.outer(rows, cols)


# ---------------------------------------------------------------------- levels


def auto_pyramid_levels(height: int, width: int, side: int = AUTO_PYRAMID_SIDE) -> int:
    """Halvings until the longer side of a ``height × width`` plane is at most ``side``."""
    levels, longest = 0, max(height, width)
    while longest > side:
        longest, levels = -(-longest // 2), levels + 1
    return levels


def check_pyramid_levels(levels: int | str, plane: Sequence[int]) -> int:
    if levels == "auto":
        return auto_pyramid_levels(int(plane[0]), int(plane[1]))
    if isinstance(levels, bool) or not isinstance(levels, int | np.integer) or levels < 0:
        raise InputError(f"pyramid_levels must be 0 or more, or 'auto', got {levels!r}")
    return int(levels)


def create_level(
    group: zarr.Group,
    name: str,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: np.dtype[Any],
    axes: str,
    *,
    overwrite: bool = False,
) -> zarr.Array:
    return group.create_array(
        name,
        shape=tuple(shape),
        chunks=tuple(chunks),
        dtype=dtype,
        # Unwritten regions read as probability 0.
        fill_value=0,
        # NGFF 0.5 asks for the axis names on each array too.
        dimension_names=list(axes),
        compressors=[_compressor()],
        overwrite=overwrite,
        # Every written chunk exists on disk, even all zero: a missing chunk means a lost tile.
        config={"write_empty_chunks": True},
    )


def _compressor() -> BloscCodec:
    # Byte shuffle + LZ4: a better ratio than zarr's default (zstd level 0) on float maps, and
    # fast enough (a few hundred MB/s per core) not to hold back a GPU's output.
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def level_array(group: zarr.Group, name: str) -> zarr.Array:
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise InputError(f"{group.store_path}/{name} is a group, not an array")
    return node.with_config({"write_empty_chunks": True})


def level_chunks(chunks: Sequence[int], axes: str, level: int) -> tuple[int, ...]:
    """Chunks of a pyramid level: the tile's footprint there, but at least 256 px a side.

    The footprint keeps each tile's update of levels 1, 2, ... a whole-chunk write; the 256 px
    floor keeps deep levels from splitting into tiny chunks that viewers read by the thousand
    (those chunks hold several tiles' footprints: one writer updates them, see write_tile).
    """
    return tuple(
        max(-(-int(size) // 2**level), min(int(size), LEVEL_CHUNK_FLOOR))
        if axis in "yx"
        else int(size)
        for axis, size in zip(axes, chunks, strict=True)
    )


def halved(shape: Sequence[int], axes: str) -> tuple[int, ...]:
    return tuple(
        -(-int(size) // 2) if axis in "yx" else int(size)
        for axis, size in zip(axes, shape, strict=True)
    )


class PyramidMixin:
    """The pyramid methods of :class:`~napari_dense.io.store.ProbabilityStore`."""

    path: Path
    axes: str
    _group: zarr.Group
    _array: zarr.Array
    _levels: list[zarr.Array]
    _name: str
    _complete: bool
    class_names: list[str]
    scale: tuple[float, ...]
    space: PhysicalSpace

    if TYPE_CHECKING:

        def missing_chunks(self) -> int: ...
        def pyramid_pending(self) -> set[tuple[tuple[int, ...], Box]]: ...
        def acquire_lock(self) -> None: ...
        def release_lock(self) -> None: ...
        def _read_attributes(self) -> dict[str, Any]: ...
        def _check_leading(self, leading: Sequence[int]) -> tuple[int, ...]: ...
        def _check_box(self, box: Sequence[int]) -> Box: ...

        @property
        def dtype(self) -> np.dtype[Any]: ...
        @property
        def num_classes(self) -> int: ...
        @property
        def tile_shape(self) -> tuple[int, int]: ...
        @property
        def leading_shape(self) -> tuple[int, ...]: ...
        def _selection(self, leading: tuple[int, ...], box: Box) -> tuple[int | slice, ...]: ...
        def _touch_marker(self, folder: str, name: str) -> None: ...
        def _marker_name(self, leading: tuple[int, ...], box: Box) -> str: ...

    def update_pyramid(self, leading: Sequence[int], box: Sequence[int]) -> None:
        """Write a recorded tile's footprint into every pyramid level (read back from level 0).

        For tiles written by other processes (dask workers), which leave the levels to the run
        holding the writer lock; :meth:`finalize` does it for any tile still pending.
        """
        leading_index, tile_box = self._check_leading(leading), self._check_box(box)
        if len(self._levels) > 1:
            try:
                self._update_footprint(leading_index, tile_box, None)
            except OSError as err:
                raise StoreWriteError(
                    f"cannot write the pyramid of {self.path}: {reason(err)}; free space or fix "
                    "permissions, then resume (--resume)"
                ) from err

    def finalize(
        self, *, attributes: Mapping[str, Any] | None = None, pyramid_levels: int | None = None
    ) -> None:
        """Add provenance, build the pyramid and mark the store complete (last of all).

        Parameters
        ----------
        attributes
            Merged into the provenance (its ``"complete"`` key is ignored: finalize sets it).
        pyramid_levels
            Extra levels ``1..pyramid_levels``, each the 2×2 local mean over y, x of the level
            above (a block cut by the image edge averages the pixels it has), listed in the NGFF
            multiscales with scale ``2**level`` and the half-pixel translation that keeps pixel
            centres aligned. ``None`` (default): the levels the store has. Levels filled as
            tiles landed are only completed (tiles still pending), not recomputed; missing
            levels are built, extra ones removed.

        Raises
        ------
        StoreIncompleteError
            Some tiles have not been written.
        """
        if pyramid_levels is None:
            pyramid_levels = len(self._levels) - 1
        if pyramid_levels < 0:
            raise InputError(f"pyramid_levels must be 0 or more, got {pyramid_levels}")
        missing = self.missing_chunks()
        if missing:
            raise StoreIncompleteError(
                f"{self.path} lacks {missing} tile(s); write them before finalizing (CLI: run "
                "again with --resume)"
            )
        self.acquire_lock()  # no-op for the run that holds it; refuses while another writes
        try:
            self._finalize(attributes, pyramid_levels)
        finally:
            self.release_lock()

    def _finalize(self, attributes: Mapping[str, Any] | None, pyramid_levels: int) -> None:
        extra = jsonable(dict(attributes or {}), "attributes")
        current = self._read_attributes()
        provenance = {**current[ATTRIBUTES_KEY], **extra, "complete": False}
        try:
            # Declared incomplete while the levels are rebuilt, in case this store was finalized
            # before: a crash in between must not leave a "complete" store with a half pyramid.
            self._group.update_attributes({ATTRIBUTES_KEY: provenance})
            self._complete = False
            if not current[ATTRIBUTES_KEY].get("complete", False):
                # Levels filled as tiles landed: add only the tiles other writers left pending.
                for leading, box in sorted(self.pyramid_pending()):
                    self._update_footprint(leading, box, None)
            live = len(self._levels) - 1
            source = self._levels[min(live, pyramid_levels)]
            for level in range(live + 1, pyramid_levels + 1):
                target = create_level(
                    self._group,
                    str(level),
                    halved(source.shape, self.axes),
                    level_chunks(self._array.chunks, self.axes, level),
                    self.dtype,
                    self.axes,
                    overwrite=True,
                )
                self._build_level(source, target)
                source = target
            self._remove_levels_beyond(pyramid_levels)
            self._levels = [level_array(self._group, str(k)) for k in range(pyramid_levels + 1)]
            from pydantic_zarr.v3 import ArraySpec

            ome = ome_attributes(
                name=self._name,
                axes=self.axes,
                class_names=self.class_names,
                dtype=self.dtype,
                arrays=[ArraySpec.from_zarr(level) for level in self._levels],
                space=self.space,
                z_scale=self.scale[0] if "z" in self.axes else 1.0,
            )
            # One metadata write (atomic in zarr >= 3.1): pyramid listing and completion together.
            self._group.update_attributes(
                {"ome": ome, ATTRIBUTES_KEY: {**provenance, "complete": True}}
            )
        except OSError as err:
            raise StoreWriteError(
                f"cannot finalize {self.path}: {reason(err)}; free space or fix permissions, "
                "then run again with --resume"
            ) from err
        self._complete = True

    def _update_footprint(
        self, leading: tuple[int, ...], box: Box, stored: np.ndarray | None
    ) -> None:
        """Recompute every level's pixels that the tile ``box`` touches, then record that.

        Each level pixel is the 2×2 local mean of the level above (as :meth:`_build_level`
        computes it, so the result is bit-identical to building the levels at the end). Where
        the footprint is not aligned to 2×2 blocks, the block above is read back, neighbours'
        pixels included; otherwise the values just computed are reused.
        """
        block, (y0, y1, x0, x1) = stored, box
        for level in range(1, len(self._levels)):
            source, target = self._levels[level - 1], self._levels[level]
            height, width = source.shape[-2:]
            top, bottom, left, right = y0 // 2, -(-y1 // 2), x0 // 2, -(-x1 // 2)
            above = (2 * top, min(2 * bottom, height), 2 * left, min(2 * right, width))
            if block is None or above != (y0, y1, x0, x1):
                block = np.asarray(source[self._selection(leading, above)])
            mean = to_stored(local_mean_2x(to_probabilities(block)), self.dtype)
            target[self._selection(leading, (top, bottom, left, right))] = mean
            block, (y0, y1, x0, x1) = mean, (top, bottom, left, right)
        self._touch_marker(PYRAMID_MARKER_DIR, self._marker_name(leading, box))

    def _build_level(self, source: zarr.Array, target: zarr.Array) -> None:
        """Fill ``target`` with the 2×2 local mean of ``source``, a few chunks at a time."""
        tile_y, tile_x = self.tile_shape
        height, width = target.shape[-2:]
        source_height, source_width = source.shape[-2:]
        # Each target chunk reads 2×2 source chunks of float32.
        chunk_bytes = self.num_classes * 4 * tile_y * tile_x * 4
        step_x = tile_x * max(1, _PYRAMID_STEP_BYTES // chunk_bytes)
        for leading in np.ndindex(*self.leading_shape):
            for y0 in range(0, height, tile_y):
                y1 = min(y0 + tile_y, height)
                for x0 in range(0, width, step_x):
                    x1 = min(x0 + step_x, width)
                    source_box = (
                        2 * y0, min(2 * y1, source_height), 2 * x0, min(2 * x1, source_width)
                    )  # fmt: skip
                    block = np.asarray(source[self._selection(leading, source_box)])
                    mean = local_mean_2x(to_probabilities(block))
                    target[self._selection(leading, (y0, y1, x0, x1))] = to_stored(mean, self.dtype)

    def _remove_levels_beyond(self, pyramid_levels: int) -> None:
        """Delete levels left by an earlier finalize with more levels than now asked for."""
        level = pyramid_levels + 1
        while (self.path / str(level) / "zarr.json").exists():
            del self._group[str(level)]
            level += 1
