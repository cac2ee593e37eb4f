"""napari layers as the widgets see them: inputs (never our outputs), levels, the field of view."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "OUTPUT_KEY",
    "class_layer_look",
    "field_of_view_centre",
    "image_data",
    "input_layers",
    "is_output_layer",
    "level_transform",
    "visible_box",
]

#: Key of the metadata every layer napari-dense adds carries (class maps, difference layers).
OUTPUT_KEY = "napari_dense"
#: Suffix of the names of the layers napari-dense adds.
OUTPUT_SUFFIX = " (napari-dense)"


def class_layer_look(store: Any, k: int) -> dict[str, Any]:
    """How class ``k`` of a probability store is shown, live or reopened: name, colour,
    additive blending, display window, and metadata naming the store and the class."""
    from napari_dense.colours import class_colourmap, display_max

    name = store.class_names[k]
    return {
        "name": f"{name}{OUTPUT_SUFFIX}",
        "colormap": class_colourmap(k),  # the saved map's omero colours too
        "blending": "additive",
        "contrast_limits": [0, display_max(store.dtype)],
        "metadata": {OUTPUT_KEY: {"store": str(store.path), "class": name}},
    }


def is_output_layer(layer: Any) -> bool:
    """Whether napari-dense added ``layer`` (a class map or a difference): never an input."""
    metadata = getattr(layer, "metadata", None) or {}
    return OUTPUT_KEY in metadata or str(getattr(layer, "name", "")).endswith(OUTPUT_SUFFIX)


def input_layers(viewer: Any) -> list[tuple[str, Any]]:
    """``(name, layer)`` of every image layer that may be an input (magicgui choices)."""
    from napari.layers import Image

    return [
        (layer.name, layer)
        for layer in viewer.layers
        if isinstance(layer, Image) and not is_output_layer(layer)
    ]


def image_data(layer: Any, level: int = 0) -> Any:
    """The data of one level of an image layer (not multiscale: the data; 0 = full resolution)."""
    if not layer.multiscale:
        return layer.data
    return layer.data[min(max(level, 0), len(layer.data) - 1)]


def plane_shape(layer: Any, level: int = 0) -> tuple[int, int]:
    """``(height, width)`` of a level of an image layer (RGB: the colour axis is not counted)."""
    shape = image_data(layer, level).shape
    return (int(shape[-3]), int(shape[-2])) if layer.rgb else (int(shape[-2]), int(shape[-1]))


def level_transform(layer: Any, level: int) -> tuple[np.ndarray, np.ndarray]:
    """World ``(scale, translate)`` of ``(y, x)`` pixels of ``level`` of ``layer``.

    A level ``f`` times coarser than level 0 has pixels ``f`` times larger whose centres lie
    ``(f - 1) / 2`` level-0 pixels further (each averages ``f × f`` level-0 pixels).
    """
    scale = np.asarray(layer.scale[-2:], dtype=float)
    translate = np.asarray(layer.translate[-2:], dtype=float)
    if not layer.multiscale or level == 0:
        return scale, translate
    factor = np.asarray(plane_shape(layer, 0), float) / np.asarray(plane_shape(layer, level), float)
    return scale * factor, translate + scale * (factor - 1) / 2


def field_of_view_centre(viewer: Any, layer: Any, level: int = 0) -> tuple[float, float] | None:
    """The camera centre in pixels ``(y, x)`` of ``level`` of ``layer`` (None: no preference)."""
    try:
        centre = np.asarray(viewer.scene.camera.center, dtype=float)[-2:]
    except Exception:  # a camera without a 2-D centre
        return None
    scale, translate = level_transform(layer, level)
    pixel = (centre - translate) / scale
    return float(pixel[0]), float(pixel[1])


def visible_box(layer: Any, height: int, width: int) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of the layer's full-resolution pixels in view (at least 64 a side).

    napari keeps the displayed corners of each layer (at its current level) up to date while
    drawing; a multiscale layer's are scaled back to level 0.
    """
    corners = np.asarray(layer.corner_pixels, dtype=float)[:, -2:]
    if layer.multiscale and layer.data_level:
        level_height, level_width = plane_shape(layer, layer.data_level)
        corners = corners * np.array([height / level_height, width / level_width])
    (y0, x0), (y1, x1) = corners.astype(int)
    y0, x0 = max(min(y0, height - 64), 0), max(min(x0, width - 64), 0)
    y1, x1 = min(max(y1, y0 + 64), height), min(max(x1, x0 + 64), width)
    return int(y0), int(y1), int(x0), int(x1)
