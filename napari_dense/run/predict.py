"""In-memory dense prediction of a whole image (the engine tiles larger ones)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from napari_dense.convert import densify
from napari_dense.convert.dense import DenseClassifier
from napari_dense.convert.geometry import border_padding
from napari_dense.convert.upsample import activate, upsample_lattice
from napari_dense.errors import InputError
from napari_dense.io.image import as_batch, normalise, pad_border
from napari_dense.run.device import resolve_device
from napari_dense.run.options import MODES, RunOptions, sampling_of_mode

__all__ = ["MODES", "PREDICT_OPTIONS", "predict", "sampling_of_mode", "upsample_lattice"]

#: The run options the in-memory path applies (it has no tiles, levels, precision or store).
PREDICT_OPTIONS = frozenset(
    {"mode", "channel_axis", "device", "border", "interpolation", "normalisation"}
    | {"activation", "non_finite"}
)


def predict(
    image: Any,
    model: nn.Module,
    patch_size: int | tuple[int, int] | None = None,
    *,
    options: RunOptions | None = None,
    **keywords: Any,
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
    options, **keywords
        The run options (:class:`napari_dense.RunOptions`) this path applies, as a
        ``RunOptions`` and/or keywords: ``mode`` (``"advanced"``: exact at every pixel,
        ``"simple"``, ``"checkered"`` or a per-layer mapping), ``channel_axis`` (of a 3-D
        image), ``device``, ``border``, ``interpolation``, ``normalisation`` (applied before
        the network, as the engine does), ``activation`` (None or ``"none"``: the network's
        scores) and ``non_finite``. Others (``tile``, ``precision``, ...) are refused by name.

    Returns
    -------
    numpy.ndarray
        float32 ``(K, H, W)``. ``out[:, y, x]`` is the classifier's output for the patch whose
        rows are ``y - Ph // 2 … y - Ph // 2 + Ph - 1`` (columns likewise) of the padded image.
        With an output stride ``S > 1`` the samples at ``(S * i, S * j)`` are exact and the rest
        interpolated between them; with checkered layers, the pixels of ``plan.sample_pattern``
        are exact and the rest interpolated (:mod:`napari_dense.convert.upsample`).
    """
    run = RunOptions.merge(options, used=PREDICT_OPTIONS, caller="predict", **keywords)
    if isinstance(model, DenseClassifier):
        dense = model
    else:
        if patch_size is None:
            raise InputError("patch_size is required to convert a patch classifier")
        dense = densify(model, patch_size, sampling=run.sampling)
    target = resolve_device(run.device)
    batch = as_batch(
        image, channel_axis=run.channel_axis, channels=dense.in_channels, non_finite=run.non_finite
    )
    batch = normalise(batch[0], run.normalisation)[None]
    height, width = batch.shape[-2:]
    (ph, pw), (ty, tx) = dense.patch_size, dense.period
    cells = dense.sample_pattern is not None  # filled cell by cell: sample whole cells
    padded = pad_border(
        batch,
        border_padding(height, ph, ty, whole_cells=cells),
        border_padding(width, pw, tx, whole_cells=cells),
        run.border,
    )
    dense = dense.to(target).eval()
    with torch.inference_mode():
        samples = dense(torch.from_numpy(padded).to(target))
        out = upsample_lattice(
            samples, dense.output_stride, (height, width), run.interpolation, dense.sample_pattern
        )
        out = activate(out, run.activation)
    return out[0].float().cpu().numpy()
