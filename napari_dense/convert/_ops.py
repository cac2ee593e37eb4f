"""Runtime operations of dense networks (the functions the rewritten fx graphs call).

Every function here works on dense tensors of shape (N, C, H, W) and is geometry-explicit:
kernel, dilation and stride are given in dense-tensor indices, padding in dense-tensor indices
as ``(left, right, top, bottom)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from napari_dense.convert.geometry import Pair

__all__ = [
    "DENSE_OPS",
    "DenseTracer",
    "align_spatial",
    "batch_to_space",
    "channel_layer_norm",
    "crop_cat",
    "dense_conv2d",
    "dense_pool2d",
    "linear_as_conv2d",
    "phase_split",
    "scatter_phases",
    "space_to_batch",
]

Padding = tuple[int, int, int, int]


def _pad(x: torch.Tensor, padding: Padding, mode: str, value: float = 0.0) -> torch.Tensor:
    if not any(padding):
        return x
    if mode == "zeros" or mode == "constant":
        return F.pad(x, padding, mode="constant", value=value)
    return F.pad(x, padding, mode=mode)


def dense_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Pair,
    dilation: Pair,
    padding: Padding,
    padding_mode: str,
    groups: int,
) -> torch.Tensor:
    """A convolution at the given dilation and stride (the dense form of ``Conv2d``)."""
    left, right, top, bottom = padding
    if padding_mode == "zeros" and left == right and top == bottom:
        # Symmetric zero padding is fused into the convolution (no padded copy of x).
        return F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
    x = _pad(x, padding, padding_mode)
    return F.conv2d(x, weight, bias, stride, 0, dilation, groups)


def linear_as_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: Pair,
    dilation: Pair,
) -> torch.Tensor:
    """``Linear`` applied to a flattened ``C × kh × kw`` map, as a dilated ``kh × kw`` convolution.

    ``torch.flatten`` orders features channel-major, then row, then column, which is exactly the
    layout of a convolution kernel ``(out, C, kh, kw)``: the weights are reshaped, never copied.
    """
    out_features, in_features = weight.shape
    channels = in_features // (kernel[0] * kernel[1])
    kernel_weight = weight.view(out_features, channels, kernel[0], kernel[1])
    return F.conv2d(x, kernel_weight, bias, 1, 0, dilation)


def dense_pool2d(
    x: torch.Tensor,
    kind: str,
    kernel: Pair,
    dilation: Pair,
    stride: Pair,
    padding: Padding,
    divisor: float | None = None,
) -> torch.Tensor:
    """Max or average pooling at any dilation, as a reduction over shifted views.

    ``F.avg_pool2d`` has no dilation, and ``F.max_pool2d`` with dilation is slow on CPU; both
    reductions are separable, so rows then columns are reduced over ``kh + kw`` shifted views
    (no index tensors, no unfolded copy).
    """
    if kind not in ("max", "avg"):
        raise ValueError(f"unknown pooling kind {kind!r}")
    x = _pad(x, padding, "constant", float("-inf") if kind == "max" else 0.0)
    for axis, k, d, s in (
        (2, kernel[0], dilation[0], stride[0]),
        (3, kernel[1], dilation[1], stride[1]),
    ):
        if k == 1 and s == 1:
            continue
        size = x.shape[axis]
        out = (size - (k - 1) * d - 1) // s + 1
        if out < 1:
            raise ValueError(f"input of size {size} is smaller than the pooling window")
        acc: torch.Tensor | None = None
        for i in range(k):
            view = x.narrow(axis, i * d, (out - 1) * s + 1)
            if s > 1:
                view = view[:, :, ::s] if axis == 2 else view[:, :, :, ::s]
            if acc is None:
                acc = view.clone() if k > 1 else view
            elif not torch.is_grad_enabled():  # in place: no extra full-size map per offset
                torch.maximum(acc, view, out=acc) if kind == "max" else acc.add_(view)
            else:  # autograd refuses out= on tensors that need gradients
                acc = torch.maximum(acc, view) if kind == "max" else acc + view
        assert acc is not None
        x = acc
    if kind == "avg":
        x = x / (divisor if divisor is not None else kernel[0] * kernel[1])
    return x


def channel_layer_norm(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``LayerNorm`` over the channels of every position of ``(N, C, H, W)``."""
    out = F.layer_norm(x.permute(0, 2, 3, 1), normalized_shape, weight, bias, eps)
    return out.permute(0, 3, 1, 2)


