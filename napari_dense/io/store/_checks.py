"""Checks of :meth:`ProbabilityStore.create`'s arguments: each refusal is one line with the fix."""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from napari_dense.errors import InputError
from napari_dense.io.physical import PhysicalSpace, unit_name
from napari_dense.io.store._layout import STORE_DTYPES
from napari_dense.io.store._ngff import AXIS_TYPES, VALID_AXES

__all__ = [
    "check_axes",
    "check_chunks",
    "check_dtype",
    "check_scale",
    "check_shape",
    "jsonable",
    "plane_space",
    "resolve_space",
]


def check_axes(axes: str) -> str:
    if not isinstance(axes, str) or axes.lower() not in VALID_AXES:
        raise InputError(f"axes must be one of {', '.join(VALID_AXES)}, got {axes!r}")
    return axes.lower()


def check_shape(shape: Sequence[int], axes: str) -> tuple[int, ...]:
    try:
        values = tuple(operator.index(size) for size in shape)
    except TypeError:
        raise InputError(f"shape must be integers, got {shape!r}") from None
    if len(values) != len(axes) or min(values) < 1:
        raise InputError(f"shape {values} does not fit axes {axes!r} (one size ≥ 1 per axis)")
    return values


def check_chunks(chunks: int | Sequence[int]) -> tuple[int, int]:
    try:
        values = (
            (operator.index(chunks),) * 2
            if not isinstance(chunks, Sequence)
            else tuple(operator.index(size) for size in chunks)
        )
    except TypeError:
        raise InputError(f"chunks must be (tile_y, tile_x) integers, got {chunks!r}") from None
    if len(values) != 2 or min(values) < 1:
        raise InputError(f"chunks must be (tile_y, tile_x), each ≥ 1, got {chunks!r}")
    return values[0], values[1]


def check_dtype(dtype: str | np.dtype[Any]) -> np.dtype[Any]:
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in STORE_DTYPES:
        raise InputError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    return resolved


def check_scale(scale: Sequence[float] | None, axes: str) -> tuple[float, ...]:
    space_axes = "".join(axis for axis in axes if AXIS_TYPES[axis] == "space")
    if scale is None:
        return (1.0,) * len(space_axes)
    values = tuple(float(size) for size in scale)
    if len(values) != len(space_axes) or not all(
        math.isfinite(size) and size > 0 for size in values
    ):
        raise InputError(
            f"scale must give a positive pixel size per space axis ({', '.join(space_axes)}), "
            f"got {tuple(scale)}"
        )
    return values


def resolve_space(space: Any, default: PhysicalSpace | None = None) -> PhysicalSpace:
    """A :class:`PhysicalSpace` from ``space``: one, or a napari layer's ``scale``/``translate``/
    ``units`` as a mapping (the last two entries are y, x); None: ``default`` (or pixels).

    Raises
    ------
    InputError
        A pixel size that is not positive and finite, or a translation that is not finite.
    """
    if space is None:
        return default if default is not None else PhysicalSpace()
    if isinstance(space, PhysicalSpace):
        scale, translation, units = space.scale, space.translation, space.units
    elif isinstance(space, Mapping):
        scale = space.get("scale", (1.0, 1.0))
        translation = space.get("translation", space.get("translate", (0.0, 0.0)))
        units = space.get("units", (None, None))
    else:
        raise InputError(
            f"space must be a napari_dense.io.physical.PhysicalSpace or a mapping with 'scale', "
            f"'translate' and 'units' (a napari layer's), got {type(space).__name__}"
        )
    try:
        sizes = tuple(float(v) for v in tuple(scale)[-2:])
        offsets = tuple(float(v) for v in tuple(translation)[-2:])
        names = tuple(unit_name(u) for u in tuple(units or (None, None))[-2:])
    except (TypeError, ValueError):
        sizes = offsets = names = ()
    if len(sizes) != 2 or not all(math.isfinite(s) and s > 0 for s in sizes):
        raise InputError(
            f"space: the (y, x) pixel size must be two positive numbers, got {scale!r}"
        )
    if len(offsets) != 2 or not all(math.isfinite(t) for t in offsets) or len(names) != 2:
        raise InputError(
            f"space: translate must be two finite numbers and units two names, got {translation!r}"
            f" and {units!r}"
        )
    return PhysicalSpace(
        scale=(sizes[0], sizes[1]),
        translation=(offsets[0], offsets[1]),
        units=(names[0], names[1]),
        channel_names=space.channel_names if isinstance(space, PhysicalSpace) else None,
    )


def plane_space(
    space: PhysicalSpace | Mapping[str, Any] | None, scale: tuple[float, ...], given: bool
) -> PhysicalSpace:
    """Level 0's (y, x) space from ``space`` and/or ``scale`` (which must agree on y, x)."""
    if space is None:
        return PhysicalSpace(scale=(scale[-2], scale[-1]))
    plane = resolve_space(space)
    if given and tuple(scale[-2:]) != plane.scale:
        raise InputError(
            f"scale {scale} and space (pixel size {plane.scale}) disagree on y, x: give the "
            "pixel size once, in space"
        )
    return plane


def jsonable(value: dict[str, Any], what: str) -> dict[str, Any]:
    """A JSON round trip of ``value`` (numpy scalars/arrays and paths converted)."""

    def convert(item: Any) -> Any:
        if isinstance(item, np.generic | np.ndarray):
            return item.tolist()
        if isinstance(item, os.PathLike):
            return os.fspath(item)
        if isinstance(item, set | frozenset):
            return sorted(item, key=str)
        raise TypeError(f"{type(item).__name__} is not JSON-serialisable")

    try:
        result: dict[str, Any] = json.loads(json.dumps(value, default=convert, allow_nan=True))
    except (TypeError, ValueError) as err:
        raise InputError(f"{what} must be JSON-serialisable: {err}") from None
    return result
