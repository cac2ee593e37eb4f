"""The store's NGFF 0.5 metadata, built, validated and read through ``ome-zarr-models``.

Nothing here writes or parses the ``ome`` attribute by hand: :func:`ome_attributes` builds it with
:meth:`ome_zarr_models.v05.image.Image.new` (axes with units, one scale and translation per level)
and the library's omero models (class names, the one colour table, display windows), and
:func:`read_image` opens a store with :meth:`~ome_zarr_models.v05.image.Image.from_zarr`, which
checks every level array against the metadata (shape rank, dimension names). What is ours is kept
beside it (provenance, completion, quantisation, per-tile markers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from napari_dense.colours import class_colour, display_max, is_background
from napari_dense.io.physical import PhysicalSpace, unit_name

__all__ = [
    "AXIS_TYPES",
    "NGFF_VERSION",
    "VALID_AXES",
    "StoreImage",
    "level_spec",
    "ome_attributes",
    "read_image",
]

NGFF_VERSION: Final = "0.5"
AXIS_TYPES: Final = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
#: Axis orders NGFF allows for our maps: time, then channel, then space (z, y, x).
VALID_AXES: Final = ("cyx", "czyx", "tcyx", "tczyx")
_PYRAMID_DESCRIPTION: Final = (
    "2x2 mean over y and x of the level above; edge blocks average the pixels they contain"
)


def level_spec(shape: Sequence[int], chunks: Sequence[int], dtype: np.dtype[Any], axes: str) -> Any:
    """The ``pydantic_zarr`` spec of a level about to be created (for :func:`ome_attributes`)."""
    from pydantic_zarr.v3 import ArraySpec

    return ArraySpec.model_validate(
        {
            "shape": tuple(int(size) for size in shape),
            "data_type": np.dtype(dtype).name,
            "chunk_grid": {
                "name": "regular",
                "configuration": {"chunk_shape": tuple(int(c) for c in chunks)},
            },
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0,
            "codecs": ({"name": "bytes", "configuration": {"endian": "little"}},),
            "dimension_names": tuple(axes),
            "attributes": {},
        }
    )


def ome_attributes(
    *,
    name: str,
    axes: str,
    class_names: Sequence[str],
    dtype: np.dtype[Any],
    arrays: Sequence[Any],
    space: PhysicalSpace,
    z_scale: float = 1.0,
) -> dict[str, Any]:
    """The ``"ome"`` group attribute: NGFF 0.5 multiscales of ``arrays`` (levels 0, 1, ...) + omero.

    Level ``k`` is ``space.downsampled(2**k)`` over (y, x): pixel size ``2**k`` times level 0's,
    centre ``(2**k - 1) / 2`` level-0 pixels after its first pixel's. z keeps ``z_scale``.
    ``arrays``: the levels' ``pydantic_zarr`` specs (:func:`level_spec`, or
    ``ArraySpec.from_zarr``); the library checks that they fit the axes (``ValueError`` if not).
    """
    from ome_zarr_models.common.omero import Channel, Omero, Window
    from ome_zarr_models.v05.axes import Axis
    from ome_zarr_models.v05.image import Image

    units = dict(zip("yx", space.units, strict=True))
    ome_axes = [Axis(name=a, type=AXIS_TYPES[a], unit=units.get(a)) for a in axes]
    scales, translations = [], []
    for level in range(len(arrays)):
        at = space.downsampled(2**level)
        sizes = {"z": float(z_scale), "y": at.scale[0], "x": at.scale[1]}
        offsets = {"y": at.translation[0], "x": at.translation[1]}
        scales.append([sizes.get(axis, 1.0) for axis in axes])
        shift = [offsets.get(axis, 0.0) for axis in axes]
        translations.append(shift if any(shift) else None)
    pyramid = len(arrays) > 1
    image = Image.new(
        array_specs=list(arrays),
        paths=[str(level) for level in range(len(arrays))],
        axes=ome_axes,
        scales=scales,
        translations=translations,
        name=name,
        multiscale_type="local_mean" if pyramid else None,
        metadata={"description": _PYRAMID_DESCRIPTION} if pyramid else None,
    )
    top = display_max(dtype)
    channels = [
        Channel.model_validate(
            {
                "color": class_colour(index),
                "window": Window(start=0, end=top, min=0, max=top),
                "label": label,
                # As in the live overlay: background hidden, so the tissue shows beneath.
                "active": not is_background(label),
                "coefficient": 1,
                "family": "linear",
                "inverted": False,
            }
        )
        for index, label in enumerate(class_names)
    ]
    omero = Omero.model_validate(
        {"channels": channels, "rdefs": {"defaultT": 0, "defaultZ": 0, "model": "color"}}
    )
    result: dict[str, Any] = image.attributes.ome.model_dump(mode="json", exclude_none=True)
    result["omero"] = omero.model_dump(mode="json", exclude_none=True)
    return result


@dataclass(frozen=True)
class StoreImage:
    """What a store's validated NGFF metadata says.

    Attributes
    ----------
    name, axes
        The multiscale's name and axis names (``"cyx"`` ... ``"tczyx"``).
    class_names
        The omero channel labels.
    spaces
        The (y, x) :class:`~napari_dense.io.physical.PhysicalSpace` of each level.
    scale
        Level 0's pixel size per space axis (``(z, y, x)`` or ``(y, x)``).
    """

    name: str
    axes: str
    class_names: list[str]
    spaces: tuple[PhysicalSpace, ...]
    scale: tuple[float, ...]

    @property
    def pyramid_levels(self) -> int:
        """Levels below level 0."""
        return len(self.spaces) - 1


def read_image(group: Any) -> StoreImage:
    """Validate a store's group with ome-zarr-models (strict NGFF 0.5) and read its metadata.

    Raises ``ValueError`` (also pydantic's ``ValidationError``), ``KeyError`` or ``TypeError``
    for metadata that does not validate or lacks the omero channel labels.
    """
    from ome_zarr_models.common.omero import Omero
    from ome_zarr_models.v05.image import Image

    image = Image.from_zarr(group)
    (multiscale,) = image.attributes.ome.multiscales
    omero_dict = getattr(image.attributes.ome, "omero", None)
    if omero_dict is None:
        raise KeyError("no omero channels")
    omero = Omero.model_validate(omero_dict)
    labels = [getattr(channel, "label", None) for channel in omero.channels]
    if any(not isinstance(label, str) for label in labels):
        raise TypeError("an omero channel without a label")
    axes = "".join(str(axis.name) for axis in multiscale.axes)
    units = {str(a.name): unit_name(a.unit) for a in multiscale.axes}
    spaces, level0 = [], [1.0] * len(axes)
    for level, dataset in enumerate(multiscale.datasets):
        scale, translation = [1.0] * len(axes), [0.0] * len(axes)
        for transform in dataset.coordinateTransformations:
            if transform.type == "scale":
                scale = [float(v) for v in getattr(transform, "scale", scale)]
            elif transform.type == "translation":
                translation = [float(v) for v in getattr(transform, "translation", translation)]
        if level == 0:
            level0 = scale
        y, x = axes.index("y"), axes.index("x")
        spaces.append(
            PhysicalSpace(
                scale=(scale[y], scale[x]),
                translation=(translation[y], translation[x]),
                units=(units["y"], units["x"]),
            )
        )
    return StoreImage(
        name=str(multiscale.name) if multiscale.name is not None else "",
        axes=axes,
        class_names=[str(label) for label in labels],
        spaces=tuple(spaces),
        scale=tuple(s for a, s in zip(axes, level0, strict=True) if AXIS_TYPES.get(a) == "space"),
    )
