"""Sample data for *File › Open Sample › napari-dense* (offline: built from scikit-image's IHC).

Keys (stable; ``viewer.open_sample("napari-dense", key)``):

- ``"ihc"``: the 512 × 512 immunohistochemistry image (haematoxylin nuclei, DAB stain).
- ``"ihc_mosaic"``: a 16,384 × 16,384 mirrored mosaic of it, a lazy 6-level pyramid.
- ``"ihc_virtual_slide"``: a 102,400 × 102,400 virtual whole slide of mirrored, shifted copies,
  a lazy 9-level pyramid (:class:`napari_dense.io.virtual_slide.VirtualSlide`): any region is
  computed when napari or a run reads it, nothing is ever materialised.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MOSAIC_SIZE",
    "SAMPLE_KEYS",
    "SLIDE_SIZE",
    "ihc_mosaic",
    "ihc_virtual_slide",
    "immunohistochemistry",
]

SAMPLE_KEYS = ("ihc", "ihc_mosaic", "ihc_virtual_slide")
MOSAIC_SIZE = 16384  # 32 copies a side of the 512 px image (805 MB if it were in memory)
SLIDE_SIZE = 102_400  # 200 copies a side: 31 GB of RGB if it were in memory


def _ihc() -> Any:
    from skimage import data

    return data.immunohistochemistry()


def immunohistochemistry() -> list[tuple[Any, dict[str, Any], str]]:
    """The immunohistochemistry (IHC) image of scikit-image: haematoxylin nuclei and DAB stain."""
    return [(_ihc(), {"name": "IHC", "rgb": True}, "image")]


def ihc_mosaic() -> list[tuple[Any, dict[str, Any], str]]:
    """A 16k × 16k mirrored mosaic of the IHC image (seamless), a lazy multiscale pyramid."""
    from napari_dense.io.virtual_slide import VirtualSlide

    slide = VirtualSlide(_ihc(), (MOSAIC_SIZE, MOSAIC_SIZE), levels=5)
    meta = {"name": "IHC mosaic 16k", "rgb": True, "multiscale": True}
    return [(slide.pyramid(), meta, "image")]


def ihc_virtual_slide() -> list[tuple[Any, dict[str, Any], str]]:
    """A 102,400² RGB virtual whole slide: mirrored copies of the IHC image, shifted per 4096²
    block, as a lazy 9-level pyramid (level 8: 400 × 400)."""
    from napari_dense.io.virtual_slide import VirtualSlide

    slide = VirtualSlide(_ihc(), (SLIDE_SIZE, SLIDE_SIZE), levels=8, block=4096, seed=11)
    meta = {"name": "IHC virtual slide 100k", "rgb": True, "multiscale": True}
    return [(slide.pyramid(), meta, "image")]
