"""The one class colour table: the live overlay, the saved map's OME-Zarr metadata, the panels.

Class ``k`` is shown in ``CLASS_COLOURS[k % len(CLASS_COLOURS)]`` everywhere, so that a map
reopened from disk looks like the overlay of the run that wrote it. A class named like
background (:func:`is_background`) is hidden by default (it would cover the tissue).
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

__all__ = [
    "CLASS_COLOURS",
    "class_colour",
    "class_colourmap",
    "class_rgb",
    "is_background",
]

#: Class colours (RGB hex, no ``#``), distinct on a black background and in additive blending;
#: cycled beyond ten classes.
CLASS_COLOURS: Final = (
    "FF00FF",  # magenta
    "00FF00",  # green
    "00FFFF",  # cyan
    "FFFF00",  # yellow
    "FF0000",  # red
    "0080FF",  # azure (pure blue is too dark on black)
    "FF8000",  # orange
    "8000FF",  # violet
    "00FF80",  # spring green
    "FF0080",  # rose
)

#: Class names (lower case) that mean "no object here".
_BACKGROUND_NAMES: Final = frozenset({"background", "bg", "back ground", "backdrop"})


def class_colour(index: int) -> str:
    """RGB hex (``"FF00FF"``) of class ``index``."""
    return CLASS_COLOURS[index % len(CLASS_COLOURS)]


def class_rgb(index: int) -> tuple[float, float, float]:
    """``(r, g, b)`` in 0..1 of class ``index``."""
    colour = class_colour(index)
    red, green, blue = (int(colour[i : i + 2], 16) / 255 for i in (0, 2, 4))
    return red, green, blue


def is_background(name: str) -> bool:
    """Whether a class name means background (``"background"``, ``"Background (glass)"``, ``"bg"``).

    Such classes are hidden by default in the overlay and ``active: false`` in the saved map.
    """
    lowered = str(name).strip().lower()
    return lowered in _BACKGROUND_NAMES or "background" in lowered


def display_max(dtype: Any) -> int:
    """The top of a class's display window: 255 for maps stored as uint8, else 1 (the
    overlay's contrast limits, the saved map's omero window, the reopened layers')."""
    return 255 if np.dtype(dtype) == np.uint8 else 1


def class_colourmap(index: int) -> Any:
    """A napari ``Colormap`` from black to the class colour (napari is imported on demand)."""
    from napari.utils.colormaps import Colormap

    return Colormap(
        [[0.0, 0.0, 0.0, 1.0], [*class_rgb(index), 1.0]],
        name=f"napari-dense {class_colour(index)}",
    )
