"""The naive oracle: run the patch classifier on every patch (what dense inference must equal)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from napari_dense.convert.geometry import pair
from napari_dense.io.image import as_batch, pad_border

__all__ = ["patchwise"]


def patchwise(
    image: np.ndarray,
    model: nn.Module,
    patch_size: int | tuple[int, int],
    *,
    channel_axis: int | None = None,
    border: str = "reflect",
    positions: np.ndarray | None = None,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Evaluate ``model`` on the patch around every pixel, one patch per forward pass row.

    Same convention as :func:`napari_dense.predict`: ``out[:, y, x]`` is ``model`` applied to
    rows ``y - Ph // 2 … y - Ph // 2 + Ph - 1`` (columns likewise) of the border-padded image.

    Parameters
    ----------
    image, channel_axis, border
        As in :func:`napari_dense.predict`.
    model
        The patch classifier, ``(N, C, Ph, Pw) -> (N, K)`` or ``(N, K, 1, 1)``. Evaluated in eval
        mode (its ``training`` flag is restored afterwards). A ``torch.export`` program is
        evaluated whatever batch size it was exported with (batches are split and padded).
    patch_size
        ``Ph`` or ``(Ph, Pw)``.
    positions
        Optional ``(M, 2)`` integer array of ``(y, x)`` pixels: only those are evaluated and the
        result is ``(K, M)``.
    batch_size
        Patches per forward pass.

    Returns
    -------
    numpy.ndarray
        float32 ``(K, H, W)``, or ``(K, M)`` with ``positions``.
    """
    ph, pw = pair(patch_size, "patch_size")
    x = as_batch(image, channel_axis=channel_axis, channels=None)
    height, width = x.shape[-2:]
    padded = pad_border(x, (ph // 2, ph - 1 - ph // 2), (pw // 2, pw - 1 - pw // 2), border)
    padded_t = torch.from_numpy(padded).to(device)
    # A (C, H, W, Ph, Pw) view of every patch: no copy until a batch is gathered.
    patches = padded_t[0].unfold(1, ph, 1).unfold(2, pw, 1)
    if positions is None:
        ys, xs = np.divmod(np.arange(height * width), width)
    else:
        positions = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
        ys, xs = positions[:, 0], positions[:, 1]
    if isinstance(model, torch.export.ExportedProgram):
        from napari_dense.convert import ExportedModule  # convert imports much more

        model = ExportedModule(model)  # any batch size, though exported with a fixed one
    was_training = getattr(model, "training", False)
    _set_training(model, False)
    outputs = []
    try:
        with torch.inference_mode():
            for start in range(0, len(ys), batch_size):
                y = torch.from_numpy(ys[start : start + batch_size]).to(device)
                xx = torch.from_numpy(xs[start : start + batch_size]).to(device)
                batch = patches[:, y, xx].permute(1, 0, 2, 3)  # (B, C, Ph, Pw)
                outputs.append(model(batch.contiguous()).reshape(len(y), -1).float().cpu())
    finally:
        _set_training(model, was_training)
    result = torch.cat(outputs).T.numpy()
    if positions is None:
        return np.ascontiguousarray(result.reshape(-1, height, width))
    return np.ascontiguousarray(result)


def _set_training(model: nn.Module, training: bool) -> None:
    """``model.train(training)``; exported programs' modules refuse it and are always eval."""
    try:
        model.train(training)
    except NotImplementedError:
        pass
