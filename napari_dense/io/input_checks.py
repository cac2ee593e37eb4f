"""One policy for bad pixel values, shared by every entry point.

NaN and infinite pixels spread over the whole patch around them, so a map computed from them is
silently wrong wherever a patch touches one. The policy, used by :func:`napari_dense.predict`,
the engine (:func:`napari_dense.iter_predict`, :func:`napari_dense.predict_to_zarr`, the napari
widget), :func:`napari_dense.evaluate.compare.compare_modes`, :func:`napari_dense.frontier` and
the CLI (``--non-finite``):

- ``non_finite="refuse"`` (the default): the first window that holds one raises
  :class:`NonFiniteError`, naming where and the option below. A store being written stays
  incomplete and resumable: nothing is marked complete.
- ``non_finite="zero"``: NaN, +inf and -inf are read as 0 (before normalisation). The run says
  so: the policy is part of the run's provenance.

Integer images cannot hold NaN; only floating-point windows are checked.

:func:`check_value_range` warns once when an image's data type cannot hold the values the
model's normalisation expects (uint16 data into a ``scale: 1/255`` model).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from napari_dense.errors import InputError

__all__ = [
    "NON_FINITE_POLICIES",
    "NonFiniteError",
    "ValueRangeWarning",
    "check_non_finite_policy",
    "check_value_range",
    "handle_non_finite",
]

NON_FINITE_POLICIES = ("refuse", "zero")


class NonFiniteError(InputError):
    """The image holds NaN or infinite values and the policy is ``"refuse"``."""


class ValueRangeWarning(UserWarning):
    """The image's value range cannot match the model's normalisation."""


def check_non_finite_policy(policy: str) -> str:
    """Return ``policy`` if it is one of :data:`NON_FINITE_POLICIES`; raise otherwise."""
    if policy not in NON_FINITE_POLICIES:
        raise InputError(
            f"non_finite must be one of {NON_FINITE_POLICIES} (CLI: --non-finite), got {policy!r}"
        )
    return policy


def handle_non_finite(pixels: np.ndarray, policy: str, where: str = "the image") -> np.ndarray:
    """Apply the policy to ``pixels``: return them, or a copy with NaN/inf replaced by 0.

    Parameters
    ----------
    pixels
        Image values as read (any shape); never modified (``"zero"`` returns a copy).
    policy
        ``"refuse"`` or ``"zero"``.
    where
        Named in the error: ``"the image"``, ``"tile (0, 512, 0, 512) of plane (3,)"``.

    Raises
    ------
    NonFiniteError
        With ``"refuse"``, when a value is NaN or infinite.
    """
    check_non_finite_policy(policy)
    if pixels.dtype.kind != "f":
        return pixels
    bad = ~np.isfinite(pixels)
    count = int(np.count_nonzero(bad))
    if not count:
        return pixels
    if policy == "refuse":
        raise NonFiniteError(
            f"{where} has {count} NaN/infinite value(s), which would spread over every patch "
            "that touches them; replace them first (e.g. numpy.nan_to_num) or pass "
            "non_finite='zero' (CLI: --non-finite zero) to read them as 0"
        )
    return np.where(bad, np.zeros((), pixels.dtype), pixels)


def check_value_range(
    dtype: np.dtype[Any] | str, normalisation: Mapping[str, Any] | None, what: str = "the image"
) -> bool:
    """Warn once (:class:`ValueRangeWarning`) when ``dtype`` cannot fit the normalisation.

    A normalisation ``x * scale`` with ``scale = 1/255`` expects values up to 255. An integer
    image whose type reaches 16× more (uint16: 65535) or 16× less is almost surely on another
    scale. Floating-point images are not judged from their type. Returns whether it warned.
    """
    dtype = np.dtype(dtype)
    if not normalisation or dtype.kind not in "ui":
        return False
    scale = float(normalisation.get("scale", 1.0))
    if not scale or scale == 1.0:
        return False
    expected = 1.0 / abs(scale)
    largest = float(np.iinfo(dtype).max)
    if expected / 16 <= largest <= expected * 16:
        return False
    warnings.warn(
        f"{what} is {dtype} (values up to {largest:g}) but the model's normalisation scale "
        f"{scale:.6g} expects values up to about {expected:.6g}: rescale the image to that range "
        "or correct the model's normalisation (sidecar 'normalisation: scale')",
        ValueRangeWarning,
        stacklevel=3,
    )
    return True
