"""The live overlay: one multiscale napari layer per class, views of the store the run writes.

Every level of the store's pyramid is a level of the layers, so napari only reads what the
current zoom shows: adding the layers costs the same on 512² and on 100k²; they are added one
per event-loop turn, the shown ones first, and reused by the next run. The views read
through one :class:`ChunkCache` shared by the classes (a chunk holds every class, so it is
decoded once per refresh, not once per class); a landed tile makes only its own chunks stale,
and :meth:`LiveOverlay.refresh` re-slices the layers only when a stale chunk is in view.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np

from napari_dense._napari.layers import OUTPUT_KEY, class_layer_look, visible_box
from napari_dense.colours import is_background

__all__ = ["ChunkCache", "LiveOverlay", "StoreClassView"]

#: Decoded chunks kept for the overlay (the field of view needs a few per level).
CACHE_BYTES = 192 * 2**20

Box = tuple[int, int, int, int]

#: Wait between two layers added (or reused): the viewer paints and handles input between.
ADD_INTERVAL_MS = 30


class ChunkCache:
    """Decoded chunks ``(K, th, tw)`` of every level of a store, least recently used dropped.

    Read on the GUI thread while the run writes: a chunk that cannot be decoded (being
    written) reads as zeros and is not kept. A chunk no recorded tile touched (``written``, and
    every tile :meth:`invalidate` was told of since) is zeros without reading the store: the
    first slices of a new run's layers, and the unvisited parts of a slide, cost no I/O.
    """

    def __init__(
        self,
        store: Any,
        max_bytes: int = CACHE_BYTES,
        written: Iterable[tuple[tuple[int, ...], Box]] | None = None,
    ):
        self.store = store
        self.levels = [store.level(level) for level in range(store.pyramid_levels + 1)]
        self.axes = store.axes
        self._channel = store.axes.index("c")
        self._chunks: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self.reads = 0  # chunks decoded from disk (tests, benchmarks)
        self._written: set[tuple[Any, ...]] = set()
        for leading, box in store.completed_tiles() if written is None else written:
            self._mark(tuple(leading), box)

    def _footprint(self, box: Box) -> Iterable[tuple[int, int, int]]:
        """``(level, row, col)`` of every chunk a level-0 box touches, on every level."""
        y0, y1, x0, x1 = box
        for level, array in enumerate(self.levels):
            factor = 2**level
            tile_y, tile_x = (int(size) for size in array.chunks[-2:])
            for row in range(y0 // factor // tile_y, -(-y1 // factor) // tile_y + 1):
                for col in range(x0 // factor // tile_x, -(-x1 // factor) // tile_x + 1):
                    yield level, row, col

    def _mark(self, leading: tuple[int, ...], box: Box) -> None:
        for level, row, col in self._footprint(box):
            self._written.add((level, leading, row, col))

    def invalidate(self, leading: tuple[int, ...], box: Box) -> None:
        """A tile of level 0 changed: forget its chunks on every level (now written)."""
        for level, row, col in self._footprint(box):
            self._drop((level, leading, row, col))
            self._written.add((level, leading, row, col))

    def region(
        self,
        level: int,
        leading: tuple[int, ...],
        ys: slice,
        xs: slice,
        index: int | None = None,
    ) -> np.ndarray:
        """``(K, rows, cols)`` of ``level`` at ``leading`` (``ys``/``xs``: step 1, clipped);
        ``(1, rows, cols)`` of class ``index`` only when given (one layer's slice copies one
        class, not all)."""
        array = self.levels[level]
        height, width = (int(size) for size in array.shape[-2:])
        tile_y, tile_x = (int(size) for size in array.chunks[-2:])
        y0, y1, _ = ys.indices(height)
        x0, x1, _ = xs.indices(width)
        y1, x1 = max(y1, y0), max(x1, x0)
        classes = slice(None) if index is None else slice(index, index + 1)
        count = self.store.num_classes if index is None else 1
        out = np.zeros((count, y1 - y0, x1 - x0), dtype=array.dtype)
        rows, cols = range(y0 // tile_y, -(-y1 // tile_y)), range(x0 // tile_x, -(-x1 // tile_x))
        written = [
            (row, col)
            for row in rows
            for col in cols
            if (level, leading, row, col) in self._written
        ]
        if not written:  # nothing landed here yet: no read, no copy
            return out
        self._fetch(level, leading, written)
        for row, col in written:
            chunk = self._chunk(level, leading, row, col)
            cy0, cx0 = row * tile_y, col * tile_x
            a0, a1 = max(y0, cy0), min(y1, cy0 + chunk.shape[-2])
            b0, b1 = max(x0, cx0), min(x1, cx0 + chunk.shape[-1])
            out[:, a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = chunk[
                classes, a0 - cy0 : a1 - cy0, b0 - cx0 : b1 - cx0
            ]
        return out

    def _fetch(self, level: int, leading: tuple[int, ...], chunks: list[tuple[int, int]]) -> None:
        """Decode the missing ones of ``chunks`` (``(row, col)``) in one read of their bounding
        block (zarr decodes them concurrently; one call per chunk costs milliseconds each)."""
        missing = [
            (row, col) for row, col in chunks if (level, leading, row, col) not in self._chunks
        ]
        if len(missing) < 2:
            return
        array = self.levels[level]
        tile_y, tile_x = (int(size) for size in array.chunks[-2:])
        r0, r1 = min(r for r, _ in missing), max(r for r, _ in missing) + 1
        c0, c1 = min(c for _, c in missing), max(c for _, c in missing) + 1
        ys = slice(r0 * tile_y, min(r1 * tile_y, int(array.shape[-2])))
        xs = slice(c0 * tile_x, min(c1 * tile_x, int(array.shape[-1])))
        by_axis: dict[str, Any] = dict(zip(self.store.leading_axes, leading, strict=True))
        by_axis.update(c=slice(None), y=ys, x=xs)
        try:
            block = np.asarray(array[tuple(by_axis[axis] for axis in self.axes)])
        except Exception:  # being written: chunk by chunk below
            return
        self.reads += 1
        for row, col in missing:
            a0, b0 = (row - r0) * tile_y, (col - c0) * tile_x
            chunk = np.ascontiguousarray(block[:, a0 : a0 + tile_y, b0 : b0 + tile_x])
            self._keep((level, leading, row, col), chunk)

    def _keep(self, key: tuple[Any, ...], chunk: np.ndarray) -> None:
        self._drop(key)
        self._chunks[key] = chunk
        self._bytes += chunk.nbytes
        while self._bytes > self._max_bytes and len(self._chunks) > 1:
            _, dropped = self._chunks.popitem(last=False)
            self._bytes -= dropped.nbytes

    def _chunk(self, level: int, leading: tuple[int, ...], row: int, col: int) -> np.ndarray:
        key = (level, leading, row, col)
        chunk = self._chunks.get(key)
        if chunk is not None:
            self._chunks.move_to_end(key)
            return chunk
        array = self.levels[level]
        tile_y, tile_x = (int(size) for size in array.chunks[-2:])
        ys = slice(row * tile_y, min((row + 1) * tile_y, int(array.shape[-2])))
        xs = slice(col * tile_x, min((col + 1) * tile_x, int(array.shape[-1])))
        by_axis: dict[str, Any] = dict(zip(self.store.leading_axes, leading, strict=True))
        by_axis.update(c=slice(None), y=ys, x=xs)
        try:
            chunk = np.asarray(array[tuple(by_axis[axis] for axis in self.axes)])
        except Exception:  # being written right now: zeros this time, read again next time
            shape = (self.store.num_classes, ys.stop - ys.start, xs.stop - xs.start)
            return np.zeros(shape, dtype=array.dtype)
        self.reads += 1
        self._keep(key, chunk)
        return chunk

    def _drop(self, key: tuple[Any, ...]) -> None:
        chunk = self._chunks.pop(key, None)
        if chunk is not None:
            self._bytes -= chunk.nbytes


class StoreClassView:
    """One class of one level of a store as a read-only array (what napari slices).

    Indexing reads only the chunks the key touches, through the shared :class:`ChunkCache`.
    """

    def __init__(self, cache: ChunkCache, level: int, index: int):
        self._cache, self._level, self._index = cache, level, index
        array = cache.levels[level]
        shape = list(array.shape)
        del shape[cache.axes.index("c")]
        self.shape = tuple(int(size) for size in shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))

    def __getitem__(self, key: Any) -> np.ndarray:
        key = _full_key(key, self.ndim)
        *leading, ys, xs = key
        plane_y = _as_slice(ys)
        plane_x = _as_slice(xs)
        if all(isinstance(index, int | np.integer) for index in leading):
            plane = self._cache.region(
                self._level, tuple(int(i) for i in leading), plane_y[0], plane_x[0], self._index
            )[0]
            return plane[plane_y[1], plane_x[1]]
        # Several planes at once (3-D rendering): read them directly.
        array = self._cache.levels[self._level]
        by_axis = dict(zip(self._cache.store.leading_axes, leading, strict=True))
        by_axis.update(c=self._index, y=ys, x=xs)
        return np.asarray(array[tuple(by_axis[axis] for axis in self._cache.axes)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[...]
        return data if dtype is None else data.astype(dtype)


def _full_key(key: Any, ndim: int) -> tuple[Any, ...]:
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:at] + (slice(None),) * (ndim - len(key) + 1) + key[at + 1 :]
    return key + (slice(None),) * (ndim - len(key))


def _as_slice(index: Any) -> tuple[slice, Any]:
    """``(bounding slice with step 1, index into the read block)`` of a y or x index."""
    if isinstance(index, int | np.integer):
        return slice(int(index), int(index) + 1), 0
    if isinstance(index, slice) and index.step in (None, 1):
        return slice(index.start, index.stop), slice(None)
    if isinstance(index, slice) and index.step > 0:
        return slice(index.start, index.stop), slice(None, None, index.step)
    raise IndexError(f"unsupported index {index!r} for a probability map view")


class LiveOverlay:
    """The class layers of one run and what refreshing them needs.

    Adding a napari layer (its controls, its vispy visual, its first slice) costs a tenth of a
    second or more on the GUI thread, so no call here adds more than one: the layers that
    :meth:`show` makes visible are added first, one per event-loop turn, the hidden ones after
    them (:attr:`layers` adds any still pending at once). Layers of a previous run with the same
    classes and the same multiscale-ness are reused: their data become this run's views.

    Parameters
    ----------
    viewer
        Where to add the layers.
    store
        The run's :class:`~napari_dense.io.store.ProbabilityStore` (every level of its pyramid).
    scale, translate
        World transform of the ``(y, x)`` pixels of the image the run reads.
    units
        Units of ``(y, x)`` (None: napari's default).
    shown
        The class shown at first (:meth:`show`).
    reuse
        The previous run's overlay: its layers are reused where they fit, removed otherwise.
    """

    def __init__(
        self,
        viewer: Any,
        store: Any,
        scale: Iterable[float],
        translate: Iterable[float],
        units: Iterable[str | None] | None = None,
        shown: str = "all",
        reuse: LiveOverlay | None = None,
    ):
        from qtpy.QtCore import QTimer

        self.store = store
        self.cache = ChunkCache(store)
        self._viewer = viewer
        self._stale: list[tuple[tuple[int, ...], Box]] = []
        self._shown = shown
        self._stopped = False
        self._multiscale = len(self.cache.levels) > 1
        lead = (1.0,) * len(store.leading_axes)
        self._scale = (*lead, *scale)
        self._translate = (*(0.0 for _ in lead), *translate)
        units = tuple(units or ())
        self._units = units if len(units) == 2 and all(units) else None
        self._layers: list[Any] = [None] * store.num_classes
        self._reusable: dict[int, Any] = {}  # class -> a previous run's layer, swapped in turn
        old = {} if reuse is None else reuse._take()
        for k, name in enumerate(store.class_names):
            layer = old.pop(name, None)
            if (
                layer is not None
                and layer.multiscale == self._multiscale
                and layer in viewer.layers
            ):
                self._reusable[k] = layer
        for layer in old.values():  # classes of another model, or another kind of layer
            if layer in viewer.layers:
                viewer.layers.remove(layer)
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(ADD_INTERVAL_MS)
        self._timer.timeout.connect(self._add_next)
        self.show(shown)
        self._timer.start()

    # -- the layers --------------------------------------------------------------------------

    @property
    def layers(self) -> list[Any]:
        """Every class layer, in class order (those still pending are added now)."""
        self.complete()
        return list(self._layers)

    def complete(self) -> None:
        """Add (or swap in) every layer still pending, now."""
        while self._add_next():
            pass

    @property
    def added(self) -> list[Any]:
        """The class layers added so far (never adds one)."""
        return [layer for layer in self._layers if layer is not None]

    def stop(self) -> None:
        """Add no more layers (the widget was closed)."""
        self._timer.stop()
        self._stopped = True

    def _take(self) -> dict[str, Any]:
        """This overlay's layers by class name, for the next run's overlay (it owns them now)."""
        self.stop()
        taken = {layer.metadata[OUTPUT_KEY]["class"]: layer for layer in self.added}
        for k, layer in self._reusable.items():  # never swapped in: still the older run's
            taken.setdefault(self.store.class_names[k], layer)
        self._layers, self._reusable = [None] * len(self._layers), {}
        return taken

    def _views(self, k: int) -> Any:
        levels = range(len(self.cache.levels))
        if self._multiscale:
            return [StoreClassView(self.cache, level, k) for level in levels]
        # One level (a small map): a plain layer; napari's single-level multiscale path
        # crashed vispy's software GL under Xvfb here.
        return StoreClassView(self.cache, 0, k)

    def _wanted(self, k: int) -> bool:
        name = self.store.class_names[k]
        return name == self._shown or (self._shown == "all" and not is_background(name))

    def _reuse(self, layer: Any, k: int) -> None:
        """Make a previous run's layer show class ``k`` of this run (sliced once, not per
        attribute: napari's refresh is held until the data are swapped)."""
        # Each attribute set emits events the viewer answers (extents, the layer list): only
        # what differs is set.
        look = class_layer_look(self.store, k)
        wanted: dict[str, Any] = {
            "scale": self._scale,
            "translate": self._translate,
            "contrast_limits": tuple(look["contrast_limits"]),
            "visible": self._wanted(k),
        }
        if self._units is not None:
            wanted["units"] = (*tuple(layer.units)[:-2], *self._units)
        block = getattr(layer, "_block_refresh", None)
        with block() if block is not None else contextlib.nullcontext():
            layer.metadata = look["metadata"]
            for name, value in wanted.items():
                if not np.array_equal(np.asarray(getattr(layer, name), dtype=object), value):
                    setattr(layer, name, value)
        layer.data = self._views(k)
        self._layers[k] = layer

    def _add_next(self) -> bool:
        """Add one pending layer (shown ones first); False when none is pending."""
        if self._stopped:
            return False
        pending = [k for k, layer in enumerate(self._layers) if layer is None]
        if not pending:
            return False
        k = min(pending, key=lambda k: (not self._wanted(k), k))
        if len(pending) > 1:
            self._timer.start()  # the next one on the next event-loop turn
        reused = self._reusable.pop(k, None)
        if reused is not None and reused in self._viewer.layers:
            self._reuse(reused, k)
            return True
        from napari.layers import Image

        layer = Image(
            self._views(k),
            multiscale=self._multiscale,
            scale=self._scale,
            translate=self._translate,
            cache=False,
            visible=self._wanted(k),
            **class_layer_look(self.store, k),
        )
        if self._units is not None:
            layer.units = (*tuple(layer.units)[:-2], *self._units)
        self._layers[k] = layer
        layers = self._viewer.layers
        # Not made the active layer: the user's selection stays, and napari does not switch
        # the layer controls for each (a tenth of a second per layer on the GUI thread).
        # napari has no public switch for it; without the private one layers are activated.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # napari: private access
            activate = getattr(layers, "_activate_on_insert", None)
            if activate is not None:
                layers._activate_on_insert = False
        try:
            layers.insert(self._position(k), layer)
        finally:
            if activate is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    layers._activate_on_insert = activate
        return True

    def _position(self, k: int) -> int:
        """Where class ``k`` goes in the layer list: in class order among this run's layers."""
        layers = list(self._viewer.layers)
        for other in range(k + 1, len(self._layers)):
            if self._layers[other] is not None and self._layers[other] in layers:
                return layers.index(self._layers[other])
        for other in range(k - 1, -1, -1):
            if self._layers[other] is not None and self._layers[other] in layers:
                return layers.index(self._layers[other]) + 1
        return len(layers)

    # -- showing and refreshing --------------------------------------------------------------

    def show(self, name: str) -> None:
        """Show one class, or ``"all"``: every class but background (it would hide the image)."""
        self._shown = name
        for k, layer in enumerate(self._layers):
            if layer is not None:
                layer.visible = self._wanted(k)

    def tile_landed(self, leading: tuple[int, ...], box: Box) -> None:
        """A tile was written: its chunks are stale (cheap; :meth:`refresh` redraws)."""
        self.cache.invalidate(leading, box)
        self._stale.append((leading, box))

    def refresh(self, force: bool = False) -> bool:
        """Re-slice the visible layers if a stale tile is in view (or ``force``); True if so."""
        stale, self._stale = self._stale, []
        shown = [layer for layer in self.added if layer.visible]
        if not shown or not (force or (stale and self._in_view(shown[0], stale))):
            return False
        for layer in shown:
            layer.refresh(thumbnail=force, extent=False, highlight=False)
        return True

    def _in_view(self, layer: Any, stale: list[tuple[tuple[int, ...], Box]]) -> bool:
        height, width = self.store.plane_shape
        try:
            y0, y1, x0, x1 = visible_box(layer, height, width)
        except Exception:  # no view yet: redraw
            return True
        return any(b[0] < y1 and b[1] > y0 and b[2] < x1 and b[3] > x0 for _, b in stale)
