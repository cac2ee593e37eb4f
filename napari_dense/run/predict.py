"""In-memory dense prediction of a whole image (the engine tiles larger ones)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_dense.convert import SamplingSpec, densify
from napari_dense.convert.dense import DenseClassifier
from napari_dense.convert.geometry import border_padding
from napari_dense.convert.upsample import activate, upsample_lattice
from napari_dense.errors import InputError
from napari_dense.io.image import as_batch, pad_border
from napari_dense.run.device import resolve_device

__all__ = ["MODES", "predict", "sampling_of_mode", "upsample_lattice"]

MODES = {"advanced": "all", "checkered": "checkered", "simple": "none"}


def sampling_of_mode(mode: str | Mapping[str, str]) -> SamplingSpec:
    """``"advanced"`` -> ``"all"``, ``"checkered"`` -> ``"checkered"``, ``"simple"`` ->
    ``"none"``; mappings pass through."""
    if isinstance(mode, Mapping):
        return mode
    if mode not in MODES:
        raise InputError(
            f"mode must be 'advanced', 'checkered', 'simple' or a sampling mapping, got {mode!r}"
        )
    return MODES[mode]


def predict(
    image: Any,
    model: nn.Module,
    patch_size: int | tuple[int, int] | None = None,
    *,
    mode: str | Mapping[str, str] = "advanced",
    channel_axis: int | None = None,
    device: str | torch.device = "auto",
    border: str = "reflect",
    interpolation: str = "bilinear",
    activation: str | None = None,
    non_finite: str = "refuse",
) -> np.ndarray:
    """The classifier's output at every pixel of ``image``.

    Parameters
    ----------
    image
        ``(H, W)`` for one-channel models, ``(H, W, C)`` or ``(C, H, W)`` otherwise (any numeric
        dtype; integers keep their values).
    model
        A patch classifier (converted here) or a :class:`DenseClassifier` (used as is; ``mode``
        and ``patch_size`` are then ignored).
    patch_size
        ``Ph`` or ``(Ph, Pw)``; required for a patch classifier.
    mode
        ``"advanced"`` (every layer densified: exact at every pixel), ``"simple"`` (fully
        convolutional, interpolated between exact lattice samples), ``"checkered"`` (every
        layer at half its phases: exact at more pixels, interpolated between them) or a
        sampling mapping ``{layer: "all" | "checkered" | "none"}``.
    channel_axis
        Channel axis of a 3-D image (inferred from the model's channels when None).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    border
        How the image is extended so border pixels get a full patch: ``"reflect"``, ``"edge"``,
        ``"constant"`` (zeros).
    interpolation
        Between lattice samples when ``output_stride > 1``: ``"bilinear"`` or ``"nearest"``.
    activation
        ``"softmax"`` (over classes) or ``"sigmoid"`` turns the interpolated scores into
        probabilities, as the engine does; None returns the network's scores.
    non_finite
        NaN/infinite pixels: ``"refuse"`` (an error naming this option) or ``"zero"`` (read as
        0), as everywhere (:mod:`napari_dense.io.input_checks`).

    Returns
    -------
    numpy.ndarray
        float32 ``(K, H, W)``. ``out[:, y, x]`` is the classifier's output for the patch whose
        rows are ``y - Ph // 2 … y - Ph // 2 + Ph - 1`` (columns likewise) of the padded image.
        With an output stride ``S > 1`` the samples at ``(S * i, S * j)`` are exact and the rest
        interpolated between them; with checkered layers, the pixels of ``plan.sample_pattern``
        are exact and the rest interpolated (:mod:`napari_dense.convert.upsample`).
    """
    if interpolation not in ("bilinear", "nearest"):
        raise InputError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    if isinstance(model, DenseClassifier):
        dense = model
    else:
        if patch_size is None:
            raise InputError("patch_size is required to convert a patch classifier")
        dense = densify(model, patch_size, sampling=sampling_of_mode(mode))
    target = resolve_device(device)
    batch = as_batch(
        image, channel_axis=channel_axis, channels=dense.in_channels, non_finite=non_finite
    )
    height, width = batch.shape[-2:]
    (ph, pw), (ty, tx) = dense.patch_size, dense.period
    cells = dense.sample_pattern is not None  # filled cell by cell: sample whole cells
    padded = pad_border(
        batch,
        border_padding(height, ph, ty, whole_cells=cells),
        border_padding(width, pw, tx, whole_cells=cells),
        border,
    )
    dense = dense.to(target).eval()
    with torch.inference_mode():
        samples = dense(torch.from_numpy(padded).to(target))
        out = upsample_lattice(
            samples, dense.output_stride, (height, width), interpolation, dense.sample_pattern
        )
        out = activate(out, activation)
    return out[0].float().cpu().numpy()
