"""OME-Zarr (NGFF 0.5, Zarr v3) store for probability maps, written tile by tile.

The store's layout is in :mod:`._layout`; its NGFF metadata is built and read through
``ome-zarr-models`` (:mod:`._ngff`); its pyramid is in :mod:`._pyramid`, the per-tile markers in
:mod:`._markers`, overwrite protection in :mod:`._outputs`.

A tile counts as done only once its marker exists, made after its data are on disk.
``napari_dense.complete`` turns true only at the very end of :meth:`ProbabilityStore.finalize`.

Safety: one writing run at a time (:meth:`ProbabilityStore.acquire_lock`; readers are never
blocked); ``overwrite`` deletes only a store this project wrote — never a file, another Zarr, a
store holding foreign files, a symbolic link, or the input image or a folder containing it; every
chunk is written even when it holds only zeros, so that a recorded tile whose chunk is missing is
known to be lost (:meth:`ProbabilityStore.forget_unreadable_tiles`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.errors

from napari_dense.errors import InputError
from napari_dense.io.physical import PhysicalSpace
from napari_dense.io.store import _checks as check
from napari_dense.io.store._errors import StoreWriteError, reason
from napari_dense.io.store._layout import ATTRIBUTES_KEY, MARKER_DIR, PYRAMID_MARKER_DIR
from napari_dense.io.store._lock import LockMixin, WriterLock
from napari_dense.io.store._markers import MarkersMixin
from napari_dense.io.store._ngff import (
    VALID_AXES,
    StoreImage,
    level_spec,
    ome_attributes,
    read_image,
)
from napari_dense.io.store._outputs import make_store_folder
from napari_dense.io.store._pyramid import (
    PyramidMixin,
    check_pyramid_levels,
    create_level,
    halved,
    level_array,
    level_chunks,
    to_probabilities,
    to_stored,
)

__all__ = ["ProbabilityStore"]


class ProbabilityStore(LockMixin, MarkersMixin, PyramidMixin):
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
    scale : tuple[float, ...]
        Level 0's physical pixel size per space axis (z, y, x or y, x).
    space : PhysicalSpace
        Level 0's (y, x) pixel size, translation and units (:meth:`level_space` for the others).
    """

    def __init__(self, path: Path, group: zarr.Group, image: StoreImage) -> None:
        self.path = path
        self._group = group
        self.axes: str = image.axes
        self.class_names: list[str] = list(image.class_names)
        self.scale: tuple[float, ...] = image.scale
        self.space: PhysicalSpace = image.spaces[0]
        self._image, self._image_key = image, b""  # b"": validate again on first use
        self._name: str = image.name or path.stem
        attributes: dict[str, Any] = dict(group.attrs.asdict())
        self._complete = bool(attributes[ATTRIBUTES_KEY].get("complete", False))
        self._marker_dir_ready = False
        self._array = level_array(group, "0")
        #: Levels 0..N as listed in the metadata: 1..N are kept up to date by write_tile.
        self._levels = [level_array(group, str(k)) for k in range(len(image.spaces))]
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
        space: PhysicalSpace | Mapping[str, Any] | None = None,
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
        space
            The (y, x) physical space of level 0 (:class:`~napari_dense.io.physical.PhysicalSpace`,
            or a napari layer's ``{"scale", "translate", "units"}``): its pixel size, the
            position of pixel (0, 0)'s centre and the axes' units. Level ``k`` is
            ``space.downsampled(2**k)``. Its pixel size replaces ``scale``'s y and x (which
            must then agree with it or be left out); z keeps ``scale``'s.
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
        axes = check.check_axes(axes)
        shape = check.check_shape(shape, axes)
        tile_shape = check.check_chunks(chunks)
        store_dtype = check.check_dtype(dtype)
        num_classes = shape[axes.index("c")]
        names = [str(name) for name in class_names]
        if len(names) != num_classes:
            raise InputError(
                f"{len(names)} class names for {num_classes} classes (axis c of shape "
                f"{shape}); give one name per class"
            )
        space_scale = check.check_scale(scale, axes)
        plane = check.plane_space(space, space_scale, scale is not None)
        levels = check_pyramid_levels(pyramid_levels, shape[-2:])
        provenance = check.jsonable(dict(attributes or {}), "attributes")
        # Set here, not by the caller: only finalize() may declare the store complete.
        provenance["complete"] = False
        # All classes in one chunk (a tile is one write); one t/z index per chunk, so that tiles
        # of different planes never share a chunk.
        chunk_sizes = {"c": num_classes, "y": tile_shape[0], "x": tile_shape[1]}
        chunk_shape = tuple(chunk_sizes.get(axis, 1) for axis in axes)
        level_shapes = [shape]
        for _ in range(levels):
            level_shapes.append(halved(level_shapes[-1], axes))
        specs = [
            level_spec(level_shape, level_chunks(chunk_shape, axes, k), store_dtype, axes)
            for k, level_shape in enumerate(level_shapes)
        ]
        ome = ome_attributes(
            name=path.stem or "probabilities",
            axes=axes,
            class_names=names,
            dtype=store_dtype,
            arrays=specs,
            space=plane,
            z_scale=space_scale[0] if "z" in axes else 1.0,
        )
        make_store_folder(path, overwrite=overwrite, protect=protect)
        lock = WriterLock(path)
        lock.acquire()
        try:
            group = zarr.create_group(
                str(path), zarr_format=3, attributes={"ome": ome, ATTRIBUTES_KEY: provenance}
            )
            for k, level_shape in enumerate(level_shapes):
                chunking = level_chunks(chunk_shape, axes, k)
                create_level(group, str(k), level_shape, chunking, store_dtype, axes)
            (path / MARKER_DIR).mkdir(exist_ok=True)
            (path / PYRAMID_MARKER_DIR).mkdir(exist_ok=True)
        except OSError as err:
            lock.release()
            raise StoreWriteError(
                f"cannot create {path}: {reason(err)}; choose a writable output path"
            ) from err
        store = cls(path, group, read_image(group))
        store._lock, store._created_here = lock, True
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ProbabilityStore:
        """Reopen a store made by :meth:`create` (to resume writing it, or to read it).

        Its NGFF metadata is validated by ``ome-zarr-models`` (strict NGFF 0.5).

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
        if not isinstance(attributes.get(ATTRIBUTES_KEY), dict) or "ome" not in attributes:
            raise InputError(f"{not_ours} (no 'napari_dense' and 'ome' attributes)")
        try:
            image = read_image(group)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise InputError(f"{not_ours} (invalid OME-Zarr 0.5 metadata: {first})") from err
        store = cls(path, group, image)
        if store.axes not in VALID_AXES or store.array.ndim != len(store.axes):
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
        return self._current_image().pyramid_levels

    def level_space(self, level: int) -> PhysicalSpace:
        """The (y, x) physical space of a level, as its NGFF metadata gives it."""
        spaces = self._current_image().spaces
        if not 0 <= level < len(spaces):
            raise InputError(f"{self.path} has levels 0..{len(spaces) - 1}, not {level}")
        return spaces[level]

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
            ``(K, y1 - y0, x1 - x0)`` probabilities (float32); converted to the store's dtype,
            or already in it (uint8 ``round(p * 255)``, float16: written unchanged).

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
        stored = to_stored(np.asarray(probabilities), self.dtype)
        try:
            self._array[self._selection(leading_index, tile_box)] = stored
            # Only now, with the data on disk, may the tile count as done.
            self._record(leading_index, tile_box)
            if len(self._levels) > 1 and self.holds_lock:
                self._update_footprint(leading_index, tile_box, stored)
        except OSError as err:
            raise StoreWriteError(
                f"cannot write a tile to {self.path}: {reason(err)}; free space or fix "
                "permissions, then resume (--resume): written tiles are kept"
            ) from err

    def is_complete(self) -> bool:
        """Whether :meth:`finalize` has finished (read from disk: another process may finalize)."""
        provenance = self._read_attributes()[ATTRIBUTES_KEY]
        self._complete = bool(provenance.get("complete", False))
        return self._complete

    # ------------------------------------------------------------------ reading

    def read(self, level: int = 0) -> np.ndarray:
        """The whole of a level as float32 probabilities (``uint8`` scaled back to 0..1)."""
        return to_probabilities(np.asarray(self.level(level)[...]))

    def level(self, level: int) -> zarr.Array:
        """The Zarr array of a pyramid level (0 is full resolution), in the store's dtype."""
        if not 0 <= level <= self.pyramid_levels:
            raise InputError(f"{self.path} has levels 0..{self.pyramid_levels}, not {level}")
        return level_array(self._group, str(level))

    def __repr__(self) -> str:
        return (
            f"ProbabilityStore({str(self.path)!r}, axes={self.axes!r}, "
            f"shape={tuple(self._array.shape)}, dtype={self.dtype.name}, "
            f"classes={self.class_names!r})"
        )

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Pickled by path (e.g. for worker processes): each process opens its own handle.
        return (ProbabilityStore.open, (str(self.path),))

    def _fresh_group(self) -> zarr.Group:
        # A fresh handle: the cached one would not see another process's finalize().
        return zarr.open_group(str(self.path), mode="r", zarr_format=3)

    def _current_image(self) -> StoreImage:
        """The NGFF metadata now on disk, validated again only when zarr.json has changed."""
        current = (self.path / "zarr.json").read_bytes()  # read first: a later change re-reads
        if current != self._image_key:
            self._image, self._image_key = read_image(self._fresh_group()), current
        return self._image

    def _read_attributes(self) -> dict[str, Any]:
        return self._fresh_group().attrs.asdict()
