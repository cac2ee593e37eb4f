"""The plan of a dense network: its striding layers, their sampling and what each costs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from napari_dense.convert.geometry import Pair

__all__ = ["SAMPLINGS", "DensePlan", "SamplingCost", "StridingLayer", "Verification"]

Sampling = Literal["all", "checkered", "none"]
#: Every per-layer sampling, cheapest first.
SAMPLINGS: tuple[Sampling, ...] = ("none", "checkered", "all")


@dataclass(frozen=True)
class SamplingCost:
    """The whole network's cost with one layer (and its tied layers) sampled as ``sampling``.

    Attributes
    ----------
    sampling
        ``"none"``, ``"checkered"`` or ``"all"``.
    density
        Fraction of output pixels computed exactly (the rest are interpolated).
    macs_per_pixel
        Multiply-adds per input pixel.
    bytes_per_megapixel
        Estimated peak activation bytes per input megapixel.
    """

    sampling: Sampling
    density: float
    macs_per_pixel: float
    bytes_per_megapixel: float


@dataclass(frozen=True)
class StridingLayer:
    """One pooling or strided layer of the patch network, and the cost of densifying it.

    Attributes
    ----------
    name
        Qualified module name (``features.2``) or, for functional calls, the fx node name.
    op
        Layer type (``MaxPool2d``, ``Conv2d``, ``avg_pool2d`` ...).
    kernel, stride
        As in the patch network, ``(y, x)``.
    sampling
        ``"all"``: evaluated at all ``sy × sx`` phases (exact, dense); ``"checkered"``: at half of
        them (:func:`~napari_dense.convert.geometry.checkered_phases`); ``"none"``: kept strided.
    added_macs_per_pixel
        Multiply-adds per output pixel that densifying this layer adds, the other layers sampled
        as in this plan.
    added_bytes_per_megapixel
        Peak activation bytes per output megapixel that densifying this layer adds (estimate).
    tied_with
        Layers that must be sampled like this one, because their branches are joined (added,
        concatenated) and joined maps must lie on one lattice. The added costs are those of
        flipping the whole group.
    costs
        The network's density, multiply-adds and memory for each sampling of this layer (its
        group), the other layers sampled as in this plan.
    """

    name: str
    op: str
    kernel: Pair
    stride: Pair
    sampling: Sampling
    added_macs_per_pixel: float = 0.0
    added_bytes_per_megapixel: float = 0.0
    tied_with: tuple[str, ...] = ()
    costs: tuple[SamplingCost, ...] = ()

    def cost(self, sampling: str) -> SamplingCost:
        """The entry of :attr:`costs` for ``sampling``."""
        for cost in self.costs:
            if cost.sampling == sampling:
                return cost
        raise KeyError(f"no cost for sampling {sampling!r} of layer {self.name}")


@dataclass(frozen=True)
class Verification:
    """The self-check of a conversion: the dense network against the model on random patches.

    Attributes
    ----------
    max_abs_diff
        Largest ``|dense - model|`` over every output value compared.
    tolerance
        Largest deviation an exact network may show (``1e-4 × max(1, scale)``).
    scale
        Largest ``|model output|`` seen (float32 rounding grows with it).
    positions
        Patch positions compared, over the whole batch.
    batch
        Images in the random input batch.
    input_size
        ``(H, W)`` of each random image: it covers every phase of every striding layer.
    phases_covered
        Whether the positions include every phase of every striding layer.
    """

    max_abs_diff: float
    tolerance: float
    scale: float
    positions: int
    batch: int
    input_size: Pair
    phases_covered: bool = True

    @property
    def passed(self) -> bool:
        """Whether the dense network matched the model within :attr:`tolerance`."""
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        """One line: ``max |Δ| 2.4e-07 over 24 patch positions (2 images 17x17, ...)``."""
        return (
            f"max |Δ| {self.max_abs_diff:.2g} vs the model over {self.positions} patch positions "
            f"({self.batch} random {_fmt_pair(self.input_size)} images"
            f"{', every phase of every striding layer' if self.phases_covered else ''}; "
            f"tolerance {self.tolerance:.2g})"
        )


@dataclass(frozen=True)
class DensePlan:
    """What a dense network computes and what it costs (the result of :func:`napari_dense.explain`).

    Attributes
    ----------
    patch_size, in_channels, num_classes
        The patch classifier's geometry.
    layers
        Every striding layer, in graph order (the choices a user can make).
    output_stride
        Input pixels between neighbouring points of the output grid: 1 when every layer is
        densified. With checkered layers, only the grid points marked in ``sample_pattern``
        hold computed samples.
    receptive_field
        Input pixels (per axis) that influence one output; at most ``patch_size`` (pooling that
        drops odd rows makes it smaller).
    exact
        Whether the dense network reproduces the patch classifier exactly (False with padding
        inside the network; see ``inexact_reasons``).
    macs_per_pixel
        Multiply-adds per input pixel for this sampling.
    macs_per_patch
        Multiply-adds of one forward pass of the patch classifier (the naive cost per pixel).
    bytes_per_megapixel
        Estimated peak activation memory per input megapixel (float32), batch 1.
    density
        Fraction of output pixels computed exactly (1 for advanced, ``1 / (sy * sx)`` for
        simple); the rest are interpolated.
    sample_pattern
        With checkered layers: which points of the output grid hold computed samples, a
        ``P × P`` pattern repeated over the grid (``pattern[0][0]`` is always True). None when
        every grid point is computed.
    verified
        The self-check :func:`napari_dense.densify` ran (:class:`Verification`: max |Δ| and the
        positions checked); None when it was skipped (``verify=False``).
    """

    patch_size: Pair
    in_channels: int
    num_classes: int
    layers: tuple[StridingLayer, ...]
    output_stride: Pair
    receptive_field: Pair
    exact: bool
    macs_per_pixel: float
    macs_per_patch: float
    bytes_per_megapixel: float
    inexact_reasons: tuple[str, ...] = field(default=())
    density: float = 1.0
    sample_pattern: tuple[tuple[bool, ...], ...] | None = None
    verified: Verification | None = None

    @property
    def period(self) -> Pair:
        """Input pixels after which the computed samples repeat (``output_stride`` times the
        pattern's size): tiles and border padding align to it."""
        if self.sample_pattern is None:
            return self.output_stride
        return (
            self.output_stride[0] * len(self.sample_pattern),
            self.output_stride[1] * len(self.sample_pattern[0]),
        )

    @property
    def sampling(self) -> dict[str, Sampling]:
        """The sampling of every striding layer, ``{name: "all" | "checkered" | "none"}``."""
        return {layer.name: layer.sampling for layer in self.layers}

    @property
    def speedup_over_naive(self) -> float:
        """Multiply-adds per patch ÷ multiply-adds per pixel (the ideal speedup over naive)."""
        return self.macs_per_patch / self.macs_per_pixel if self.macs_per_pixel else float("inf")

    def as_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable) of the plan."""
        return asdict(self)

    def to_markdown(self) -> str:
        """The layer table and totals as markdown."""
        lines = [
            "| layer | op | kernel | stride | sampling | +MAC/px | +MB/Mpx "
            "| none / checkered / all: exact px, MAC/px, MB/Mpx |",
            "|---|---|---|---|---|---:|---:|---|",
        ]
        for layer in self.layers:
            settings = " / ".join(
                f"{100 * c.density:.3g}%, {_fmt_count(c.macs_per_pixel)}, "
                f"{c.bytes_per_megapixel / 1e6:.0f}"
                for c in layer.costs
            )
            lines.append(
                f"| {layer.name} | {layer.op} | {_fmt_pair(layer.kernel)} | "
                f"{_fmt_pair(layer.stride)} | {layer.sampling} | "
                f"{_fmt_count(layer.added_macs_per_pixel)} | "
                f"{layer.added_bytes_per_megapixel / 1e6:.1f} | {settings} |"
            )
        lines.append("")
        lines.append(
            f"patch {_fmt_pair(self.patch_size)}, {self.in_channels} channel(s) -> "
            f"{self.num_classes} classes; output stride {_fmt_pair(self.output_stride)}; "
            f"{self.density:.1%} of pixels computed exactly; "
            f"{_fmt_count(self.macs_per_pixel)} MAC/px "
            f"(naive {_fmt_count(self.macs_per_patch)}/px, {self.speedup_over_naive:.0f}x less); "
            f"~{self.bytes_per_megapixel / 1e6:.0f} MB/Mpx; "
            f"{'exact' if self.exact else 'NOT exact: ' + '; '.join(self.inexact_reasons)}"
        )
        lines.append("")
        lines.append(
            "self-check: "
            + (self.verified.summary() if self.verified else "not run (verify=False)")
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _fmt_pair(value: Pair) -> str:
    return f"{value[0]}x{value[1]}"


def _fmt_count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"