def align_spatial(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Crop dense tensors to their common spatial size.

    Index ``(y, x)`` means the same patch in every dense tensor of one lattice, so tensors joined
    by add/multiply/concat only differ in how far their valid region extends: keep the overlap.
    """
    height = min(t.shape[-2] for t in tensors)
    width = min(t.shape[-1] for t in tensors)
    return tuple(t[..., :height, :width] for t in tensors)


def crop_cat(tensors: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """``torch.cat`` along channels after :func:`align_spatial`."""
    return torch.cat(align_spatial(*tensors), dim=dim)


def space_to_batch(x: torch.Tensor, stride: Pair) -> torch.Tensor:
    """Split a stride-1 map into its ``sy × sx`` phases, stacked in front of the batch.

    ``(B, C, H, W) -> (sy * sx * B, C, ceil(H / sy), ceil(W / sx))``; phase ``(ry, rx)`` holds
    rows ``ry, ry + sy, …``. The zero rows padded at the end only reach outputs that are
    cropped away (they lie past the last full patch).
    """
    sy, sx = stride
    batch, channels, height, width = x.shape
    x = F.pad(x, (0, -width % sx, 0, -height % sy))
    h, w = x.shape[-2] // sy, x.shape[-1] // sx
    x = x.view(batch, channels, h, sy, w, sx).permute(3, 5, 0, 1, 2, 4)
    return x.reshape(sy * sx * batch, channels, h, w)


def batch_to_space(x: torch.Tensor, phases: Sequence[Pair]) -> torch.Tensor:
    """Undo :func:`space_to_batch` for every stride in ``phases`` (last split first)."""
    for sy, sx in reversed(phases):
        batch = x.shape[0] // (sy * sx)
        _, channels, h, w = x.shape
        x = x.view(sy, sx, batch, channels, h, w).permute(2, 3, 4, 0, 5, 1)
        x = x.reshape(batch, channels, h * sy, w * sx)
    return x


def phase_split(
    x: torch.Tensor,
    stride: Pair,
    phases: Sequence[Pair],
    padding: Padding,
    mode: str,
    value: float = 0.0,
) -> torch.Tensor:
    """Input of a strided layer evaluated at some of its phases, the phases stacked in the batch.

    ``x`` is padded as the layer would pad it, then shifted by each phase ``(a, b)``; running the
    layer at its stride (no padding) on the result gives, for each phase, the samples that a
    stride-1 run has at rows ``a, a + sy, ...`` and columns ``b, b + sx, ...``. The end is padded
    by ``s - 1`` so every phase has one shape; those rows only reach outputs past the last full
    patch, which are cropped away. ``(B, C, H, W) -> (len(phases) * B, C, H', W')``.
    """
    x = _pad(x, padding, mode, value)
    height, width = x.shape[-2:]
    sy, sx = stride
    x = F.pad(x, (0, sx - 1, 0, sy - 1))
    return torch.cat([x[..., a : a + height, b : b + width] for a, b in phases])


def scatter_phases(x: torch.Tensor, offsets: Sequence[Pair], period: Pair) -> torch.Tensor:
    """Interleave phase maps carried in the batch into one map (zero where nothing was computed).

    Batch entry ``i`` of every image (``x`` is ``(len(offsets) * N, C, h, w)``) lands on rows
    ``offsets[i][0] + period_y * k`` and columns ``offsets[i][1] + period_x * l`` of the result,
    ``(N, C, h * period_y, w * period_x)``.
    """
    py, px = period
    phases = x.unflatten(0, (len(offsets), -1))
    out = x.new_zeros((phases.shape[1], x.shape[1], x.shape[2] * py, x.shape[3] * px))
    for phase, (oy, ox) in zip(phases, offsets, strict=True):
        out[:, :, oy::py, ox::px] = phase
    return out


class DenseTracer(fx.Tracer):
    """A tracer that records the operations above as single nodes.

    Unpickling a ``GraphModule`` re-traces its generated code (dask workers, multiprocessing);
    without this, tracing would step into the Python loops of these functions.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("autowrap_functions", DENSE_OPS)
        super().__init__(*args, **kwargs)


DENSE_OPS = (
    align_spatial, batch_to_space, channel_layer_norm, crop_cat, dense_conv2d, dense_pool2d,
    linear_as_conv2d, phase_split, scatter_phases, space_to_batch,
)  # fmt: skip
