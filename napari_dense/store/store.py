"""OME-Zarr (NGFF 0.5, Zarr v3) store for probability maps, written tile by tile.

Layout of a store at ``map.zarr``::

    map.zarr/zarr.json        {"ome": NGFF 0.5 multiscales + omero, "napari_dense": provenance}
    map.zarr/0/               level 0: probabilities, axes "cyx", "czyx", "tcyx" or "tczyx"
    map.zarr/1/, 2/, ...      pyramid levels (2× local mean over y, x): filled as tiles land
                              when made by create(pyramid_levels=N), else built by finalize()
    map.zarr/.napari_dense_tiles/z3_y0-256_x512-768    empty marker of one completed tile
    map.zarr/.napari_dense_pyramid/z3_y0-256_x512-768  its footprint is in every level
    map.zarr/.napari_dense.lock, .napari_dense_owner.json   the writer lock (see _lock.py)

A tile counts as done only once its marker exists, and the marker is created (atomically) only
after the tile's data are written, so an interrupted run never mistakes a half-written tile for a
finished one. Markers are separate files, so processes writing different tiles never contend.
``napari_dense.complete`` turns true only at the very end of :meth:`ProbabilityStore.finalize`.

Safety: one writing run at a time (:meth:`ProbabilityStore.acquire_lock`; readers are never
blocked); ``overwrite`` deletes only a store this project wrote — never a file, another Zarr, a
store holding foreign files, a symbolic link, or the input image or a folder containing it; every
chunk is written even when it holds only zeros, so that a recorded tile whose chunk is missing is
known to be lost (:meth:`ProbabilityStore.forget_unreadable_tiles`).
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec

from ._lock import LOCK_FILE, OWNER_FILE, StoreLockedError, WriterLock
from .colours import CLASS_COLOURS, class_colour, is_background
from .errors import InputError, NapariDenseError

__all__ = [
    "AUTO_PYRAMID_SIDE",
    "STORE_DTYPES",
    "OverwriteRefusedError",
    "ProbabilityStore",
    "StoreExistsError",
    "StoreIncompleteError",
    "StoreLockedError",
    "StoreWriteError",
    "auto_pyramid_levels",
]

#: Data types a store can hold; ``uint8`` stores ``round(p * 255)``.
STORE_DTYPES: Final = ("float32", "float16", "uint8")

NGFF_VERSION: Final = "0.5"
#: Key of our provenance in the group attributes, beside (not inside) the NGFF ``ome`` key.
ATTRIBUTES_KEY: Final = "napari_dense"
#: Directory of the per-tile completion markers, inside the store so that it travels with it.
MARKER_DIR: Final = ".napari_dense_tiles"
#: Markers of tiles whose footprint has been written into every pyramid level.
PYRAMID_MARKER_DIR: Final = ".napari_dense_pyramid"
#: Smallest chunk side of a pyramid level (unless the tiles are smaller).
LEVEL_CHUNK_FLOOR: Final = 256
#: ``pyramid_levels="auto"`` halves the plane until its longer side is at most this.
AUTO_PYRAMID_SIDE: Final = 512

#: The class colours, from the one table (napari_dense.colours); kept here for old imports.
CHANNEL_COLOURS: Final = CLASS_COLOURS

_AXIS_TYPES: Final = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
#: Axis orders NGFF allows for our maps: time, then channel, then space (z, y, x).
_VALID_AXES: Final = ("cyx", "czyx", "tcyx", "tczyx")
#: Bytes of float32 source data read per step while building a pyramid level.
_PYRAMID_STEP_BYTES: Final = 64 * 2**20

Box = tuple[int, int, int, int]
TileKey = tuple[tuple[int, ...], Box]


class StoreExistsError(NapariDenseError, FileExistsError):
    """The output path exists and neither overwriting nor resuming was asked for."""


class OverwriteRefusedError(StoreExistsError):
    """The output path holds something ``overwrite`` must not delete (not ours, or the input)."""


class StoreWriteError(NapariDenseError, OSError):
    """The store cannot be created or written (permissions, a file in the way, a full disk)."""


class StoreIncompleteError(NapariDenseError, RuntimeError):
    """The store cannot be finalized because some tiles have not been written."""


class ProbabilityStore:
    """A probability map on disk as OME-Zarr: tiles in, NGFF image out.

    Make one with :meth:`create` or reopen one with :meth:`open`; the constructor is internal.

    Attributes
    ----------
    path : Path
        The store's directory.
    axes : str
        Axis names of the arrays, e.g. ``"cyx"`` or ``"tczyx"``.
    class_names : list[str]
        One name per class (channel ``c``).
    dtype : numpy.dtype
        Data type on disk (``float32``, ``float16`` or ``uint8``).
    """

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self._group = group
        attributes: dict[str, Any] = group.attrs.asdict()
        ome = attributes["ome"]
        multiscale = ome["multiscales"][0]
        self.axes: str = "".join(axis["name"] for axis in multiscale["axes"])
        self.class_names: list[str] = [str(ch["label"]) for ch in ome["omero"]["channels"]]
        level0_scale = multiscale["datasets"][0]["coordinateTransformations"][0]["scale"]
        #: Physical pixel size per space axis (z, y, x or y, x), as given to :meth:`create`.
        self.scale: tuple[float, ...] = tuple(
            float(size)
            for axis, size in zip(self.axes, level0_scale, strict=True)
            if _AXIS_TYPES[axis] == "space"
        )
        self._name: str = str(multiscale.get("name", path.stem))
        self._complete = bool(attributes[ATTRIBUTES_KEY].get("complete", False))
        self._marker_dir_ready = False
        self._array = _level_array(group, "0")
        #: Levels 0..N as listed in the metadata: 1..N are kept up to date by write_tile.
        self._levels = [_level_array(group, str(k)) for k in range(len(multiscale["datasets"]))]
        self._lock = WriterLock(path)
        #: Made by this object's :meth:`create` (only such a store may be discarded).
        self._created_here = False

    # ------------------------------------------------------------------ creating and opening

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        shape: Sequence[int],
        axes: str,
        chunks: int | Sequence[int],
        class_names: Sequence[str],
        dtype: str | np.dtype[Any] = "float32",
        scale: Sequence[float] | None = None,
        overwrite: bool = False,
        attributes: Mapping[str, Any] | None = None,
        protect: Sequence[str | os.PathLike[str]] = (),
        pyramid_levels: int | str = 0,
    ) -> ProbabilityStore:
        """Create an empty store (every pixel reads 0 until written), locked for writing.

        The new store holds the writer lock (:meth:`acquire_lock`) until :meth:`finalize` or
        :meth:`release_lock`.

        Parameters
        ----------
        path
            Directory to create (conventionally ending in ``.zarr``).
        shape
            Full shape in the order of ``axes``, e.g. ``(K, H, W)`` for ``"cyx"`` or
            ``(T, K, Z, H, W)`` for ``"tczyx"``.
        axes
            ``"cyx"``, ``"czyx"``, ``"tcyx"`` or ``"tczyx"`` (NGFF order).
        chunks
            ``(tile_y, tile_x)`` (or one int for both): the spatial chunk size, which is also the
            tile grid of :meth:`write_tile`. A chunk holds all classes and one t/z index.
        class_names
            One name per class; their number must equal the size of axis ``c``.
        dtype
            ``"float32"``, ``"float16"`` or ``"uint8"`` (probabilities stored as
            ``round(p * 255)``, clipped to 0..255).
        scale
            Physical pixel size per space axis, ``(y, x)`` or, with a z axis, ``(z, y, x)``;
            1 by default. Written as the NGFF scale transformation of level 0.
        overwrite
            Replace an existing store at ``path``, only if this project wrote it (its
            ``napari_dense`` attribute), it holds nothing else, no other run writes it, and it is
            not (and does not contain) a ``protect`` path. An empty directory may be replaced too.
        attributes
            Provenance (JSON-serialisable) stored under the ``"napari_dense"`` group attribute.
        protect
            Paths that must never be deleted, e.g. the input image (symbolic links resolved).
        pyramid_levels
            Levels ``1..N`` made now, listed in the NGFF metadata from the start and filled as
            tiles land (each written tile updates its footprint in every level), so that viewers
            can show the map multiscale while it is computed; ``"auto"``: halve until the longer
            side is at most 512 px. Levels share the tile chunking: only the run holding the
            writer lock updates them (other writers' tiles are added by :meth:`update_pyramid`
            or :meth:`finalize`), so concurrent writers never write the same chunk.

        Returns
        -------
        ProbabilityStore

        Raises
        ------
        StoreExistsError
            ``path`` exists and ``overwrite`` is false.
        OverwriteRefusedError
            ``path`` holds something ``overwrite`` never deletes (a :class:`StoreExistsError`).
        StoreLockedError
            ``overwrite``: another run is writing the store at ``path``.
        StoreWriteError
            ``path`` cannot be created.
        InputError
            Inconsistent arguments.
        """
        path = Path(path)
        axes = _check_axes(axes)
        shape = _check_shape(shape, axes)
        tile_shape = _check_chunks(chunks)
        store_dtype = _check_dtype(dtype)
        num_classes = shape[axes.index("c")]
        names = [str(name) for name in class_names]
        if len(names) != num_classes:
            raise InputError(
                f"{len(names)} class names for {num_classes} classes (axis c of shape "
                f"{shape}); give one name per class"
            )
        space_scale = _check_scale(scale, axes)
        levels = _check_pyramid_levels(pyramid_levels, shape[-2:])
        provenance = _jsonable(dict(attributes or {}), "attributes")
        # Set here, not by the caller: only finalize() may declare the store complete.
        provenance["complete"] = False

        if path.exists() or path.is_symlink():
            # Checked first, with or without overwrite: the message says what is there.
            _check_replaceable(path, protect)
            if not overwrite:
                raise StoreExistsError(
                    f"{path} exists; pass overwrite=True (CLI: --overwrite) or resume=True "
                    "(--resume)"
                )
            _remove_existing_store(path)

        # All classes in one chunk (a tile is one write); one t/z index per chunk, so that tiles
        # of different planes never share a chunk.
        chunk_sizes = {"c": num_classes, "y": tile_shape[0], "x": tile_shape[1]}
        chunk_shape = tuple(chunk_sizes.get(axis, 1) for axis in axes)
        ome = _ome_metadata(
            name=path.stem or "probabilities",
            axes=axes,
            class_names=names,
            dtype=store_dtype,
            space_scale=space_scale,
            pyramid_levels=levels,
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreWriteError(
                f"cannot create {path}: {_reason(err)}; choose a writable output path"
            ) from err
        try:
            path.mkdir()  # exclusive: of two runs creating the same store, one is refused
        except FileExistsError:
            raise StoreExistsError(
                f"{path} was created by another run just now; choose another output path"
            ) from None
        except OSError as err:
            raise StoreWriteError(
                f"cannot create {path}: {_reason(err)}; choose a writable output path"
            ) from err
        lock = WriterLock(path)
        lock.acquire()
        try:
            group = zarr.create_group(
                str(path), zarr_format=3, attributes={"ome": ome, ATTRIBUTES_KEY: provenance}
            )
            level_shape = shape
            for level in range(levels + 1):
                level_chunks = _level_chunks(chunk_shape, axes, level)
                _create_level(group, str(level), level_shape, level_chunks, store_dtype, axes)
                level_shape = _halved(level_shape, axes)
            (path / MARKER_DIR).mkdir(exist_ok=True)
            (path / PYRAMID_MARKER_DIR).mkdir(exist_ok=True)
        except OSError as err:
            lock.release()
            raise StoreWriteError(
                f"cannot create {path}: {_reason(err)}; choose a writable output path"
            ) from err
        store = cls(path, group)
        store._lock, store._created_here = lock, True
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ProbabilityStore:
        """Reopen a store made by :meth:`create` (to resume writing it, or to read it).

        Raises
        ------
        InputError
            ``path`` does not exist or is not a napari-dense probability map.
        """
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path} does not exist: there is no probability map to open")
        not_ours = f"{path} is not a napari-dense probability map"
        if not path.is_dir():
            raise InputError(f"{not_ours} but a file (a map is a .zarr folder): give a map folder")
        try:
            group = zarr.open_group(str(path), mode="r+", zarr_format=3)
        except (zarr.errors.BaseZarrError, FileNotFoundError, NotADirectoryError) as err:
            raise InputError(f"{not_ours} (no Zarr v3 group there)") from err
        attributes = group.attrs.asdict()
        provenance = attributes.get(ATTRIBUTES_KEY)
        ome = attributes.get("ome")
        if not isinstance(provenance, dict) or not isinstance(ome, dict):
            raise InputError(f"{not_ours} (no 'napari_dense' and 'ome' attributes)")
        if ome.get("version") != NGFF_VERSION:
            raise InputError(f"{not_ours} (OME-NGFF version {ome.get('version')!r}, not 0.5)")
        try:
            store = cls(path, group)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise InputError(f"{not_ours} (incomplete OME metadata: {err!r})") from err
        if store.axes not in _VALID_AXES or store.array.ndim != len(store.axes):
            raise InputError(f"{not_ours} (axes {store.axes!r} do not fit its array)")
        if len(store.class_names) != store.num_classes:
            raise InputError(f"{not_ours} (the channel labels do not match the classes)")
        return store

    # ------------------------------------------------------------------ properties

    @property
    def array(self) -> zarr.Array:
        """The level-0 Zarr array, in the store's data type (see :meth:`read`)."""
        return self._array

    @property
    def dtype(self) -> np.dtype[Any]:
        """Data type on disk: ``float32``, ``float16`` or ``uint8``."""
        return np.dtype(self._array.dtype)

    @property
    def num_classes(self) -> int:
        """Size of axis ``c``."""
        return int(self._array.shape[self.axes.index("c")])

    @property
    def leading_axes(self) -> str:
        """The t/z axes, which ``leading`` indexes in :meth:`write_tile` (``""`` for ``"cyx"``)."""
        return "".join(axis for axis in self.axes if axis in "tz")

    @property
    def leading_shape(self) -> tuple[int, ...]:
        """Sizes of :attr:`leading_axes`."""
        return tuple(int(self._array.shape[self.axes.index(axis)]) for axis in self.leading_axes)

    @property
    def plane_shape(self) -> tuple[int, int]:
        """``(height, width)`` of level 0."""
        height, width = self._array.shape[-2:]
        return int(height), int(width)

    @property
    def tile_shape(self) -> tuple[int, int]:
        """``(tile_y, tile_x)``: the spatial chunk size."""
        tile_y, tile_x = self._array.chunks[-2:]
        return int(tile_y), int(tile_x)

    @property
    def attributes(self) -> dict[str, Any]:
        """The provenance (``"napari_dense"`` group attribute), as now on disk."""
        return dict(self._read_attributes()[ATTRIBUTES_KEY])

    @property
    def pyramid_levels(self) -> int:
        """Number of levels below level 0 listed in the NGFF metadata."""
        datasets = self._read_attributes()["ome"]["multiscales"][0]["datasets"]
        return len(datasets) - 1

    # ------------------------------------------------------------------ the writer lock

    @property
    def holds_lock(self) -> bool:
        """Whether this object holds the store's writer lock."""
        return self._lock.held

    def acquire_lock(self) -> None:
        """Become the store's one writing run (readers are never blocked).

        Taken by :meth:`create`, by :func:`napari_dense.to_zarr.prepare_run` on resume and by
        :meth:`finalize`; released by :meth:`release_lock`, at the end of :meth:`finalize`, and
        by the operating system when the process exits (also SIGKILL or a crash).

        Raises
        ------
        StoreLockedError
            Another run (another process, or another store object in this one) holds it; the
            message names its PID, host and start time.
        """
        self._lock.acquire()

    def release_lock(self) -> None:
        """Let another run write the store (no-op when not held)."""
        self._lock.release()

    def lock_owner(self) -> dict[str, Any]:
        """``{"pid", "host", "started"}`` of the last run that took the lock (``{}`` if none)."""
        return self._lock.owner()

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

    # ------------------------------------------------------------------ writing

    def write_tile(
        self, leading: Sequence[int], box: Sequence[int], probabilities: np.ndarray
    ) -> None:
        """Write one tile, then record it as completed.

        Parameters
        ----------
        leading
            Indices along :attr:`leading_axes` (``()`` for a ``"cyx"`` store).
        box
            ``(y0, y1, x0, x1)``, aligned to the chunk grid (``y1``/``x1`` may be the image edge),
            so that writers of different tiles never touch the same chunk.
        probabilities
            ``(K, y1 - y0, x1 - x0)`` probabilities (float32); converted to the store's dtype.

        When the store has pyramid levels and this object holds the writer lock, the tile's
        footprint in every level is updated too (from the tile's own values, and its
        neighbours' where a level pixel straddles two tiles), then recorded.

        Raises
        ------
        InputError
            Misaligned box, wrong shape, indices out of range, or a finalized store.
        StoreWriteError
            The data or the marker could not be written (full disk, permissions).
        """
        leading_index = self._check_leading(leading)
        tile_box = self._check_box(box)
        y0, y1, x0, x1 = tile_box
        expected = (self.num_classes, y1 - y0, x1 - x0)
        if tuple(probabilities.shape) != expected:
            raise InputError(
                f"a tile for box {tile_box} must have shape {expected}, got "
                f"{tuple(probabilities.shape)}"
            )
        if self._complete:
            raise InputError(
                f"{self.path} is finalized; its tiles can no longer change (write a new store, "
                "or pass overwrite=True)"
            )
        stored = _to_stored(np.asarray(probabilities), self.dtype)
        try:
            self._array[self._selection(leading_index, tile_box)] = stored
            # Only now, with the data on disk, may the tile count as done.
            self._record(leading_index, tile_box)
            if len(self._levels) > 1 and self.holds_lock:
                self._update_footprint(leading_index, tile_box, stored)
        except OSError as err:
            raise StoreWriteError(
                f"cannot write a tile to {self.path}: {_reason(err)}; free space or fix "
                "permissions, then resume (--resume): written tiles are kept"
            ) from err

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
                    f"cannot write the pyramid of {self.path}: {_reason(err)}; free space or fix "
                    "permissions, then resume (--resume)"
                ) from err

    def completed_tiles(self) -> set[TileKey]:
        """The ``(leading, box)`` of every tile :meth:`write_tile` has recorded, by any process."""
        return self._markers(MARKER_DIR)

    def pyramid_pending(self) -> set[TileKey]:
        """Recorded tiles whose footprint is not yet in the pyramid levels."""
        if len(self._levels) == 1:
            return set()
        return self.completed_tiles() - self._markers(PYRAMID_MARKER_DIR)

    def _markers(self, folder: str) -> set[TileKey]:
        try:
            names = [entry.name for entry in os.scandir(self.path / folder)]
        except FileNotFoundError:
            return set()
        keys = (self._parse_marker(name) for name in names)
        return {key for key in keys if key is not None}

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

    def is_complete(self) -> bool:
        """Whether :meth:`finalize` has finished (read from disk: another process may finalize)."""
        provenance = self._read_attributes()[ATTRIBUTES_KEY]
        self._complete = bool(provenance.get("complete", False))
        return self._complete

    def missing_chunks(self) -> int:
        """How many (leading, chunk) cells of level 0 no recorded tile covers yet."""
        return int(np.count_nonzero(~self._coverage()))

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
        extra = _jsonable(dict(attributes or {}), "attributes")
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
                target = _create_level(
                    self._group,
                    str(level),
                    _halved(source.shape, self.axes),
                    _level_chunks(self._array.chunks, self.axes, level),
                    self.dtype,
                    self.axes,
                    overwrite=True,
                )
                self._build_level(source, target)
                source = target
            self._remove_levels_beyond(pyramid_levels)
            self._levels = [_level_array(self._group, str(k)) for k in range(pyramid_levels + 1)]
            ome = _ome_metadata(
                name=self._name,
                axes=self.axes,
                class_names=self.class_names,
                dtype=self.dtype,
                space_scale=self.scale,
                pyramid_levels=pyramid_levels,
            )
            # One metadata write (atomic in zarr >= 3.1): pyramid listing and completion together.
            self._group.update_attributes(
                {"ome": ome, ATTRIBUTES_KEY: {**provenance, "complete": True}}
            )
        except OSError as err:
            raise StoreWriteError(
                f"cannot finalize {self.path}: {_reason(err)}; free space or fix permissions, "
                "then run again with --resume"
            ) from err
        self._complete = True

    # ------------------------------------------------------------------ reading

    def read(self, level: int = 0) -> np.ndarray:
        """The whole of a level as float32 probabilities (``uint8`` scaled back to 0..1)."""
        return _to_probabilities(np.asarray(self.level(level)[...]))

    def level(self, level: int) -> zarr.Array:
        """The Zarr array of a pyramid level (0 is full resolution), in the store's dtype."""
        if not 0 <= level <= self.pyramid_levels:
            raise InputError(f"{self.path} has levels 0..{self.pyramid_levels}, not {level}")
        return _level_array(self._group, str(level))

    def __repr__(self) -> str:
        return (
            f"ProbabilityStore({str(self.path)!r}, axes={self.axes!r}, "
            f"shape={tuple(self._array.shape)}, dtype={self.dtype.name}, "
            f"classes={self.class_names!r})"
        )

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Pickled by path (e.g. for worker processes): each process opens its own handle.
        return (ProbabilityStore.open, (str(self.path),))

    # ------------------------------------------------------------------ internals

    def _read_attributes(self) -> dict[str, Any]:
        # A fresh handle: the cached one would not see another process's finalize().
        return zarr.open_group(str(self.path), mode="r", zarr_format=3).attrs.asdict()

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
            mean = _to_stored(_local_mean_2x(_to_probabilities(block)), self.dtype)
            target[self._selection(leading, (top, bottom, left, right))] = mean
            block, (y0, y1, x0, x1) = mean, (top, bottom, left, right)
        self._touch_marker(PYRAMID_MARKER_DIR, self._marker_name(leading, box))

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
                    mean = _local_mean_2x(_to_probabilities(block))
                    target[self._selection(leading, (y0, y1, x0, x1))] = _to_stored(
                        mean, self.dtype
                    )

    def _remove_levels_beyond(self, pyramid_levels: int) -> None:
        """Delete levels left by an earlier finalize with more levels than now asked for."""
        level = pyramid_levels + 1
        while (self.path / str(level) / "zarr.json").exists():
            del self._group[str(level)]
            level += 1


