"""Physical space of an image: pixel size, offset and units of its (Y, X) axes, channel names.

Read from the image's own metadata — OME-Zarr (through ``ome-zarr-models``: axes units and the
``coordinateTransformations`` of the chosen level, composed with the multiscale's own), OME-TIFF
(``PhysicalSizeX/Y`` and their units, channel names), ImageJ TIFF (``unit`` and the resolution
tags) and TIFF resolution tags — and carried to the output: every level of the probability map
and the napari layers sit where the image sits in world coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["PhysicalSpace", "from_ome_zarr", "from_tiff"]

#: Unit names as NGFF spells them (the UDUNITS-2 names), from what files write.
_UNIT_NAMES = {
    "µm": "micrometer",
    "um": "micrometer",
    "μm": "micrometer",
    "micron": "micrometer",
    "microns": "micrometer",
    "micrometer": "micrometer",
    "nm": "nanometer",
    "nanometer": "nanometer",
    "mm": "millimeter",
    "millimeter": "millimeter",
    "cm": "centimeter",
    "centimeter": "centimeter",
    "m": "meter",
    "meter": "meter",
    "pixel": None,
}


@dataclass(frozen=True)
class PhysicalSpace:
    """Where the pixels of an image plane sit: ``world = translation + index * scale``.

    Attributes
    ----------
    scale
        ``(y, x)`` size of one pixel, in ``units``.
    translation
        ``(y, x)`` world position of pixel ``(0, 0)``'s centre.
    units
        ``(y, x)`` NGFF unit names (``"micrometer"``) or None where unknown.
    channel_names
        Names of the image's channels, where its metadata gives them.
    """

    scale: tuple[float, float] = (1.0, 1.0)
    translation: tuple[float, float] = (0.0, 0.0)
    units: tuple[str | None, str | None] = (None, None)
    channel_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not all(math.isfinite(s) and s > 0 for s in self.scale):
            object.__setattr__(self, "scale", (1.0, 1.0))
        if not all(math.isfinite(t) for t in self.translation):
            object.__setattr__(self, "translation", (0.0, 0.0))

    @property
    def is_default(self) -> bool:
        """No metadata: one unit per pixel, at the origin, without units."""
        return self == PhysicalSpace(channel_names=self.channel_names)

    def downsampled(self, factor: int) -> PhysicalSpace:
        """The space of a level ``factor``× coarser by block means (``factor`` pixels per pixel).

        A block's centre lies ``(factor - 1) / 2`` fine pixels from its first pixel's centre.
        """
        scale = (self.scale[0] * factor, self.scale[1] * factor)
        shift = (factor - 1) / 2
        translation = (
            self.translation[0] + shift * self.scale[0],
            self.translation[1] + shift * self.scale[1],
        )
        return replace(self, scale=scale, translation=translation)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (provenance)."""
        return {
            "scale": list(self.scale),
            "translation": list(self.translation),
            "units": list(self.units),
            "channel_names": list(self.channel_names) if self.channel_names else None,
        }

    def napari_kwargs(self) -> dict[str, Any]:
        """``scale``, ``translate`` (and ``units`` where known) for a 2-D napari layer."""
        kwargs: dict[str, Any] = {"scale": self.scale, "translate": self.translation}
        if all(self.units):
            kwargs["units"] = self.units
        return kwargs


def unit_name(unit: Any) -> str | None:
    """The NGFF name of a unit as files write it (``"µm"``, ``"micron"``); None if unknown."""
    if unit is None:
        return None
    text = str(unit).strip()
    return _UNIT_NAMES.get(text, _UNIT_NAMES.get(text.lower(), text.lower() or None))


# ---------------------------------------------------------------------- OME-Zarr


def from_ome_zarr(group: Any, level: int) -> tuple[PhysicalSpace, list[str], str]:
    """Physical space, axis names and the array path of ``level`` of an OME-Zarr image group.

    Uses :func:`ome_zarr_models.open_ome_zarr` (NGFF 0.4 and 0.5), which validates the
    metadata. Raises ``ValueError`` (from the library) for a group that is not an OME-Zarr image,
    ``IndexError`` for a level it does not have.
    """
    import ome_zarr_models

    image: Any = ome_zarr_models.open_ome_zarr(group)
    # NGFF 0.5 groups keep them under "ome"; 0.4 groups at the top.
    attributes: Any = getattr(image, "ome_attributes", None) or image.attributes
    multiscale = attributes.multiscales[0]
    datasets = multiscale.datasets
    if not 0 <= level < len(datasets):
        raise IndexError(f"levels 0-{len(datasets) - 1}; level {level} does not exist")
    axes = [axis.name for axis in multiscale.axes]
    scale, translation = _compose(
        datasets[level].coordinateTransformations, multiscale.coordinateTransformations, len(axes)
    )
    y, x = axes.index("y"), axes.index("x")
    units = tuple(unit_name(multiscale.axes[a].unit) for a in (y, x))
    omero = getattr(attributes, "omero", None)
    names = None
    if omero is not None and getattr(omero, "channels", None):
        names = tuple(str(c.label or f"channel {i}") for i, c in enumerate(omero.channels))
    space = PhysicalSpace(
        scale=(scale[y], scale[x]),
        translation=(translation[y], translation[x]),
        units=(units[0], units[1]),
        channel_names=names,
    )
    return space, axes, str(datasets[level].path)


