"""The dense classifier: a patch classifier evaluated at every pixel (or lattice point) at once."""

from __future__ import annotations

import torch
from torch import fx, nn

from napari_dense.convert._ops import DenseTracer
from napari_dense.convert.geometry import Pair
from napari_dense.convert.plan import DensePlan
from napari_dense.errors import InputError

__all__ = ["DenseClassifier"]


class DenseClassifier(nn.Module):
    """A patch classifier turned into one network over whole images (made by ``densify``).

    ``forward(x)`` maps ``(N, C, H, W)`` (``H >= Ph``, ``W >= Pw``) to ``(N, K, H', W')``:
    output ``[n, :, i, j]`` is the classifier's output for the patch of ``x[n]`` whose top-left
    corner is ``(i * sy, j * sx)``, where ``(sy, sx) = output_stride``, so
    ``H' = (H - Ph) // sy + 1``. With every striding layer densified, ``output_stride == (1, 1)``
    and ``out[n, :, i, j] == model(x[n, :, i:i+Ph, j:j+Pw])`` ("valid" dense output).
    With checkered layers, only the grid points marked in ``sample_pattern`` (repeated every
    ``len(pattern)`` points) hold samples; the others are zero, to be interpolated
    (:func:`napari_dense.run.predict.upsample_lattice`).

    Attributes
    ----------
    network
        The rewritten fx ``GraphModule`` (``print(dense.network.code)`` shows it).
    plan
        The :class:`~napari_dense.convert.plan.DensePlan`: layers, sampling, costs.
    """

    def __init__(self, network: fx.GraphModule, plan: DensePlan):
        super().__init__()
        # channels_last: oneDNN (CPU) and cuDNN (tensor cores) run convolutions in NHWC without
        # reordering every map; measured 1.4-1.9x faster on CPU for the benchmark nets.
        self.network = network.to(memory_format=torch.channels_last)
        # Pickling (dask workers) re-traces the network's code: keep the dense ops as leaves.
        self.network._tracer_cls = DenseTracer
        self.plan = plan

    @property
    def patch_size(self) -> Pair:
        """``(Ph, Pw)``."""
        return self.plan.patch_size

    @property
    def in_channels(self) -> int:
        """Channels the classifier expects."""
        return self.plan.in_channels

    @property
    def num_classes(self) -> int:
        """Length ``K`` of the classifier's output vector."""
        return self.plan.num_classes

    @property
    def exact(self) -> bool:
        """Whether the output equals per-patch evaluation (False with padding inside the net)."""
        return self.plan.exact

    @property
    def output_stride(self) -> Pair:
        """Input pixels between neighbouring output samples (``(1, 1)`` when fully densified)."""
        return self.plan.output_stride

    @property
    def period(self) -> Pair:
        """Input pixels after which the computed samples repeat: the output stride, times the
        sample pattern's size with checkered layers (``plan.sample_pattern``). Border padding
        and tiles align to it."""
        return self.plan.period

    @property
    def sample_pattern(self) -> tuple[tuple[bool, ...], ...] | None:
        """Which output grid points hold computed samples (None: all of them)."""
        return self.plan.sample_pattern

    @property
    def output_offset(self) -> Pair:
        """Input pixel at the centre of output sample ``[0, 0]``: ``(Ph // 2, Pw // 2)``.

        Sample ``[i, j]`` is centred at ``(offset_y + i * sy, offset_x + j * sx)``, under the
        FDFE convention that a patch starts ``P // 2`` pixels before its centre.
        """
        return (self.patch_size[0] // 2, self.patch_size[1] // 2)

    def output_shape(self, height: int, width: int) -> Pair:
        """Spatial shape of ``forward``'s output for an input of ``height × width``."""
        (ph, pw), (sy, sx) = self.patch_size, self.output_stride
        return ((height - ph) // sy + 1, (width - pw) // sx + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise InputError(f"expected a batch (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise InputError(
                f"the model expects {self.in_channels} channel(s), the input has {x.shape[1]}"
            )
        height, width = x.shape[-2:]
        if height < self.patch_size[0] or width < self.patch_size[1]:
            raise InputError(
                f"input {height}x{width} is smaller than the {self.patch_size[0]}x"
                f"{self.patch_size[1]} patch; pad it (napari_dense.predict pads the border)"
            )
        out_h, out_w = self.output_shape(height, width)
        out = self.network(x.contiguous(memory_format=torch.channels_last))
        # The network's valid region can extend past the last full patch (pooling that drops odd
        # rows, padding inside the net): keep exactly one output per patch.
        return out[:, :, :out_h, :out_w]

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, in_channels={self.in_channels}, "
            f"num_classes={self.num_classes}, output_stride={self.output_stride}, "
            f"exact={self.exact}"
        )