# ---------------------------------------------------------------------- metadata


def _ome_metadata(
    *,
    name: str,
    axes: str,
    class_names: Sequence[str],
    dtype: np.dtype[Any],
    space_scale: Sequence[float],
    pyramid_levels: int,
) -> dict[str, Any]:
    """The ``"ome"`` group attribute: NGFF 0.5 multiscales and omero rendering settings."""
    space_sizes = dict(zip([axis for axis in axes if _AXIS_TYPES[axis] == "space"],
                           space_scale, strict=True))  # fmt: skip
    datasets = []
    for level in range(pyramid_levels + 1):
        factor = 2**level
        scale = []
        translation = []
        for axis in axes:
            size = float(space_sizes.get(axis, 1.0))
            downsampled = axis in "yx"
            scale.append(size * factor if downsampled else size)
            # Level pixel i averages level-0 pixels factor*i .. factor*i + factor - 1: its centre
            # lies (factor - 1) / 2 level-0 pixels after theirs.
            translation.append(size * (factor - 1) / 2 if downsampled else 0.0)
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if level:
            transforms.append({"type": "translation", "translation": translation})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    multiscale: dict[str, Any] = {
        "name": name,
        "axes": [{"name": axis, "type": _AXIS_TYPES[axis]} for axis in axes],
        "datasets": datasets,
    }
    if pyramid_levels:
        multiscale["type"] = "local_mean"
        multiscale["metadata"] = {
            "description": "2x2 mean over y and x of the level above; edge blocks average the "
            "pixels they contain",
        }
    top = 255 if dtype == np.uint8 else 1
    channels = [
        {
            "label": label,
            "color": class_colour(index),
            "window": {"start": 0, "end": top, "min": 0, "max": top},
            # As in the live overlay: background hidden, so the tissue shows beneath.
            "active": not is_background(label),
            "coefficient": 1,
            "family": "linear",
            "inverted": False,
        }
        for index, label in enumerate(class_names)
    ]
    return {
        "version": NGFF_VERSION,
        "multiscales": [multiscale],
        "omero": {
            "channels": channels,
            "rdefs": {"defaultT": 0, "defaultZ": 0, "model": "color"},
        },
    }


