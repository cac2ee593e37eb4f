"""Sample data for File > Open Sample (bundled offline with scikit-image)."""

from __future__ import annotations

from typing import Any

__all__ = ["ihc_mosaic", "immunohistochemistry"]

MOSAIC_REPEATS = 32  # 512 px × 32 = a 16384 × 16384 RGB image (805 MB if it were in memory)


def immunohistochemistry() -> list[tuple[Any, dict[str, Any], str]]:
    """The immunohistochemistry (IHC) image of scikit-image: haematoxylin nuclei and DAB stain."""
    from skimage import data

    return [(data.immunohistochemistry(), {"name": "IHC", "rgb": True}, "image")]


def ihc_mosaic() -> list[tuple[Any, dict[str, Any], str]]:
    """A 16k × 16k lazily tiled mosaic of the IHC image, for out-of-core runs.

    Built with dask from one 512 × 512 tile (mirrored so that seams are continuous): nothing
    is held in memory beyond the tiles a viewer or a run reads.
    """
    import dask.array as da
    from skimage import data

    tile = data.immunohistochemistry()
    mirrored = da.block([[tile, tile[:, ::-1]], [tile[::-1], tile[::-1, ::-1]]])
    mosaic = da.tile(mirrored.rechunk((512, 512, 3)), (MOSAIC_REPEATS // 2, MOSAIC_REPEATS // 2, 1))
    return [(mosaic, {"name": "IHC mosaic 16k", "rgb": True}, "image")]
