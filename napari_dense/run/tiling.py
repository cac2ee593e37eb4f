"""Tile plans: which output boxes to compute, and which input pixels each one reads.

A plan is made once per image (einops' "plan once, apply many"): it fixes the tile grid, the
border index maps and the input window of every tile. Every tile reads the same input shape
(edge tiles read border-extended pixels and are cropped afterwards), so a GPU sees one shape.

Exactness: tile inputs are gathered through *index maps* of the whole padded image (row ``p``
of the padded image is image row ``map[p]``, or zero where ``map[p] == -1``), so every patch sees
exactly the pixels it sees in the untiled image, whatever the border mode: real neighbours inside
the image, the border mode only at the image edge.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from napari_dense.convert.geometry import Pair, pair
from napari_dense.errors import InputError
from napari_dense.io.image import BORDER_MODES

__all__ = ["Tile", "TilePlan", "plan_tiles"]


@dataclass(frozen=True)
class Tile:
    """One output box ``[y0, y1) × [x0, x1)`` of the image grid (also one chunk of the output)."""

    row: int
    col: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)``."""
        return (self.y0, self.y1, self.x0, self.x1)

    @property
    def shape(self) -> Pair:
        """``(height, width)`` of the box."""
        return (self.y1 - self.y0, self.x1 - self.x0)


@dataclass(frozen=True)
class TilePlan:
    """The tiling of one ``height × width`` image for one dense network.

    Attributes
    ----------
    image_shape
        ``(H, W)`` of the image and of the output.
    tile_shape
        ``(ty, tx)``: output pixels per tile (multiples of the output stride); the output chunks.
    patch_size, output_stride
        Of the dense network.
    samples
        ``(ny, nx)``: lattice samples each tile computes (one beyond the box when interpolating).
    input_shape
        ``(rows, cols)`` of every tile's input window.
    row_map, col_map
        Image row/column of every padded-image row/column (``-1``: zero, for ``"constant"``).
    """

    image_shape: Pair
    tile_shape: Pair
    patch_size: Pair
    output_stride: Pair
    samples: Pair
    input_shape: Pair
    row_map: np.ndarray
    col_map: np.ndarray

    @property
    def grid(self) -> Pair:
        """Tiles per column and per row."""
        return (
            -(-self.image_shape[0] // self.tile_shape[0]),
            -(-self.image_shape[1] // self.tile_shape[1]),
        )

    def __len__(self) -> int:
        return self.grid[0] * self.grid[1]

    def tiles(self) -> Iterator[Tile]:
        """All tiles, row by row."""
        (height, width), (ty, tx) = self.image_shape, self.tile_shape
        for row in range(self.grid[0]):
            for col in range(self.grid[1]):
                y0, x0 = row * ty, col * tx
                yield Tile(row, col, y0, min(y0 + ty, height), x0, min(x0 + tx, width))

    def tiles_by_distance(self, centre: tuple[float, float]) -> list[Tile]:
        """All tiles, nearest to ``centre`` (y, x) first (the field of view first, in the GUI)."""

        def distance(tile: Tile) -> float:
            return float(
                ((tile.y0 + tile.y1) / 2 - centre[0]) ** 2
                + ((tile.x0 + tile.x1) / 2 - centre[1]) ** 2
            )

        return sorted(self.tiles(), key=distance)

    def input_indices(self, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        """Image rows and columns (``-1`` = zero) of the tile's input window."""
        rows = self.row_map[tile.y0 : tile.y0 + self.input_shape[0]]
        cols = self.col_map[tile.x0 : tile.x0 + self.input_shape[1]]
        return rows, cols

    @property
    def megapixels(self) -> float:
        """Output megapixels of one plane."""
        return self.image_shape[0] * self.image_shape[1] / 1e6


def _index_map(size: int, patch: int, length: int, border: str) -> np.ndarray:
    """Image index of each row of the padded axis: ``np.pad`` applied to the indices themselves.

    Padded row ``p`` holds image row ``p - patch // 2`` (the FDFE convention), border-extended.
    """
    before = patch // 2
    after = max(length - size - before, 0)
    indices = np.arange(size, dtype=np.int64)
    if border == "constant":
        return np.pad(indices, (before, after), mode="constant", constant_values=-1)
    return np.pad(indices, (before, after), mode=BORDER_MODES[border])  # type: ignore[call-overload]


def plan_tiles(
    image_shape: tuple[int, int],
    tile_shape: int | tuple[int, int],
    patch_size: int | tuple[int, int],
    output_stride: int | tuple[int, int] = 1,
    border: str = "reflect",
) -> TilePlan:
    """Plan the tiles of an image.

    Parameters
    ----------
    image_shape
        ``(H, W)``.
    tile_shape
        Output pixels per tile; rounded down to a multiple of the output stride (at least one
        stride) and capped at the image size rounded up to the stride.
    patch_size, output_stride
        Of the dense network (``DenseClassifier.patch_size`` / ``.output_stride``).
    border
        ``"reflect"``, ``"edge"`` or ``"constant"``, as in :func:`napari_dense.predict`.
    """
    if border not in BORDER_MODES:
        raise InputError(f"border must be one of {sorted(BORDER_MODES)}, got {border!r}")
    height, width = image_shape
    if height < 1 or width < 1:
        raise InputError(f"the image is empty (shape {image_shape})")
    patch, stride, tile = pair(patch_size), pair(output_stride), pair(tile_shape)
    tiles = []
    for a, size in enumerate((height, width)):
        wanted = max(tile[a] // stride[a], 1) * stride[a]
        whole = -(-size // stride[a]) * stride[a]  # the image rounded up to the lattice
        tiles.append(min(wanted, whole))
    tile_hw: Pair = (tiles[0], tiles[1])
    # Samples per tile: the box's lattice points plus the next one, to interpolate up to the edge.
    samples: Pair = (
        -(-(tile_hw[0] - 1) // stride[0]) + 1,
        -(-(tile_hw[1] - 1) // stride[1]) + 1,
    )
    input_shape: Pair = (
        (samples[0] - 1) * stride[0] + patch[0],
        (samples[1] - 1) * stride[1] + patch[1],
    )
    grid = (-(-height // tile_hw[0]), -(-width // tile_hw[1]))
    return TilePlan(
        image_shape=(height, width),
        tile_shape=tile_hw,
        patch_size=patch,
        output_stride=stride,
        samples=samples,
        input_shape=input_shape,
        row_map=_index_map(height, patch[0], grid[0] * tile_hw[0] + input_shape[0], border),
        col_map=_index_map(width, patch[1], grid[1] * tile_hw[1] + input_shape[1], border),
    )
