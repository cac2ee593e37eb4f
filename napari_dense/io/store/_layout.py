"""The names inside a store folder: what this project writes, and nothing else.

Layout of a store at ``map.zarr``::

    map.zarr/zarr.json        {"ome": NGFF 0.5 multiscales + omero, "napari_dense": provenance}
    map.zarr/0/               level 0: probabilities, axes "cyx", "czyx", "tcyx" or "tczyx"
    map.zarr/1/, 2/, ...      pyramid levels (2× local mean over y, x): filled as tiles land
                              when made by create(pyramid_levels=N), else built by finalize()
    map.zarr/.napari_dense_tiles/z3_y0-256_x512-768    empty marker of one completed tile
    map.zarr/.napari_dense_pyramid/z3_y0-256_x512-768  its footprint is in every level
    map.zarr/.napari_dense.lock, .napari_dense_owner.json   the writer lock (see _lock.py)
"""

from __future__ import annotations

import re
from typing import Final

from napari_dense.io.store._lock import LOCK_FILE, OWNER_FILE

__all__ = [
    "ATTRIBUTES_KEY",
    "MARKER_DIR",
    "OUR_NAMES",
    "OUR_NAME_PATTERN",
    "PYRAMID_MARKER_DIR",
    "STORE_DTYPES",
]

#: Data types a store can hold; ``uint8`` stores ``round(p * 255)``.
STORE_DTYPES: Final = ("float32", "float16", "uint8")
#: Key of our provenance in the group attributes, beside (not inside) the NGFF ``ome`` key.
ATTRIBUTES_KEY: Final = "napari_dense"
#: Directory of the per-tile completion markers, inside the store so that it travels with it.
MARKER_DIR: Final = ".napari_dense_tiles"
#: Markers of tiles whose footprint has been written into every pyramid level.
PYRAMID_MARKER_DIR: Final = ".napari_dense_pyramid"

#: Top-level names inside a store that this project writes (levels are numbers).
OUR_NAMES: Final = frozenset({"zarr.json", MARKER_DIR, PYRAMID_MARKER_DIR, LOCK_FILE, OWNER_FILE})
OUR_NAME_PATTERN: Final = re.compile(r"\d+|\.[0-9a-f]{32}\.owner\.tmp")
