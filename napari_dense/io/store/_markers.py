"""The tile grid and the per-tile completion markers (an empty file per tile, made after its data).

A tile counts as done only once its marker exists, and the marker is created (atomically) only
after the tile's data are written, so an interrupted run never mistakes a half-written tile for a
finished one. Markers are separate files, so processes writing different tiles never contend.
"""

from __future__ import annotations

import operator
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from napari_dense.errors import InputError
from napari_dense.io.store._layout import MARKER_DIR, PYRAMID_MARKER_DIR

if TYPE_CHECKING:
    from pathlib import Path

    import zarr

__all__ = ["Box", "MarkersMixin", "TileKey"]

Box = tuple[int, int, int, int]
TileKey = tuple[tuple[int, ...], Box]


class MarkersMixin:
    """The tile record of :class:`~napari_dense.io.store.ProbabilityStore`."""

    path: Path
    axes: str
    _array: zarr.Array
    _levels: list[zarr.Array]
    _marker_dir_ready: bool
    _created_here: bool

    if TYPE_CHECKING:

        @property
        def holds_lock(self) -> bool: ...
        def release_lock(self) -> None: ...
        @property
        def leading_axes(self) -> str: ...
        @property
        def leading_shape(self) -> tuple[int, ...]: ...
        @property
        def plane_shape(self) -> tuple[int, int]: ...
        @property
        def tile_shape(self) -> tuple[int, int]: ...

    def completed_tiles(self) -> set[TileKey]:
        """The ``(leading, box)`` of every tile :meth:`write_tile` has recorded, by any process."""
        return self._markers(MARKER_DIR)

    def pyramid_pending(self) -> set[TileKey]:
        """Recorded tiles whose footprint is not yet in the pyramid levels."""
        if len(self._levels) == 1:
            return set()
        return self.completed_tiles() - self._markers(PYRAMID_MARKER_DIR)

    def forget_unreadable_tiles(self) -> list[TileKey]:
        """Un-record tiles whose chunks are missing or cannot be decoded, so they are recomputed.

        Every recorded tile's chunk files must exist (chunks are written even when all zero)
        and decode. Reads every recorded tile once (about the speed of reading the map); needs
        the writer lock, which resuming holds.

        Returns
        -------
        list of (leading, box)
            The tiles forgotten (sorted).
        """
        keys = sorted(self.completed_tiles())
        # Decoding releases the GIL: a few threads read a whole slide's tiles several times faster.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            readable = list(pool.map(lambda key: self._tile_readable(*key), keys))
        lost = [key for key, ok in zip(keys, readable, strict=True) if not ok]
        for leading, box in lost:
            for folder in (MARKER_DIR, PYRAMID_MARKER_DIR):
                (self.path / folder / self._marker_name(leading, box)).unlink(missing_ok=True)
        return lost

    def discard_if_empty(self) -> bool:
        """Delete this store if this object created it, holds its lock and no tile was recorded.

        For a run that fails before its first tile: nothing computed, nothing left behind. A
        store that was reopened, or that holds any recorded tile, is never deleted.

        Returns
        -------
        bool
            Whether the store was deleted.
        """
        if not (self._created_here and self.holds_lock) or self.completed_tiles():
            return False
        try:
            shutil.rmtree(self.path)
        except OSError:
            return False
        finally:
            self.release_lock()
        return True

    def missing_chunks(self) -> int:
        """How many (leading, chunk) cells of level 0 no recorded tile covers yet."""
        return int(np.count_nonzero(~self._coverage()))

    # ------------------------------------------------------------------ internals

    def _selection(self, leading: tuple[int, ...], box: Box) -> tuple[int | slice, ...]:
        """Index of ``box`` at ``leading``, all classes, in the order of :attr:`axes`."""
        y0, y1, x0, x1 = box
        by_axis: dict[str, int | slice] = dict(zip(self.leading_axes, leading, strict=True))
        by_axis.update(c=slice(None), y=slice(y0, y1), x=slice(x0, x1))
        return tuple(by_axis[axis] for axis in self.axes)

    def _check_leading(self, leading: Sequence[int]) -> tuple[int, ...]:
        index = tuple(operator.index(value) for value in leading)
        if len(index) != len(self.leading_axes) or not all(
            0 <= value < size for value, size in zip(index, self.leading_shape, strict=False)
        ):
            raise InputError(
                f"leading index {index} does not fit axes {self.leading_axes!r} of shape "
                f"{self.leading_shape}"
            )
        return index

    def _check_box(self, box: Sequence[int]) -> Box:
        values = tuple(operator.index(value) for value in box)
        if len(values) != 4:
            raise InputError(f"a box is (y0, y1, x0, x1), got {values}")
        y0, y1, x0, x1 = values
        (height, width), (tile_y, tile_x) = self.plane_shape, self.tile_shape
        aligned = (
            0 <= y0 < y1 <= height
            and 0 <= x0 < x1 <= width
            and y0 % tile_y == 0
            and x0 % tile_x == 0
            and (y1 % tile_y == 0 or y1 == height)
            and (x1 % tile_x == 0 or x1 == width)
        )
        if not aligned:
            # Concurrent writers stay independent only when each chunk has a single writer.
            raise InputError(
                f"box {values} is not aligned to the {tile_y}×{tile_x} chunks of a "
                f"{height}×{width} plane"
            )
        return y0, y1, x0, x1

    def _markers(self, folder: str) -> set[TileKey]:
        try:
            names = [entry.name for entry in os.scandir(self.path / folder)]
        except FileNotFoundError:
            return set()
        keys = (self._parse_marker(name) for name in names)
        return {key for key in keys if key is not None}

    def _marker_name(self, leading: tuple[int, ...], box: Box) -> str:
        y0, y1, x0, x1 = box
        parts = [f"{axis}{index}" for axis, index in zip(self.leading_axes, leading, strict=True)]
        return "_".join([*parts, f"y{y0}-{y1}", f"x{x0}-{x1}"])

    def _parse_marker(self, name: str) -> TileKey | None:
        """The key a marker name encodes; ``None`` for anything else (e.g. temporary files)."""
        parts = name.split("_")
        if len(parts) != len(self.leading_axes) + 2:
            return None
        try:
            leading = []
            for axis, part in zip(self.leading_axes, parts, strict=False):
                if part[:1] != axis:
                    return None
                leading.append(int(part[1:]))
            box = []
            for axis, part in zip("yx", parts[-2:], strict=True):
                if part[:1] != axis:
                    return None
                start, stop = part[1:].split("-")
                box += [int(start), int(stop)]
        except ValueError:
            return None
        return tuple(leading), (box[0], box[1], box[2], box[3])

    def _tile_readable(self, leading: tuple[int, ...], box: Box) -> bool:
        """Whether every chunk of a recorded tile exists on disk and decodes."""
        (tile_y, tile_x), (y0, y1, x0, x1) = self.tile_shape, box
        by_axis = dict(zip(self.leading_axes, leading, strict=True))
        for row in range(y0 // tile_y, -(-y1 // tile_y)):
            for col in range(x0 // tile_x, -(-x1 // tile_x)):
                index = {**by_axis, "c": 0, "y": row, "x": col}
                key = self._array.metadata.encode_chunk_key(tuple(index[a] for a in self.axes))
                if not (self.path / "0" / key).is_file():
                    return False
        try:
            np.asarray(self._array[self._selection(leading, box)])
        except Exception:  # any decoding failure: the tile is recomputed, not trusted
            return False
        return True

    def _record(self, leading: tuple[int, ...], box: Box) -> None:
        """Create the tile's marker atomically: it appears whole or not at all."""
        if not self._marker_dir_ready:
            (self.path / MARKER_DIR).mkdir(exist_ok=True)
            self._marker_dir_ready = True
        self._touch_marker(MARKER_DIR, self._marker_name(leading, box))

    def _touch_marker(self, folder: str, name: str) -> None:
        marker_dir = self.path / folder
        marker_dir.mkdir(exist_ok=True)
        # A dot name that no marker can have: a temporary file left by a crash is ignored.
        temporary = marker_dir / f".{uuid.uuid4().hex}.tmp"
        temporary.touch()
        os.replace(temporary, marker_dir / name)

    def _coverage(self) -> np.ndarray:
        """Boolean (*leading_shape, chunk rows, chunk columns): chunks covered by recorded tiles."""
        (height, width), (tile_y, tile_x) = self.plane_shape, self.tile_shape
        covered = np.zeros((*self.leading_shape, -(-height // tile_y), -(-width // tile_x)), bool)
        for leading, (y0, y1, x0, x1) in self.completed_tiles():
            if len(leading) == len(self.leading_shape) and all(
                0 <= value < size for value, size in zip(leading, self.leading_shape, strict=True)
            ):
                rows = slice(y0 // tile_y, -(-y1 // tile_y))
                cols = slice(x0 // tile_x, -(-x1 // tile_x))
                index: tuple[int | slice, ...] = (*leading, rows, cols)
                covered[index] = True
        return covered
