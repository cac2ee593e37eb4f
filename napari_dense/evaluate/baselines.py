"""Other ways to get a dense map, for comparison: shift-and-stitch (the published "advanced")."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from napari_dense.convert import densify
from napari_dense.convert.geometry import pair
from napari_dense.io.image import as_batch, pad_border
from napari_dense.run.device import resolve_device

__all__ = ["shift_and_stitch"]


def shift_and_stitch(
    image: Any,
    model: nn.Module,
    patch_size: int | tuple[int, int],
    *,
    channel_axis: int | None = None,
    border: str = "reflect",
    device: str | torch.device = "auto",
) -> np.ndarray:
    """Dense output by running the fully convolutional network on ``S × S`` shifted copies.

    The network without densified layers has output stride ``S``; shifting the input by
    ``(dy, dx)`` gives the samples at ``(dy + S·i, dx + S·j)``, and interlacing the ``S²`` runs
    fills every pixel. Exact, like advanced mode, but it recomputes the early layers ``S²``
    times. Same convention and result as :func:`napari_dense.predict` in advanced mode.
    """
    ph, pw = pair(patch_size, "patch_size")
    fcn = densify(model, (ph, pw), sampling="none")
    sy, sx = fcn.output_stride
    target = resolve_device(device)
    batch = as_batch(image, channel_axis=channel_axis, channels=fcn.in_channels)
    height, width = batch.shape[-2:]
    # Pad so that every shifted copy still holds ceil(H / S) full lattice rows.
    rows = -(-height // sy) * sy
    cols = -(-width // sx) * sx
    padded = pad_border(
        batch,
        (ph // 2, rows - height + ph - 1 - ph // 2),
        (pw // 2, cols - width + pw - 1 - pw // 2),
        border,
    )
    x = torch.from_numpy(padded).to(target)
    fcn = fcn.to(target).eval()
    out = torch.empty(1, fcn.num_classes, rows, cols, device=target)
    with torch.inference_mode():
        for dy in range(sy):
            for dx in range(sx):
                samples = fcn(x[..., dy:, dx:])
                out[..., dy::sy, dx::sx] = samples[..., : rows // sy, : cols // sx]
    return out[0, :, :height, :width].cpu().numpy()
