"""Estimates of a run's cost before running it (the GUI's live estimate).

The GUI calibrates them with :func:`probe_tile_rate`: one real tile of the run (read from the
chosen image, computed, written with its pyramid footprint into a scratch store), measured once
per model, sampling, device and image (:func:`cached_probe`), in a worker.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_dense.convert.plan import DensePlan

__all__ = [
    "GUI_TILE",
    "PROBE_SIDE",
    "RunEstimate",
    "cached_probe",
    "estimate_run",
    "gui_tile_size",
    "known_probe",
    "probe_rate",
    "probe_tile_rate",
]

#: Tile side of GUI runs without an explicit tile: sized for latency (the first tile lands and
#: Cancel answers within about a second on 2 CPU cores), not for memory as the CLI's.
GUI_TILE = 512
#: Output side of the calibration probe (one small tile through the dense network).
PROBE_SIDE = 128

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


def gui_tile_size(tile: int | None) -> int:
    """The tile side of a GUI run: the user's, or :data:`GUI_TILE` (0/None = automatic)."""
    return int(tile) if tile else GUI_TILE


_probes: dict[Hashable, float] = {}
_probes_lock = threading.Lock()


def probe_rate(dense: Any, device: Any = "cpu", side: int = PROBE_SIDE) -> float:
    """Multiply-adds per second of ``dense`` measured on one small tile (after a warm-up).

    The rate counts the tile's input window (tile plus the patch's halo), as a run computes it;
    :func:`estimate_run` scales by the halo of the run's tiles.
    """
    import torch

    (ph, pw) = dense.patch_size
    window = torch.rand(1, dense.in_channels, side + ph - 1, side + pw - 1, device=device)
    window = window.contiguous(memory_format=torch.channels_last)
    network = dense.to(device).eval()
    with torch.inference_mode():
        network(window[..., : ph + 7, : pw + 7])  # warm-up: kernels chosen, memory allocated
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        network(window)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - begin
    return dense.plan.macs_per_pixel * window.shape[-2] * window.shape[-1] / max(seconds, 1e-9)


def probe_tile_rate(prepare: Callable[[Path], tuple[Any, Any]]) -> float:
    """Multiply-adds per second of output pixels, measured on one real tile of a run.

    ``prepare(path)`` prepares the run into a scratch store at ``path`` (e.g. a partial of
    :func:`napari_dense.run.to_zarr.prepare_run` with the run's image, model, tile and
    ``pyramid_levels``). The tile nearest the image's centre warms up (kernels chosen, memory
    allocated); the next nearest is timed as a run does it: its window read from the image,
    computed, written with its footprint on every pyramid level. The scratch store is removed.
    Counts output pixels: pass the rate to :func:`estimate_run` without ``halo``.
    """
    with tempfile.TemporaryDirectory(prefix="napari-dense-probe-") as folder:
        predictor, store = prepare(Path(folder) / "probe.zarr")
        try:
            height, width = predictor.source.plane_shape
            tasks = predictor.tasks((height / 2, width / 2))[:2]
            seconds = 0.0
            for leading, tile in tasks:  # the last one timed
                begin = time.perf_counter()
                store.write_tile(
                    leading, tile.box, predictor.compute(predictor.read(leading, tile), tile)
                )
                seconds = time.perf_counter() - begin
        finally:
            if store.holds_lock:
                store.release_lock()
    pixels = tile.shape[0] * tile.shape[1]
    return predictor.dense.plan.macs_per_pixel * pixels / max(seconds, 1e-9)


def cached_probe(key: Hashable, measure: Callable[[], float]) -> float:
    """The probe's rate for ``key`` (e.g. ``(model sha256, sampling, device)``), measured once.

    Concurrent callers of one key wait for the first measurement rather than measuring again.
    """
    with _probes_lock:
        if key in _probes:
            return _probes[key]
        _probes[key] = rate = measure()
        return rate


def known_probe(key: Hashable) -> float | None:
    """The cached rate of ``key``, or None when it was not measured yet (never measures)."""
    with _probes_lock:
        return _probes.get(key)


def estimate_run(
    plan: DensePlan,
    pixels: int,
    tile_pixels: int,
    device_type: str = "cpu",
    macs_per_second: float | None = None,
    halo: tuple[int, int] = (1, 1),
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
        A measured rate (:func:`probe_rate`, or the last run's); otherwise a default for the
        device.
    halo
        The patch size when ``macs_per_second`` counts input windows (:func:`probe_rate`): each
        tile of side ``t`` computes a window of ``t + P - 1``.
    """
    rate = macs_per_second or DEFAULT_MACS_PER_SECOND.get(device_type, 5e10)
    macs = plan.macs_per_pixel * pixels
    side = max(tile_pixels, 1) ** 0.5
    overhead = (side + halo[0] - 1) * (side + halo[1] - 1) / max(tile_pixels, 1)
    return RunEstimate(
        output_stride=plan.output_stride,
        macs=macs,
        seconds=macs * overhead / rate,
        peak_bytes=plan.bytes_per_megapixel * tile_pixels / 1e6,
        density=plan.density,
    )
