"""OME-Zarr (NGFF 0.5, Zarr v3) store for probability maps, written tile by tile.

The package by role: :mod:`.store` (:class:`ProbabilityStore`: create, open, write, read),
:mod:`._ngff` (the NGFF metadata through ``ome-zarr-models``), :mod:`._pyramid` (levels and the
2×2 local mean, live and at the end), :mod:`._markers` (the tile grid and completion markers),
:mod:`._outputs` (overwrite protection), :mod:`._checks` (argument checks), :mod:`._layout` (the
names inside a store), :mod:`._errors`; the writer lock is :mod:`napari_dense.io.store._lock`.
"""

from __future__ import annotations

from typing import Final

from napari_dense.colours import CLASS_COLOURS
from napari_dense.io.store._checks import resolve_space
from napari_dense.io.store._errors import (
    OverwriteRefusedError,
    StoreExistsError,
    StoreIncompleteError,
    StoreLockedError,
    StoreWriteError,
)
from napari_dense.io.store._layout import (
    ATTRIBUTES_KEY,
    MARKER_DIR,
    PYRAMID_MARKER_DIR,
    STORE_DTYPES,
)
from napari_dense.io.store._ngff import NGFF_VERSION
from napari_dense.io.store._pyramid import AUTO_PYRAMID_SIDE, LEVEL_CHUNK_FLOOR, auto_pyramid_levels
from napari_dense.io.store._pyramid import local_mean_2x as _local_mean_2x
from napari_dense.io.store._pyramid import to_probabilities as _to_probabilities
from napari_dense.io.store._pyramid import to_stored as _to_stored
from napari_dense.io.store.store import ProbabilityStore

#: The class colours, from the one table (napari_dense.colours); kept here for old imports.
CHANNEL_COLOURS: Final = CLASS_COLOURS

__all__ = [
    "ATTRIBUTES_KEY",
    "AUTO_PYRAMID_SIDE",
    "CHANNEL_COLOURS",
    "LEVEL_CHUNK_FLOOR",
    "MARKER_DIR",
    "NGFF_VERSION",
    "PYRAMID_MARKER_DIR",
    "STORE_DTYPES",
    "OverwriteRefusedError",
    "ProbabilityStore",
    "StoreExistsError",
    "StoreIncompleteError",
    "StoreLockedError",
    "StoreWriteError",
    "auto_pyramid_levels",
    "resolve_space",
]

# Private helpers other modules' tests use (the host conversion the device must equal).
_ = (_local_mean_2x, _to_probabilities, _to_stored)