def _create_level(
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


def _level_array(group: zarr.Group, name: str) -> zarr.Array:
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise InputError(f"{group.store_path}/{name} is a group, not an array")
    return node.with_config({"write_empty_chunks": True})


def _level_chunks(chunks: Sequence[int], axes: str, level: int) -> tuple[int, ...]:
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


def _halved(shape: Sequence[int], axes: str) -> tuple[int, ...]:
    return tuple(
        -(-int(size) // 2) if axis in "yx" else int(size)
        for axis, size in zip(axes, shape, strict=True)
    )


# ---------------------------------------------------------------------- data conversion


def _to_stored(probabilities: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """Probabilities (float) as stored: cast, or ``round(p * 255)`` clipped for uint8."""
    if dtype == np.uint8:
        scaled = np.rint(np.asarray(probabilities, dtype=np.float32) * np.float32(255))
        return np.clip(scaled, 0, 255).astype(np.uint8)
    return np.asarray(probabilities).astype(dtype, copy=False)


def _to_probabilities(stored: np.ndarray) -> np.ndarray:
    """Stored values as float32 probabilities."""
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) / np.float32(255)
    return stored.astype(np.float32, copy=False)


def _local_mean_2x(block: np.ndarray) -> np.ndarray:
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


# ---------------------------------------------------------------------- argument checks


def _check_axes(axes: str) -> str:
    if not isinstance(axes, str) or axes.lower() not in _VALID_AXES:
        raise InputError(f"axes must be one of {', '.join(_VALID_AXES)}, got {axes!r}")
    return axes.lower()


def _check_shape(shape: Sequence[int], axes: str) -> tuple[int, ...]:
    try:
        values = tuple(operator.index(size) for size in shape)
    except TypeError:
        raise InputError(f"shape must be integers, got {shape!r}") from None
    if len(values) != len(axes) or min(values) < 1:
        raise InputError(f"shape {values} does not fit axes {axes!r} (one size ≥ 1 per axis)")
    return values


def _check_chunks(chunks: int | Sequence[int]) -> tuple[int, int]:
    try:
        values = (
            (operator.index(chunks),) * 2
            if not isinstance(chunks, Sequence)
            else tuple(operator.index(size) for size in chunks)
        )
    except TypeError:
        raise InputError(f"chunks must be (tile_y, tile_x) integers, got {chunks!r}") from None
    if len(values) != 2 or min(values) < 1:
        raise InputError(f"chunks must be (tile_y, tile_x), each ≥ 1, got {chunks!r}")
    return values[0], values[1]


def _check_dtype(dtype: str | np.dtype[Any]) -> np.dtype[Any]:
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in STORE_DTYPES:
        raise InputError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    return resolved


def auto_pyramid_levels(height: int, width: int, side: int = AUTO_PYRAMID_SIDE) -> int:
    """Halvings until the longer side of a ``height × width`` plane is at most ``side``."""
    levels, longest = 0, max(height, width)
    while longest > side:
        longest, levels = -(-longest // 2), levels + 1
    return levels


def _check_pyramid_levels(levels: int | str, plane: Sequence[int]) -> int:
    if levels == "auto":
        return auto_pyramid_levels(int(plane[0]), int(plane[1]))
    if isinstance(levels, bool) or not isinstance(levels, int | np.integer) or levels < 0:
        raise InputError(f"pyramid_levels must be 0 or more, or 'auto', got {levels!r}")
    return int(levels)


def _check_scale(scale: Sequence[float] | None, axes: str) -> tuple[float, ...]:
    space_axes = "".join(axis for axis in axes if _AXIS_TYPES[axis] == "space")
    if scale is None:
        return (1.0,) * len(space_axes)
    values = tuple(float(size) for size in scale)
    if len(values) != len(space_axes) or not all(
        math.isfinite(size) and size > 0 for size in values
    ):
        raise InputError(
            f"scale must give a positive pixel size per space axis ({', '.join(space_axes)}), "
            f"got {tuple(scale)}"
        )
    return values


def _jsonable(value: dict[str, Any], what: str) -> dict[str, Any]:
    """A JSON round trip of ``value`` (numpy scalars/arrays and paths converted)."""

    def convert(item: Any) -> Any:
        if isinstance(item, np.generic | np.ndarray):
            return item.tolist()
        if isinstance(item, os.PathLike):
            return os.fspath(item)
        if isinstance(item, set | frozenset):
            return sorted(item, key=str)
        raise TypeError(f"{type(item).__name__} is not JSON-serialisable")

    try:
        result: dict[str, Any] = json.loads(json.dumps(value, default=convert, allow_nan=True))
    except (TypeError, ValueError) as err:
        raise InputError(f"{what} must be JSON-serialisable: {err}") from None
    return result


# ---------------------------------------------------------------------- files


#: Top-level names inside a store that this project writes (levels are numbers).
_OUR_NAMES: Final = frozenset({"zarr.json", MARKER_DIR, PYRAMID_MARKER_DIR, LOCK_FILE, OWNER_FILE})
_OUR_NAME_PATTERN: Final = re.compile(r"\d+|\.[0-9a-f]{32}\.owner\.tmp")
#: A store's zarr.json larger than this is not ours (provenance is a few kB).
_MAX_METADATA_BYTES: Final = 16 * 2**20
_CHOOSE: Final = "choose another output path"


def _check_replaceable(path: Path, protect: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse (:class:`OverwriteRefusedError`) unless ``path`` is a store of ours, or empty."""
    if path.is_symlink():
        raise OverwriteRefusedError(
            f"{path} is a symbolic link (to {os.readlink(path)}); overwrite does not follow "
            f"links: {_CHOOSE}, or remove the link yourself"
        )
    real = path.resolve()
    for protected in protect:
        guarded = Path(protected).resolve()
        if guarded == real or real in guarded.parents:
            what = "is the input image" if guarded == real else f"contains the input {guarded}"
            raise OverwriteRefusedError(
                f"{path} {what}; napari-dense never deletes its input: {_CHOOSE}"
            )
    if not path.is_dir():
        raise OverwriteRefusedError(
            f"{path} is a file, not a probability map napari-dense wrote, so it is not deleted: "
            f"{_CHOOSE} (or delete the file yourself)"
        )
    names = sorted(entry.name for entry in os.scandir(path))
    if not names:
        return  # an empty directory holds nothing to lose
    if not any(name in names for name in ("zarr.json", ".zgroup", ".zarray")):
        raise OverwriteRefusedError(
            f"{path} exists and is not a Zarr store, so overwrite will not delete it; {_CHOOSE}"
        )
    if not _written_by_us(path / "zarr.json"):
        raise OverwriteRefusedError(
            f"{path} is a Zarr store that napari-dense did not write (no '{ATTRIBUTES_KEY}' "
            f"attribute), so overwrite will not delete it; {_CHOOSE}"
        )
    foreign = [n for n in names if n not in _OUR_NAMES and not _OUR_NAME_PATTERN.fullmatch(n)]
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise OverwriteRefusedError(
            f"{path} holds files napari-dense did not write ({listed}), so overwrite will not "
            f"delete it; move them out, or {_CHOOSE}"
        )


def _written_by_us(metadata: Path) -> bool:
    """Whether ``metadata`` is a Zarr v3 group's zarr.json with our provenance attribute."""
    try:
        if metadata.stat().st_size > _MAX_METADATA_BYTES:
            return False
        document = json.loads(metadata.read_bytes())
    except (OSError, ValueError):
        return False
    attributes = document.get("attributes") if isinstance(document, dict) else None
    return (
        document.get("zarr_format") == 3
        and document.get("node_type") == "group"
        and isinstance(attributes, dict)
        and isinstance(attributes.get(ATTRIBUTES_KEY), dict)
        and isinstance(attributes.get("ome"), dict)
    )


def _remove_existing_store(path: Path) -> None:
    """Delete what :func:`_check_replaceable` allowed, under the store's writer lock."""
    try:
        if not any(path.iterdir()):
            path.rmdir()  # fails, deleting nothing, if something appeared meanwhile
            return
        lock = WriterLock(path)
        lock.acquire()  # StoreLockedError while another run writes it
        try:
            shutil.rmtree(path)
        finally:
            lock.release()
    except OSError as err:
        raise StoreWriteError(f"cannot replace {path}: {_reason(err)}") from err


def _reason(err: OSError) -> str:
    return err.strerror or str(err)
