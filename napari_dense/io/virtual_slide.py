"""A virtual whole slide: mirrored, shifted copies of one small RGB image, computed on demand.

Any region of any level is computed from index arithmetic when it is read, never stored: a
100,000 × 100,000 RGB slide costs a few MiB. The slide is periodic copies of the image mirrored
into a seamless ``2h × 2w`` tile, shifted per block of :attr:`VirtualSlide.block` pixels so
that neighbouring blocks differ. Level ``l`` is exactly the ``2**l × 2**l`` mean of level 0
(blocks and shifts are multiples of ``2**l``), computed from the equally reduced tile, so it
is a pyramid as real whole-slide files are.

>>> import numpy as np
>>> slide = VirtualSlide(np.zeros((64, 64, 3), np.uint8), size=(1000, 1500), levels=3)
>>> slide.level_shape(2), slide.pyramid()[2].shape
((250, 375, 3), (250, 375, 3))
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np

__all__ = ["VirtualSlide"]


class VirtualSlide:
    """A lazy ``(H, W, C)`` slide built from ``tile`` (``(h, w, C)``, any numeric dtype).

    Parameters
    ----------
    tile
        The image copied over the slide.
    size
        ``(H, W)`` of level 0.
    levels
        Levels of the pyramid beyond level 0; ``2**levels`` must divide ``2h``, ``2w`` and
        ``block``.
    block
        Side of the blocks that share one shift (0: no shifts, a plain mirrored mosaic).
    seed
        Seed of the per-block shifts.
    chunk
        Chunk side of the dask arrays of :meth:`pyramid`.
    """

    def __init__(
        self,
        tile: np.ndarray,
        size: tuple[int, int],
        *,
        levels: int = 0,
        block: int = 0,
        seed: int = 0,
        chunk: int = 1024,
    ):
        tile = np.asarray(tile)
        mirrored = np.concatenate([tile, tile[::-1]], axis=0)
        self._base = np.concatenate([mirrored, mirrored[:, ::-1]], axis=1)  # seamless period
        period_y, period_x = self._base.shape[:2]
        factor = 2**levels
        if period_y % factor or period_x % factor or (block and block % factor):
            raise ValueError(
                f"2**levels = {factor} must divide the mirrored tile {period_y}x{period_x} and "
                f"the block {block}; use fewer levels"
            )
        self.size = (int(size[0]), int(size[1]))
        self.levels = levels
        self.block = block
        self.chunk = chunk
        self.dtype = tile.dtype
        self.channels = tile.shape[2]
        # Shifts in multiples of 2**levels: every level's pixels stay whole means of level 0.
        blocks = (-(-self.size[0] // block), -(-self.size[1] // block)) if block else (1, 1)
        rng = np.random.default_rng(seed)
        self._shift_y = rng.integers(0, period_y // factor, blocks) * factor if block else None
        self._shift_x = rng.integers(0, period_x // factor, blocks) * factor if block else None
        self._bases: list[np.ndarray] = [self._base]
        for _ in range(levels):
            previous = self._bases[-1].astype(np.float32)
            h, w = previous.shape[0] // 2, previous.shape[1] // 2
            self._bases.append(previous.reshape(h, 2, w, 2, -1).mean(axis=(1, 3)))

    def level_shape(self, level: int) -> tuple[int, int, int]:
        """``(H, W, C)`` of a level (edges rounded up)."""
        factor = 2**level
        return (-(-self.size[0] // factor), -(-self.size[1] // factor), self.channels)

    def read(self, level: int, rows: slice, cols: slice) -> np.ndarray:
        """Pixels ``[rows, cols, :]`` of ``level`` (step-1 slices), in the tile's dtype."""
        height, width, _ = self.level_shape(level)
        y0, y1, _ = rows.indices(height)
        x0, x1, _ = cols.indices(width)
        y1, x1 = max(y0, y1), max(x0, x1)
        factor = 2**level
        base = self._bases[level]
        out = np.empty((y1 - y0, x1 - x0, self.channels), dtype=self.dtype)
        if self._shift_y is None or self._shift_x is None:
            _periodic_copy(out, base, y0, x0)
            return out
        step = self.block // factor  # level pixels per block
        for by in range(y0 // step, -(-y1 // step)):
            a0, a1 = max(y0, by * step), min(y1, (by + 1) * step)
            for bx in range(x0 // step, -(-x1 // step)):
                b0, b1 = max(x0, bx * step), min(x1, (bx + 1) * step)
                _periodic_copy(
                    out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0],
                    base,
                    a0 + int(self._shift_y[by, bx]) // factor,
                    b0 + int(self._shift_x[by, bx]) // factor,
                )
        return out

    def pyramid(self) -> list[da.Array]:
        """Every level as a lazy dask array ``(H, W, C)``, level 0 first (napari multiscale)."""
        return [self.level(level) for level in range(self.levels + 1)]

    def level(self, level: int) -> da.Array:
        """One level as a lazy dask array (each chunk computed when read)."""
        return da.from_array(
            _LevelView(self, level),
            chunks=(self.chunk, self.chunk, self.channels),
            asarray=False,
            fancy=False,
            meta=np.empty((0, 0, 0), dtype=self.dtype),
        )


class _LevelView:
    """A level as an array-like for :func:`dask.array.from_array` (slices of step 1 only)."""

    def __init__(self, slide: VirtualSlide, level: int):
        self._slide, self._level = slide, level
        self.shape = slide.level_shape(level)
        self.dtype = np.dtype(slide.dtype)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        rows, cols, channels = key
        block = self._slide.read(self._level, _unit(rows), _unit(cols))
        return block[_rest(rows), _rest(cols)][:, :, channels]


def _unit(index: Any) -> slice:
    if isinstance(index, int | np.integer):
        return slice(int(index), int(index) + 1)
    return slice(index.start, index.stop)


def _rest(index: Any) -> Any:
    if isinstance(index, int | np.integer):
        return 0
    return slice(None, None, index.step)


def _periodic_copy(out: np.ndarray, base: np.ndarray, y0: int, x0: int) -> None:
    """``out[i, j] = base[(y0 + i) % H, (x0 + j) % W]``, by contiguous slices (no gather)."""
    period_y, period_x = base.shape[:2]
    rows, cols = out.shape[:2]
    i = 0
    while i < rows:
        sy = (y0 + i) % period_y
        n = min(rows - i, period_y - sy)
        j = 0
        while j < cols:
            sx = (x0 + j) % period_x
            m = min(cols - j, period_x - sx)
            out[i : i + n, j : j + m] = _cast(base[sy : sy + n, sx : sx + m], out.dtype)
            j += m
        i += n


def _cast(values: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    if values.dtype == dtype:
        return values
    if np.dtype(dtype).kind in "iu":
        return np.rint(values).astype(dtype)
    return values.astype(dtype)