def _compose(
    dataset: Any, overall: Any, ndim: int
) -> tuple[list[float], list[float]]:  # fmt: skip
    """Scale and translation of a dataset's transformations, then the multiscale's."""
    scale, translation = [1.0] * ndim, [0.0] * ndim
    for transforms in (dataset or (), overall or ()):
        for transform in transforms:
            if getattr(transform, "type", None) == "scale" and getattr(transform, "scale", None):
                values = [float(v) for v in transform.scale]
                scale = [s * v for s, v in zip(scale, values, strict=True)]
                translation = [t * v for t, v in zip(translation, values, strict=True)]
            elif getattr(transform, "translation", None):
                values = [float(v) for v in transform.translation]
                translation = [t + v for t, v in zip(translation, values, strict=True)]
    return scale, translation


# ---------------------------------------------------------------------- TIFF


def from_tiff(path: Any, level: int = 0) -> tuple[PhysicalSpace, str]:
    """Physical space and the axes string (tifffile's, e.g. ``"CYX"``, ``"YXS"``) of a TIFF.

    OME-TIFF: ``PhysicalSizeY/X`` (+ units, µm by default) and channel names. ImageJ TIFF: its
    ``unit`` with the resolution tags. Other TIFFs: the resolution tags when their unit is
    centimetre or inch (converted to micrometres). Pyramid levels scale by their size ratio.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        levels = getattr(series, "levels", [series])
        chosen = levels[min(level, len(levels) - 1)]
        axes = str(chosen.axes)
        space = _ome_tiff_space(tif) or _imagej_space(tif) or _resolution_space(tif)
        space = space or PhysicalSpace()
        if level and chosen is not series:
            full, this = series.shape, chosen.shape
            yi, xi = axes.index("Y"), axes.index("X")
            factor = (full[yi] / this[yi], full[xi] / this[xi])
            space = replace(
                space,
                scale=(space.scale[0] * factor[0], space.scale[1] * factor[1]),
                translation=(
                    space.translation[0] + (factor[0] - 1) / 2 * space.scale[0],
                    space.translation[1] + (factor[1] - 1) / 2 * space.scale[1],
                ),
            )
    return space, axes


def _ome_tiff_space(tif: Any) -> PhysicalSpace | None:
    if not tif.is_ome or not tif.ome_metadata:
        return None
    import tifffile

    try:
        ome = tifffile.xml2dict(tif.ome_metadata)["OME"]
        image = ome["Image"][0] if isinstance(ome["Image"], list) else ome["Image"]
        pixels = image["Pixels"]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    sizes = [pixels.get("PhysicalSizeY"), pixels.get("PhysicalSizeX")]
    units = [pixels.get("PhysicalSizeYUnit", "µm"), pixels.get("PhysicalSizeXUnit", "µm")]
    channels = pixels.get("Channel")
    channels = channels if isinstance(channels, list) else [channels] if channels else []
    names = tuple(str(c.get("Name", f"channel {i}")) for i, c in enumerate(channels))
    if sizes[0] is None and sizes[1] is None:
        return PhysicalSpace(channel_names=names or None)
    scale = (float(sizes[0] or sizes[1]), float(sizes[1] or sizes[0]))
    return PhysicalSpace(
        scale=scale,
        units=(unit_name(units[0]), unit_name(units[1])),
        channel_names=names or None,
    )


def _resolution(tif: Any) -> tuple[float, float] | None:
    """Pixels per unit along (y, x) from the first page's resolution tags."""
    tags = tif.pages[0].tags
    try:
        xres, yres = tags["XResolution"].value, tags["YResolution"].value
    except KeyError:
        return None
    xr, yr = xres[0] / xres[1], yres[0] / yres[1]
    return (yr, xr) if xr > 0 and yr > 0 else None


def _imagej_space(tif: Any) -> PhysicalSpace | None:
    meta = tif.imagej_metadata
    if not meta or "unit" not in meta:
        return None
    resolution = _resolution(tif)
    unit = unit_name(meta["unit"])
    if resolution is None or unit is None:
        return None
    return PhysicalSpace(scale=(1 / resolution[0], 1 / resolution[1]), units=(unit, unit))


def _resolution_space(tif: Any) -> PhysicalSpace | None:
    resolution = _resolution(tif)
    if resolution is None:
        return None
    tag = tif.pages[0].tags.get("ResolutionUnit")
    per_unit_um = {2: 25400.0, 3: 10000.0}.get(int(tag.value) if tag is not None else 1)
    if per_unit_um is None:
        return None  # no absolute unit: pixels only
    return PhysicalSpace(
        scale=(per_unit_um / resolution[0], per_unit_um / resolution[1]),
        units=("micrometer", "micrometer"),
    )
