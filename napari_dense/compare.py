"""Compare dense modes on one image: time, throughput, memory, difference, exactness."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ._image import as_batch, normalise
from ._memory import PeakMemory
from .baselines import shift_and_stitch
from .convert import densify, explain
from .device import resolve_device
from .predict import predict, sampling_of_mode
from .reference import patchwise

__all__ = ["ModeComparison", "ModeResult", "compare_modes"]

DEFAULT_MODES: tuple[str, ...] = ("simple", "shift-and-stitch", "advanced")


@dataclass(frozen=True)
class ModeResult:
    """One mode's run: what it cost and how far it is from advanced (exact)."""

    mode: str
    output_stride: tuple[int, int]
    seconds: float
    megapixels_per_second: float
    peak_host_bytes: int
    peak_device_bytes: int
    max_abs_diff: float
    mean_abs_diff: float


@dataclass(frozen=True)
class ModeComparison:
    """All modes on one image, plus the exactness check of advanced against the oracle."""

    results: tuple[ModeResult, ...]
    image_shape: tuple[int, ...]
    device: str
    oracle_pixels: int
    oracle_max_abs_diff: float
    exact: bool
    #: |simple − advanced|, the largest over classes, (H, W); None without a simple run.
    difference: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_markdown(self) -> str:
        """The comparison as a markdown table (what the Compare panel copies)."""
        lines = [
            "| mode | output stride | time (s) | Mpx/s | peak host MiB | peak GPU MiB "
            "| max abs Δ vs advanced | mean abs Δ vs advanced |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.results:
            lines.append(
                f"| {r.mode} | {r.output_stride[0]}x{r.output_stride[1]} | {r.seconds:.3f} | "
                f"{r.megapixels_per_second:.3f} | {r.peak_host_bytes / 2**20:.0f} | "
                f"{r.peak_device_bytes / 2**20:.0f} | {r.max_abs_diff:.2e} | "
                f"{r.mean_abs_diff:.2e} |"
            )
        lines.append("")
        lines.append(
            f"Exactness: advanced vs per-patch evaluation on {self.oracle_pixels} random pixels: "
            f"max abs Δ = {self.oracle_max_abs_diff:.2e}"
            + ("" if self.exact else " (the network is not exact: padding inside)")
        )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable; without the difference image)."""
        return {k: v for k, v in asdict(self).items() if k != "difference"}


def compare_modes(
    image: Any,
    model: nn.Module,
    patch_size: int | tuple[int, int],
    *,
    modes: Sequence[str | Mapping[str, str]] = DEFAULT_MODES,
    channel_axis: int | None = None,
    device: str | torch.device = "auto",
    border: str = "reflect",
    normalisation: Mapping[str, Any] | None = None,
    oracle_pixels: int = 500,
    seed: int = 0,
    non_finite: str = "refuse",
) -> ModeComparison:
    """Run each mode on ``image`` and compare it with advanced (exact) mode.

    Parameters
    ----------
    image, model, patch_size, channel_axis, device, border
        As in :func:`napari_dense.predict`.
    modes
        ``"simple"``, ``"advanced"``, ``"shift-and-stitch"`` or sampling mappings (custom).
        Advanced is always run (it is the reference) and listed last if not named.
    normalisation
        ``{"scale", "mean", "std"}`` of the model (as in its metadata): every mode and the
        oracle see ``(x * scale - mean) / std`` per channel, as the engine feeds the network.
    oracle_pixels
        Random pixels on which advanced is checked against :func:`reference.patchwise`.
    non_finite
        NaN/infinite pixels: ``"refuse"`` or ``"zero"`` (:mod:`napari_dense.input_checks`).
    """
    target = resolve_device(device)
    batch = as_batch(image, channel_axis=channel_axis, channels=None, non_finite=non_finite)
    image_chw = normalise(batch[0], normalisation)
    megapixels = image_chw.shape[-2] * image_chw.shape[-1] / 1e6
    ordered = [m for m in modes if m != "advanced"] + ["advanced"]
    outputs: dict[str, tuple[np.ndarray, tuple[int, int], float, PeakMemory]] = {}
    for number, mode in enumerate(ordered):
        name = mode if isinstance(mode, str) else f"custom {number}"
        with PeakMemory(target) as memory:
            start = time.perf_counter()
            if mode == "shift-and-stitch":
                out = shift_and_stitch(
                    image_chw, model, patch_size, channel_axis=0, border=border, device=target
                )
                stride = (1, 1)
            else:
                dense = densify(model, patch_size, sampling=sampling_of_mode(mode))
                out = predict(image_chw, dense, channel_axis=0, border=border, device=target)
                stride = dense.output_stride
            if target.type == "cuda":
                torch.cuda.synchronize(target)
            seconds = time.perf_counter() - start
        outputs[name] = (out, stride, seconds, memory)
    advanced = outputs["advanced"][0]
    results = []
    for name, (out, stride, seconds, memory) in outputs.items():
        diff = np.abs(out - advanced)
        results.append(
            ModeResult(
                name,
                stride,
                seconds,
                megapixels / seconds,
                memory.host_bytes,
                memory.device_bytes,
                float(diff.max()),
                float(diff.mean()),
            )
        )
    rng = np.random.default_rng(seed)
    height, width = image_chw.shape[-2:]
    positions = np.stack(
        [rng.integers(0, height, oracle_pixels), rng.integers(0, width, oracle_pixels)], axis=1
    )
    oracle = patchwise(
        image_chw, model, patch_size, channel_axis=0, border=border, positions=positions
    )
    checked = advanced[:, positions[:, 0], positions[:, 1]]
    return ModeComparison(
        results=tuple(results),
        image_shape=tuple(np.shape(image)),
        device=str(target),
        oracle_pixels=oracle_pixels,
        oracle_max_abs_diff=float(np.abs(checked - oracle).max()),
        exact=explain(model, patch_size).exact,
        difference=np.abs(outputs["simple"][0] - advanced).max(0) if "simple" in outputs else None,
    )
