"""Compare dense modes on one image: time, throughput, memory, difference, exactness."""

from __future__ import annotations

import ctypes
import threading
import time
import tracemalloc
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_dense.convert import densify, explain
from napari_dense.convert.plan import Verification
from napari_dense.convert.upsample import activate
from napari_dense.evaluate.baselines import shift_and_stitch
from napari_dense.evaluate.reference import patchwise
from napari_dense.io.image import as_batch, normalise
from napari_dense.run._memory import PeakMemory
from napari_dense.run.device import resolve_device
from napari_dense.run.options import RunOptions, sampling_of_mode
from napari_dense.run.predict import predict

__all__ = [
    "COMPARE_OPTIONS",
    "HOST_MEMORY",
    "HeapPeak",
    "ModeComparison",
    "ModeResult",
    "compare_modes",
]

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
    #: The conversion's self-check (``dense.plan.verified``); None for shift-and-stitch.
    verified: Verification | None = None


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
    #: What the differences are in: ``"softmax"``/``"sigmoid"`` probabilities, None: scores.
    activation: str | None = None

    @property
    def verified(self) -> Verification | None:
        """Advanced mode's conversion self-check (``dense.plan.verified``)."""
        return next((r.verified for r in self.results if r.mode == "advanced"), None)

    @property
    def delta_unit(self) -> str:
        """``"probabilities"`` or ``"scores"``: what the |Δ| columns compare."""
        return "scores" if self.activation in (None, "none") else "probabilities"

    def to_markdown(self) -> str:
        """The comparison as a markdown table (what the Compare panel copies)."""
        lines = [
            f"| mode | output stride | time (s) | Mpx/s | {HOST_MEMORY} | peak GPU MiB "
            f"| max abs Δ vs advanced ({self.delta_unit}) "
            f"| mean abs Δ vs advanced ({self.delta_unit}) |",
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
        if self.verified is not None:
            lines.append(f"Conversion self-check (advanced): {self.verified.summary()}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable; without the difference image)."""
        return {k: v for k, v in asdict(self).items() if k != "difference"}


#: The run options a comparison applies (every mode runs in memory, on the whole image).
COMPARE_OPTIONS = frozenset(
    {"channel_axis", "device", "border", "normalisation", "non_finite", "activation"}
)


def compare_modes(
    image: Any,
    model: nn.Module,
    patch_size: int | tuple[int, int],
    *,
    modes: Sequence[str | Mapping[str, str]] = DEFAULT_MODES,
    oracle_pixels: int = 500,
    seed: int = 0,
    options: RunOptions | None = None,
    **keywords: Any,
) -> ModeComparison:
    """Run each mode on ``image`` and compare it with advanced (exact) mode.

    Parameters
    ----------
    image, model, patch_size
        As in :func:`napari_dense.predict`.
    modes
        ``"simple"``, ``"advanced"``, ``"shift-and-stitch"`` or sampling mappings (custom).
        Advanced is always run (it is the reference) and listed last if not named.
    oracle_pixels
        Random pixels on which advanced is checked against :func:`reference.patchwise`.
    seed
        Of the random oracle pixels.
    options, **keywords
        The run options (:class:`napari_dense.RunOptions`) a comparison applies:
        ``channel_axis``, ``device``, ``border``, ``non_finite``, ``normalisation`` (every
        mode and the oracle see the normalised image, as the engine feeds the network) and
        ``activation`` (applied to every mode's output and to the oracle before the
        differences, so |Δ| is in probabilities; None or ``"none"``: in class scores).

    Host memory is each mode's own peak heap use (:class:`HeapPeak`: glibc's in-use bytes,
    numpy's and torch's CPU allocations alike, plus tracemalloc's numpy peak), not the
    process's RSS growth (0 where freed memory is reused).
    """
    run = RunOptions.merge(options, used=COMPARE_OPTIONS, caller="compare_modes", **keywords)
    target, border, activation = resolve_device(run.device), run.border, run.activation
    batch = as_batch(image, channel_axis=run.channel_axis, channels=None, non_finite=run.non_finite)
    image_chw = normalise(batch[0], run.normalisation)
    megapixels = image_chw.shape[-2] * image_chw.shape[-1] / 1e6
    ordered = [m for m in modes if m != "advanced"] + ["advanced"]
    outputs: dict[str, tuple[np.ndarray, tuple[int, int], float, Any, Any]] = {}
    for number, mode in enumerate(ordered):
        name = mode if isinstance(mode, str) else f"custom {number}"
        verified = None
        with PeakMemory(target) as memory, HeapPeak() as heap:
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
                verified = dense.plan.verified
            if target.type == "cuda":
                torch.cuda.synchronize(target)
            seconds = time.perf_counter() - start
        outputs[name] = (_activated(out, activation), stride, seconds, (memory, heap), verified)
    advanced = outputs["advanced"][0]
    results = []
    for name, (out, stride, seconds, (memory, heap), verified) in outputs.items():
        diff = np.abs(out - advanced)
        results.append(
            ModeResult(
                name,
                stride,
                seconds,
                megapixels / seconds,
                max(heap.bytes, memory.host_bytes),
                memory.device_bytes,
                float(diff.max()),
                float(diff.mean()),
                verified,
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
    oracle = _activated(oracle[:, :, None], activation)[:, :, 0]  # (K, P) as a (K, P, 1) map
    checked = advanced[:, positions[:, 0], positions[:, 1]]
    return ModeComparison(
        results=tuple(results),
        image_shape=tuple(np.shape(image)),
        device=str(target),
        oracle_pixels=oracle_pixels,
        oracle_max_abs_diff=float(np.abs(checked - oracle).max()),
        exact=explain(model, patch_size).exact,
        difference=np.abs(outputs["simple"][0] - advanced).max(0) if "simple" in outputs else None,
        activation=None if activation in (None, "none") else activation,
    )


#: Column header of the host memory (what :class:`HeapPeak` measures).
HOST_MEMORY = "host MiB (peak heap)"


def _activated(out: np.ndarray, activation: str | None) -> np.ndarray:
    """``(K, H, W)`` scores as probabilities (None: unchanged)."""
    if activation in (None, "none"):
        return out
    return activate(torch.from_numpy(np.ascontiguousarray(out))[None], activation)[0].numpy()


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
        )
    ]


def _heap_in_use() -> int | None:
    """Bytes glibc's malloc has handed out (arenas + mmapped blocks); None without glibc."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):  # not glibc >= 2.33
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


class HeapPeak:
    """The peak heap a block allocates itself: freed-and-reused memory counts, RSS does not.

    glibc's in-use bytes (numpy and torch's CPU allocator both malloc) sampled every
    ``interval`` seconds, and tracemalloc's exact peak of traced (numpy) allocations; the
    larger of the two, minus what was in use at entry. 0 where neither is available.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.bytes = 0
        self._baseline = self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tracing = False

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _heap_in_use() or 0)
            time.sleep(self.interval)

    def __enter__(self) -> HeapPeak:
        self._tracing = not tracemalloc.is_tracing()
        if self._tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self._traced_baseline = tracemalloc.get_traced_memory()[0]
        baseline = _heap_in_use()
        if baseline is not None:
            self._baseline = self._peak = baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        traced = tracemalloc.get_traced_memory()[1] - self._traced_baseline
        if self._tracing:
            tracemalloc.stop()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _heap_in_use() or 0)
        self.bytes = max(traced, self._peak - self._baseline, 0)
