"""Estimates of a run's cost before running it (the GUI's live estimate)."""

from __future__ import annotations

from dataclasses import dataclass

from .plan import DensePlan

__all__ = ["RunEstimate", "estimate_run"]

#: Multiply-adds per second assumed before any run was measured on a device kind: the CPU figure
#: was measured on 2 cores in this repository's benchmarks; the GPU figure is conservative.
DEFAULT_MACS_PER_SECOND = {"cpu": 5e10, "cuda": 5e12, "mps": 5e11}


@dataclass(frozen=True)
class RunEstimate:
    """What running a plan on an image should cost.

    ``density`` is the fraction of output pixels computed exactly (the plan's); the others are
    interpolated.
    """

    output_stride: tuple[int, int]
    macs: float
    seconds: float
    peak_bytes: float
    density: float = 1.0

    def describe(self) -> str:
        """One line for a label."""
        return (
            f"output stride {self.output_stride[0]}x{self.output_stride[1]} · "
            f"{_percent(self.density)} of pixels computed · "
            f"{self.macs / 1e9:.1f} GMAC · ~{_duration(self.seconds)} · "
            f"~{self.peak_bytes / 2**20:.0f} MiB peak"
        )


def _percent(fraction: float) -> str:
    # One decimal below 10 %: a 4x4 stride computes 6.2 %, not "6 %" (and 8x8 not "2 %").
    return f"{fraction:.0%}" if fraction >= 0.1 else f"{fraction:.1%}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_run(
    plan: DensePlan,
    pixels: int,
    tile_pixels: int,
    device_type: str = "cpu",
    macs_per_second: float | None = None,
) -> RunEstimate:
    """Estimate multiply-adds, time and peak activation memory of a run.

    Parameters
    ----------
    plan
        The dense network's plan (:func:`napari_dense.explain`).
    pixels
        Output pixels of the whole run (all planes).
    tile_pixels
        Pixels of one tile (memory is per tile).
    device_type
        ``"cpu"``, ``"cuda"`` or ``"mps"``.
    macs_per_second
        A measured rate (the GUI keeps the last run's); otherwise a default for the device.
    """
    rate = macs_per_second or DEFAULT_MACS_PER_SECOND.get(device_type, 5e10)
    macs = plan.macs_per_pixel * pixels
    return RunEstimate(
        output_stride=plan.output_stride,
        macs=macs,
        seconds=macs / rate,
        peak_bytes=plan.bytes_per_megapixel * tile_pixels / 1e6,
        density=plan.density,
    )
