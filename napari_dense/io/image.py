"""Turning user images into model input: axes, dtype, border padding (numpy, no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from napari_dense.errors import InputError
from napari_dense.io.input_checks import handle_non_finite

__all__ = ["BORDER_MODES", "as_batch", "normalise", "pad_border"]

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
        axis = channel_axis if channel_axis is not None else _guess_channel_axis(array, channels)
        array = np.moveaxis(array, axis, 0)
    else:
        raise InputError(
            f"expected a 2-D (H, W) or 3-D (H, W, C) / (C, H, W) image, got shape {array.shape}; "
            "pass one plane at a time (e.g. image[z])"
        )
    if channels is not None and array.shape[0] != channels:
        raise _channel_mismatch(channels, f"{array.shape[0]}", np.shape(image))
    batch = np.ascontiguousarray(array[None], dtype=np.float32)
    return handle_non_finite(batch, non_finite)


def _guess_channel_axis(array: np.ndarray, channels: int | None) -> int:
    if channels is None:
        return -1 if array.shape[-1] <= 4 else 0
    if array.shape[-1] == channels:
        return -1
    if array.shape[0] == channels:
        return 0
    raise _channel_mismatch(channels, "neither on the first nor on the last axis", array.shape)


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


def normalise(image_chw: np.ndarray, normalisation: Mapping[str, Any] | None) -> np.ndarray:
    """``(x * scale - mean[c]) / std[c]`` of a ``(C, H, W)`` float image (model metadata)."""
    if not normalisation:
        return image_chw
    scale = float(normalisation.get("scale", 1.0))
    mean = np.asarray(normalisation.get("mean", 0.0), dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(normalisation.get("std", 1.0), dtype=np.float32).reshape(-1, 1, 1)
    return ((image_chw * scale - mean) / std).astype(np.float32)
