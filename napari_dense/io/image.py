"""Turning user images into model input: axes, dtype, border padding (numpy, no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from napari_dense.errors import InputError
from napari_dense.io.input_checks import handle_non_finite

__all__ = [
    "BORDER_MODES",
    "as_batch",
    "guess_channel_axis",
    "normalisation_constants",
    "normalise",
    "pad_border",
    "scale_shift",
]

# predict's border names -> numpy.pad modes
BORDER_MODES = {"reflect": "reflect", "constant": "constant", "edge": "edge"}


def as_batch(
    image: Any, *, channel_axis: int | None, channels: int | None, non_finite: str = "refuse"
) -> np.ndarray:
    """Return ``image`` as a float32 batch ``(1, C, H, W)``.

    Parameters
    ----------
    image
        ``(H, W)``, or ``(H, W, C)`` / ``(C, H, W)`` (numpy, torch, or anything ``np.asarray``
        takes). Integer and boolean images become float32 with their values unchanged:
        normalisation belongs to the model, not to this function.
    channel_axis
        Axis of the channels in a 3-D image; inferred from ``channels`` when None.
    channels
        Channels the model expects (None: accept any).
    non_finite
        NaN/infinite values: ``"refuse"`` or ``"zero"`` (:mod:`napari_dense.io.input_checks`).
    """
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.dtype.kind not in "biuf":
        raise InputError(
            f"image dtype {array.dtype} is not numeric; convert it, e.g. image.astype('float32')"
        )
    if array.ndim == 2:
        if channel_axis is not None:
            raise InputError("channel_axis was given but the image is 2-D (H, W)")
        array = array[None]
    elif array.ndim == 3:
        axis = (
            channel_axis if channel_axis is not None else guess_channel_axis(array.shape, channels)
        )
        if axis is None and array.shape[0] != 1:  # a one-channel model, no axis of size one
            raise _channel_mismatch(1, "no axis of size 1 first or last", array.shape)
        array = np.moveaxis(array, axis or 0, 0)
    else:
        raise InputError(
            f"expected a 2-D (H, W) or 3-D (H, W, C) / (C, H, W) image, got shape {array.shape}; "
            "pass one plane at a time (e.g. image[z])"
        )
    if channels is not None and array.shape[0] != channels:
        raise _channel_mismatch(channels, f"{array.shape[0]}", np.shape(image))
    batch = np.ascontiguousarray(array[None], dtype=np.float32)
    return handle_non_finite(batch, non_finite)


def guess_channel_axis(shape: tuple[int, ...], channels: int | None) -> int | None:
    """The channel axis of an image with 3 or more axes, when neither the caller nor the file
    names it: the one rule for arrays, files and napari layers.

    The last axis, or the one before (Y, X), whose size is ``channels``; for a one-channel
    model without such an axis None (every axis before (Y, X) is then a Z/T axis). Without a
    channel count: the last axis when it has at most 4 entries (RGB(A)), else the one before
    (Y, X). Returns a non-negative axis, or None.

    Raises
    ------
    InputError
        A model of ``channels > 1`` channels and no such axis (the fix: ``channel_axis=``).
    """
    last, before = len(shape) - 1, len(shape) - 3
    if channels is None:
        return last if shape[-1] <= 4 else before
    if shape[-1] == channels:
        return last
    if shape[-3] == channels and channels > 1:
        return before
    if channels == 1:
        return None
    raise InputError(
        f"the model expects {channels} channel(s) but no axis of the image {tuple(shape)} next "
        "to (Y, X) has that size; pass channel_axis=... (CLI: --channel-axis) or convert the image"
    )


def _channel_mismatch(channels: int, found: str, shape: tuple[int, ...]) -> InputError:
    fix = (
        "convert it to one channel (e.g. skimage.color.rgb2gray)"
        if channels == 1
        else "pass channel_axis=... or convert the image"
    )
    return InputError(
        f"the model expects {channels} channel(s) but the image {shape} has {found}; {fix}"
    )


def pad_border(
    batch: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], border: str
) -> np.ndarray:
    """Pad the spatial axes of ``(N, C, H, W)`` by ``rows=(top, bottom)``, ``cols=(left, right)``.

    ``border`` is ``"reflect"`` (mirror without repeating the edge; repeated as often as needed,
    so images smaller than the patch work), ``"edge"`` or ``"constant"`` (zeros).
    """
    if border not in BORDER_MODES:
        raise InputError(f"border must be one of {sorted(BORDER_MODES)}, got {border!r}")
    width = ((0, 0), (0, 0), (max(rows[0], 0), max(rows[1], 0)), (max(cols[0], 0), max(cols[1], 0)))
    return np.pad(batch, width, mode=BORDER_MODES[border])  # type: ignore[call-overload]


def normalisation_constants(
    normalisation: Mapping[str, Any] | None, channels: int
) -> tuple[float, np.ndarray, np.ndarray] | None:
    """``(scale, mean, std)`` of a model's normalisation, mean and std float32 ``(C', 1, 1)``
    with ``C'`` 1 or ``channels``; None without one (nothing to apply)."""
    if not normalisation:
        return None
    scale = float(normalisation.get("scale", 1.0))
    mean = np.asarray(normalisation.get("mean", 0.0), dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(normalisation.get("std", 1.0), dtype=np.float32).reshape(-1, 1, 1)
    if mean.shape[0] not in (1, channels) or std.shape[0] not in (1, channels):
        raise InputError(
            f"normalisation mean/std must have 1 or {channels} values (one per channel of the "
            f"image), got {mean.shape[0]} and {std.shape[0]}"
        )
    return scale, mean, std


def scale_shift(x: Any, scale: float, mean: Any, std: Any) -> Any:
    """``(x * scale - mean) / std``: the normalisation, on numpy arrays and torch tensors."""
    return (x * scale - mean) / std


def normalise(image_chw: np.ndarray, normalisation: Mapping[str, Any] | None) -> np.ndarray:
    """``(x * scale - mean[c]) / std[c]`` of a ``(C, H, W)`` float image (model metadata)."""
    constants = normalisation_constants(normalisation, image_chw.shape[0])
    if constants is None:
        return image_chw
    return scale_shift(image_chw, *constants).astype(np.float32)
