"""Write probability-map image layers to OME-Zarr through the engine's store (provenance kept).

The saved map reopens, dragged back in, as the overlay looked: napari-dense's map reader is
kept as the reader of that folder (:func:`~napari_dense._napari.reader.remember_map_reader`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_dense._napari.reader import remember_map_reader
from napari_dense.io.physical import PhysicalSpace
from napari_dense.io.store import ProbabilityStore, resolve_space

__all__ = ["write_probability_maps"]

CHUNK = 1024


def _provenance(meta: dict[str, Any]) -> dict[str, Any]:
    """The provenance of the store a napari-dense layer came from, plus the layer's name."""
    info = dict(meta.get("metadata", {}).get("napari_dense", {}))
    provenance: dict[str, Any] = {"layer": meta.get("name")}
    source = info.get("store")
    if source:
        try:
            provenance.update(ProbabilityStore.open(source).attributes)
        except Exception:  # the temporary store is gone: keep what the layer knows
            provenance["source_store"] = source
    provenance["complete"] = False
    return provenance


def write_probability_maps(
    path: str, layer_data: list[tuple[Any, dict[str, Any], str]]
) -> list[str]:
    """napari writer hook: one or more 2-D image layers -> one OME-Zarr map, one class each.

    Multiscale layers (the live overlay) are written from their full-resolution level, one
    chunk at a time: a whole-slide map is never held in memory.
    """
    levels = [data[0] if meta.get("multiscale") else data for data, meta, _ in layer_data]
    shapes = {tuple(np.shape(level)) for level in levels}
    if any(len(shape) != 2 for shape in shapes) or len(shapes) != 1:
        raise ValueError("napari-dense writes 2-D probability layers of one shape (Y, X)")
    names = [meta.get("name", f"class {k}") for k, (_, meta, _) in enumerate(layer_data)]
    names = [name.removesuffix(" (napari-dense)") for name in names]
    height, width = shapes.pop()
    chunks = (min(CHUNK, height), min(CHUNK, width))
    store = ProbabilityStore.create(
        path,
        shape=(len(levels), height, width),
        axes="cyx",
        chunks=chunks,
        class_names=names,
        attributes=_provenance(layer_data[0][1]),
        overwrite=True,
        space=_layer_space(layer_data[0][1]),
    )
    scales = [
        _to_probability_scale(meta, level)
        for level, (_, meta, _) in zip(levels, layer_data, strict=True)
    ]
    for y0 in range(0, height, chunks[0]):
        for x0 in range(0, width, chunks[1]):
            y1, x1 = min(y0 + chunks[0], height), min(x0 + chunks[1], width)
            block = np.stack(
                [
                    np.asarray(level[y0:y1, x0:x1], dtype=np.float32) * scale
                    for level, scale in zip(levels, scales, strict=True)
                ]
            )
            store.write_tile((), (y0, y1, x0, x1), block)
    store.finalize(attributes={"complete": True})
    remember_map_reader(path)
    return [path]


def _layer_space(meta: dict[str, Any]) -> PhysicalSpace:
    """The (y, x) scale, translate and units of a layer (of its full-resolution level)."""
    return resolve_space(
        {
            "scale": meta.get("scale", (1.0, 1.0)),
            "translate": meta.get("translate", (0.0, 0.0)),
            "units": meta.get("units") or (None, None),
        }
    )


def _to_probability_scale(_meta: dict[str, Any], level: Any) -> float:
    """1/255 for a uint8 map (stored ``round(p * 255)``), else 1."""
    return 1 / 255 if np.dtype(getattr(level, "dtype", np.float32)) == np.uint8 else 1.0
