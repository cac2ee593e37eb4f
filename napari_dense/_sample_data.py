"""Sample data for napari's File > Open Sample menu (bundled offline with scikit-image)."""

from __future__ import annotations

from typing import Any

__all__ = ["immunohistochemistry"]


def immunohistochemistry() -> list[tuple[Any, dict[str, Any], str]]:
    """The immunohistochemistry (IHC) image of scikit-image: haematoxylin nuclei and DAB stain."""
    from skimage import data

    return [(data.immunohistochemistry(), {"name": "IHC", "rgb": True}, "image")]
