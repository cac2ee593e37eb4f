"""Benchmark: four ways to get a per-pixel map from a patch classifier.

For each benchmark network (``napari_dense.evaluate.models.BENCHMARK_NETS``, random weights)
and each square random float32 image, measures:

- **naive**: ``reference.patchwise``, the classifier on every patch (batched);
- **simple**: ``predict`` with ``densify(sampling="none")``: fully convolutional, interpolated
  between lattice samples (not exact between them);
- **shift-and-stitch**: ``baselines.shift_and_stitch``, exact, ``S²`` runs of the fully
  convolutional network (the published "advanced" approach);
- **advanced**: ``predict`` with ``densify(sampling="all")``, exact; where ``densify`` takes
  ``phases``, also **advanced (space-to-batch)** with ``phases="batch"``.

Each (net, size, method) runs in a fresh subprocess: one warm-up call (its time is "first call"
in the JSON), then ``--repeats`` timed calls whose median wall time is reported. Peak memory is
the peak RSS of the first call minus the RSS before it (``VmHWM`` of /proc/self/status, reset
just before the call; not ``ru_maxrss``, which a child inherits from its parent at fork), or
``torch.cuda.max_memory_allocated`` on CUDA. Max |Δ| is against naive's map at every pixel where
naive ran at that size, else against ``patchwise`` on 200 random pixels.

Naive and shift-and-stitch are skipped where their estimated time per call exceeds
``--naive-budget`` / ``--budget`` (extrapolated by pixel count from their last run; naive's
first estimate comes from a one-batch probe, shift-and-stitch's from simple's time × ``S²``).
Any method is skipped where its estimated peak memory (``explain(...).bytes_per_megapixel``
plus the float32 output map) exceeds 16 GiB (``--memory-limit-gib``).

On a GPU (``--device cuda``), ``--precisions float32 bfloat16 bfloat16-compiled`` measures each
method in strict float32 (TF32 off), bfloat16 autocast and, for the advanced methods only,
bfloat16 compiled (``torch.compile``, ``--compile-mode``; its compile time is the first call);
``--engine`` runs the advanced methods through the tiled engine (``TiledPredictor``, one tile of
``--tile`` px) instead of ``predict``; ``--on-device`` times the network alone, the padded image
already on the device and the map left there (as the GPU reference in ``../shared/gpu_anchor``
measures). Ratios to naive are at the same precision (the compiled rows against bfloat16
naive). ``benchmarks/device_check.sh`` runs it so on the GPU.

Run ``python benchmarks/bench_modes.py`` (or ``make bench``); ``--quick`` for a smoke run,
``--help`` for options. Prints markdown tables and writes JSON to
``benchmarks/results/bench_modes.json`` (after every net, so a run cut short keeps its nets).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_dense import DensePlan, densify, explain, predict
from napari_dense.convert.geometry import border_padding
from napari_dense.convert.upsample import upsample_lattice
from napari_dense.evaluate.baselines import shift_and_stitch
from napari_dense.evaluate.models import BENCHMARK_NETS
from napari_dense.evaluate.reference import patchwise
from napari_dense.io.image import as_batch, pad_border
from napari_dense.run.device import DEFAULT_COMPILE_MODE, cuda_settings
from napari_dense.run.engine import make_predictor

RESULTS = Path(__file__).parent / "results"
DEFAULT_SIZES = [256, 512, 1024, 2048, 4096]
QUICK_SIZES = [128, 256]
MEMORY_LIMIT_BYTES = 16 * 2**30
SAMPLED_PIXELS = 200
#: Patches per forward pass of naive: the fastest of 128 … 2048 on a 2-core CPU.
NAIVE_BATCH_SIZE = {"15x15": 512, "32x32": 256, "64x64": 256}
#: ``densify`` options of the methods that ``predict`` with a converted network.
DENSE_METHODS: dict[str, dict[str, str]] = {
    "simple": {"sampling": "none"},
    "advanced": {"sampling": "all"},
    "advanced (space-to-batch)": {"sampling": "all", "phases": "batch"},
}
#: ``--precisions``: strict float32, bfloat16 autocast, bfloat16 compiled (advanced only).
PRECISION_CHOICES = ("float32", "bfloat16", "bfloat16-compiled")
COMPILED = "bfloat16-compiled"


def runs_at(method: str, precision: str) -> bool:
    """Whether ``method`` is measured at ``precision`` (compiled: the advanced methods only)."""
    return precision != COMPILED or method.startswith("advanced")


def naive_precision(precision: str) -> str:
    """The precision of the naive run that ``precision``'s rows are compared with."""
    return "bfloat16" if precision == COMPILED else precision


def precision_context(device: str, precision: str) -> Any:
    """Autocast to bfloat16, or strict float32 (TF32 off on CUDA) around a call."""
    if precision == "float32":
        return cuda_settings(torch.device(device), "float32")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def method_names() -> list[str]:
    """The methods to measure; space-to-batch only where ``densify`` takes ``phases``."""
    names = ["naive", "simple", "shift-and-stitch", "advanced"]
    if "phases" in inspect.signature(densify).parameters:
        names.append("advanced (space-to-batch)")
    return names


def build_model(net: str) -> tuple[torch.nn.Module, int, int]:
    """The benchmark network ``net`` with fixed random weights, its patch size and channels."""
    factory, patch, channels = BENCHMARK_NETS[net]
    torch.manual_seed(0)
    return factory().eval(), patch, channels


def make_image(size: int, channels: int) -> np.ndarray:
    """A random float32 ``(size, size)`` image, or ``(size, size, channels)`` for RGB."""
    shape = (size, size) if channels == 1 else (size, size, channels)
    return np.random.default_rng(0).random(shape, dtype=np.float32)


def channel_axis_of(channels: int) -> int | None:
    """The channel axis of :func:`make_image`'s images."""
    return None if channels == 1 else -1


def sync(device: str) -> None:
    """Wait for queued GPU work before reading a timer."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def engine_runner(
    dense: torch.nn.Module, axis: int | None, device: str, precision: str, tile: int | None,
    compile_mode: str = DEFAULT_COMPILE_MODE,
) -> Callable[[np.ndarray], np.ndarray]:  # fmt: skip
    """image -> map through the tiled engine (compiled once per process for ``COMPILED``)."""

    def run(image: np.ndarray) -> np.ndarray:
        predictor = make_predictor(
            image, dense, channel_axis=axis, device=device, tile=tile or max(image.shape[:2]),
            precision="bfloat16" if precision == COMPILED else precision,
            compile=compile_mode if precision == COMPILED else False,
        )  # fmt: skip
        out = np.empty((predictor.num_classes, *predictor.source.plane_shape), np.float32)
        for result in predictor.run(predictor.tasks()):
            y0, y1, x0, x1 = result.tile.box
            out[:, y0:y1, x0:x1] = result.probabilities
        return out

    return run


def device_runner(
    dense: torch.nn.Module, axis: int | None, device: str, precision: str, compile_mode: str
) -> Callable[[np.ndarray], torch.Tensor]:
    """image -> map left on the device: the network alone, as the GPU reference measures it.

    The border-padded image is copied to the device at the first call only; the map stays on
    the device (the engine overlaps those copies with other tiles' compute).
    """
    target = torch.device(device)
    dense = dense.to(target).eval()
    network = (
        torch.compile(dense, mode=compile_mode, dynamic=False) if precision == COMPILED else dense
    )
    inputs: dict[int, torch.Tensor] = {}

    def run(image: np.ndarray) -> torch.Tensor:
        batch = as_batch(image, channel_axis=axis, channels=dense.in_channels)
        height, width = batch.shape[-2:]
        if id(image) not in inputs:
            (ph, pw), (ty, tx) = dense.patch_size, dense.period
            cells = dense.sample_pattern is not None
            rows = border_padding(height, ph, ty, whole_cells=cells)
            cols = border_padding(width, pw, tx, whole_cells=cells)
            padded = pad_border(batch, rows, cols, "reflect")
            inputs[id(image)] = torch.from_numpy(padded).to(target)
        with torch.inference_mode():
            samples = network(inputs[id(image)])
            out = upsample_lattice(samples, dense.output_stride, (height, width), "bilinear",
                                   dense.sample_pattern)  # fmt: skip
        return out[0]

    return run


def make_runner(
    method: str, net: str, model: torch.nn.Module, patch: int, channels: int, device: str,
    precision: str = "float32", engine: bool = False, tile: int | None = None,
    naive_batch: int | None = None, compile_mode: str = DEFAULT_COMPILE_MODE,
    on_device: bool = False,
) -> Callable[[np.ndarray], Any]:  # fmt: skip
    """A function image -> ``(K, H, W)`` map computing it with ``method`` (converted up front)."""
    axis = channel_axis_of(channels)
    if method == "naive":
        batch_size = naive_batch or NAIVE_BATCH_SIZE[net]
        return lambda image: patchwise(
            image, model, patch, channel_axis=axis, batch_size=batch_size, device=device
        )
    if method == "shift-and-stitch":
        return lambda image: shift_and_stitch(image, model, patch, channel_axis=axis, device=device)
    dense = densify(model, patch, **DENSE_METHODS[method])
    if on_device and method.startswith("advanced"):
        return device_runner(dense, axis, device, precision, compile_mode)
    if precision == COMPILED or (engine and method.startswith("advanced")):
        return engine_runner(dense, axis, device, precision, tile, compile_mode)
    return lambda image: predict(image, dense, channel_axis=axis, device=device)


def memory_status_bytes(field: str) -> int:
    """``VmRSS`` (resident set size) or ``VmHWM`` (its peak) of this process, in bytes (Linux)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def max_deviation(
    output: np.ndarray, reference_path: Path, image: np.ndarray, job: dict[str, Any]
) -> tuple[float, str]:
    """Max |output - naive| and where it was taken: every pixel, or 200 random pixels."""
    if reference_path.exists():
        reference = np.load(reference_path, mmap_mode="r")
        deviations = [np.abs(out - ref).max() for out, ref in zip(output, reference, strict=True)]
        return float(max(deviations)), "all"
    model, patch, channels = build_model(job["net"])
    positions = np.random.default_rng(1).integers(0, job["size"], (SAMPLED_PIXELS, 2))
    reference = patchwise(image, model, patch, channel_axis=channel_axis_of(channels),
                          positions=positions, device=job["device"])  # fmt: skip
    sampled = output[:, positions[:, 0], positions[:, 1]]
    return float(np.abs(sampled - reference).max()), f"{SAMPLED_PIXELS} px"


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Time one (net, size, method) in this process; its peak memory and deviation from naive."""
    net, size, method, device = job["net"], job["size"], job["method"], job["device"]
    precision = job.get("precision", "float32")
    model, patch, channels = build_model(net)
    image = make_image(size, channels)
    call = make_runner(method, net, model, patch, channels, device, precision,
                       job.get("engine", False), job.get("tile"), job.get("naive_batch"),
                       job.get("compile_mode", DEFAULT_COMPILE_MODE),
                       job.get("on_device", False))  # fmt: skip

    def run(image: np.ndarray) -> Any:
        with precision_context(device, precision):
            return call(image)

    # Deviations are from float32 naive's map where it ran, else from sampled float32 patches.
    suffix = "" if precision == "float32" else f"_{precision}"
    reference_path = Path(job["workdir"]) / f"naive_{net}_{size}{suffix}.npy"
    float32_reference = Path(job["workdir"]) / f"naive_{net}_{size}.npy"
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := current RSS
    rss_before = memory_status_bytes("VmRSS")
    start = time.perf_counter()
    output = run(image)
    sync(device)
    first_call = time.perf_counter() - start
    if isinstance(output, torch.Tensor):  # left on the device (--on-device)
        output = output.float().cpu().numpy()
    peak_host = memory_status_bytes("VmHWM") - rss_before
    peak_cuda = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    if method == "naive":
        np.save(reference_path, output)
    if method == "naive" and precision == "float32":
        deviation, compared_on = 0.0, "reference"
    else:
        deviation, compared_on = max_deviation(output, float32_reference, image, job)
    del output
    times = []
    for _ in range(job["repeats"]):
        start = time.perf_counter()
        run(image)
        sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"first_call_s": first_call, "times_s": times, "median_s": median,
            "mpx_per_s": size * size / 1e6 / median, "peak_host_mib": peak_host / 2**20,
            "peak_cuda_mib": peak_cuda / 2**20, "max_abs_diff": deviation,
            "diff_on": compared_on}  # fmt: skip


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter, so that its peak RSS is its own."""
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-3000:])
        return {"failed": f"exit code {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def probe_naive(
    net: str, device: str, precision: str = "float32", batch_size: int | None = None
) -> float:
    """Seconds per pixel of naive: one batch of patches, timed after a warm-up batch."""
    model, patch, channels = build_model(net)
    batch_size = batch_size or NAIVE_BATCH_SIZE[net]
    image = make_image(64, channels)
    positions = np.random.default_rng(2).integers(0, 64, (batch_size, 2))
    for _ in range(2):
        start = time.perf_counter()
        with precision_context(device, precision):
            patchwise(image, model, patch, channel_axis=channel_axis_of(channels),
                      positions=positions, batch_size=batch_size, device=device)  # fmt: skip
        sync(device)
        seconds = time.perf_counter() - start
    return seconds / batch_size


def estimated_peak_bytes(method: str, pixels: int, plans: dict[str, DensePlan]) -> float:
    """Peak memory of ``method`` on ``pixels``: activations (from ``explain``) + output map."""
    output_bytes = 4 * plans["all"].num_classes * pixels
    if method == "naive":
        return 3 * output_bytes  # the batches' outputs, their concatenation, the (K, H, W) copy
    plan = plans["all"] if method.startswith("advanced") else plans["none"]
    return plan.bytes_per_megapixel * pixels / 1e6 + output_bytes


def estimated_seconds(
    method: str, pixels: int, seconds_per_pixel: dict[str, float], stride_area: int
) -> float | None:
    """Time per call of ``method``, extrapolated from its last run (None when unknown)."""
    if method in seconds_per_pixel:
        return seconds_per_pixel[method] * pixels
    if method == "shift-and-stitch" and "simple" in seconds_per_pixel:
        return seconds_per_pixel["simple"] * pixels * stride_area
    return None


def format_row(record: dict[str, Any], naive_seconds: float, naive_measured: bool) -> str:
    """One markdown row of the results table (``~``: naive's time extrapolated)."""
    precision = record.get("precision", "float32")
    label = record["method"] if precision == "float32" else f"{record['method']} [{precision}]"
    cells = [f"{record['size']}²", label]
    if "median_s" not in record:
        reason = f"skipped ({record['skipped']})" if "skipped" in record else record["failed"]
        return "| " + " | ".join([*cells, f"**{reason}**", *["—"] * 4]) + " |"
    deviation = "reference" if record["diff_on"] == "reference" else f"{record['max_abs_diff']:.1e}"
    if record["diff_on"] == f"{SAMPLED_PIXELS} px":
        deviation += f" ({SAMPLED_PIXELS} px)"
    speedup = f"{naive_seconds / record['median_s']:.1f}×"
    peak = record["peak_cuda_mib" if record["device"].startswith("cuda") else "peak_host_mib"]
    cells += [f"{record['median_s']:.3f}", f"{record['mpx_per_s']:.3f}", f"{peak:.0f}", deviation,
              speedup if naive_measured else f"~{speedup}"]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def ratio_at_largest(
    records: list[dict[str, Any]], slow: str, fast: str
) -> tuple[float, int] | None:
    """Median time of ``slow`` ÷ that of ``fast`` at the largest size where both ran."""
    medians = {(r["method"], r["size"]): r["median_s"] for r in records if "median_s" in r}
    sizes = [size for method, size in medians if method == fast and (slow, size) in medians]
    if not sizes:
        return None
    return medians[slow, max(sizes)] / medians[fast, max(sizes)], max(sizes)


def summarize(
    records: list[dict[str, Any]], ideal: float, naive_basis: str, naive_rate: float
) -> dict[str, Any]:
    """Advanced's speedup over naive (measured or extrapolated) and over shift-and-stitch."""
    measured = ratio_at_largest(records, "naive", "advanced")
    advanced = [r for r in records if r["method"] == "advanced" and "median_s" in r]
    if measured is not None:
        speedup, basis = measured[0], f"measured at {measured[1]}²"
    elif advanced:
        largest = max(advanced, key=lambda r: r["size"])
        speedup = naive_rate * largest["size"] ** 2 / largest["median_s"]
        basis = f"at {largest['size']}², naive extrapolated from {naive_basis}"
    else:
        speedup, basis = float("nan"), "advanced never ran"
    versus_sas = ratio_at_largest(records, "shift-and-stitch", "advanced")
    return {"ideal_speedup": ideal, "advanced_over_naive": speedup,
            "advanced_over_naive_basis": basis, "measured_over_ideal": speedup / ideal,
            "advanced_over_shift_and_stitch": versus_sas and versus_sas[0],
            "advanced_over_shift_and_stitch_size": versus_sas and versus_sas[1]}  # fmt: skip


def benchmark_net(net: str, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """Measure every method at every size and precision for ``net``, printing rows as they come."""
    model, patch, channels = build_model(net)
    plans = {sampling: explain(model, patch, sampling=sampling) for sampling in ("all", "none")}
    ideal = plans["all"].macs_per_patch / plans["all"].macs_per_pixel
    stride_y, stride_x = plans["none"].output_stride
    naive_batch = args.naive_batch or NAIVE_BATCH_SIZE[net]
    print(
        f"\n## {net}: patch {patch}, {channels} channel(s), {plans['all'].num_classes} classes, "
        f"output stride {stride_y}×{stride_x} undensified, ideal speedup {ideal:.1f}×\n"
    )
    peak_label = "peak MiB (CUDA)" if args.device.startswith("cuda") else "peak MiB (RSS)"
    print(
        f"| size | method | median s | Mpx/s | {peak_label} | max \\|Δ\\| vs naive "
        "| speedup vs naive |\n|---:|---|---:|---:|---:|---:|---:|",
        flush=True,
    )
    records: list[dict[str, Any]] = []
    summaries: dict[str, dict[str, Any]] = {}
    naive_runs: dict[str, tuple[dict[str, float], str, list[dict[str, Any]]]] = {}
    for precision in args.precisions:
        if precision in naive_runs:
            continue
        base = naive_precision(precision)
        if base in naive_runs:  # compiled rows: against the naive of bfloat16 eager
            naive_rates, naive_basis, naive_records = naive_runs[base]
            seconds_per_pixel = {"naive": naive_rates["naive"]}
        else:
            seconds_per_pixel = {"naive": probe_naive(net, args.device, base, naive_batch)}
            naive_basis, naive_records = f"a {naive_batch}-patch probe", []
        budgets = {"naive": args.naive_budget, "shift-and-stitch": args.budget}
        ran = run_precision(net, precision, args, workdir, plans, seconds_per_pixel, budgets,
                            naive_basis, naive_batch)  # fmt: skip
        precision_records, naive_basis = ran
        records += precision_records
        naive_runs[precision] = (seconds_per_pixel, naive_basis, precision_records)
        compared = [r for r in naive_records if r["method"] == "naive"] + precision_records
        summaries[precision] = summarize(compared, ideal, naive_basis, seconds_per_pixel["naive"])
    print(f"\n| {net} | ideal speedup | advanced / naive | measured / ideal | advanced vs "
          "shift-and-stitch |\n|---|---:|---:|---:|---:|")  # fmt: skip
    for precision, summary in summaries.items():
        versus_sas = summary["advanced_over_shift_and_stitch"]
        label = "" if precision == "float32" and len(summaries) == 1 else precision
        print(f"| {label} | {ideal:.1f}× | "
              f"{summary['advanced_over_naive']:.1f}× ({summary['advanced_over_naive_basis']}) | "
              f"{summary['measured_over_ideal']:.0%} | "
              + (f"{versus_sas:.1f}× (at {summary['advanced_over_shift_and_stitch_size']}²) |"
                 if versus_sas else "— |"), flush=True)  # fmt: skip
    report = {"patch": patch, "in_channels": channels, "naive_batch_size": naive_batch,
              "plan_all": plans["all"].as_dict(), "plan_none": plans["none"].as_dict(),
              "runs": records, "summary": summaries[args.precisions[0]]}  # fmt: skip
    if len(summaries) > 1:
        report["summaries"] = summaries
    return report


def run_precision(
    net: str, precision: str, args: argparse.Namespace, workdir: str,
    plans: dict[str, DensePlan], seconds_per_pixel: dict[str, float],
    budgets: dict[str, float], naive_basis: str, naive_batch: int,
) -> tuple[list[dict[str, Any]], str]:  # fmt: skip
    """Every method of ``args.methods`` at every size at one precision, printed as they come."""
    stride_y, stride_x = plans["none"].output_stride
    records: list[dict[str, Any]] = []
    for size in args.sizes:
        pixels = size * size
        naive_measured = False
        for method in [m for m in args.methods if runs_at(m, precision)]:
            seconds = estimated_seconds(method, pixels, seconds_per_pixel, stride_y * stride_x)
            peak_bytes = estimated_peak_bytes(method, pixels, plans)
            record: dict[str, Any] = {"net": net, "size": size, "method": method,
                                      "precision": precision, "device": args.device,
                                      "estimated_seconds": seconds,
                                      "estimated_peak_mib": peak_bytes / 2**20}  # fmt: skip
            if method in budgets and seconds is not None and seconds > budgets[method]:
                record["skipped"] = f"est. {seconds:.0f} s"
            elif peak_bytes > args.memory_limit_gib * 2**30:
                record["skipped"] = f"est. {peak_bytes / 2**30:.0f} GiB"
            else:
                job = {"net": net, "size": size, "method": method, "device": args.device,
                       "repeats": args.repeats, "workdir": workdir, "precision": precision,
                       "engine": args.engine, "tile": args.tile, "naive_batch": naive_batch,
                       "compile_mode": args.compile_mode,
                       "on_device": args.on_device}  # fmt: skip
                record.update(run_worker(job))
            if "median_s" in record:
                seconds_per_pixel[method] = record["median_s"] / pixels
                if method == "naive":
                    naive_measured, naive_basis = True, f"{size}²"
            records.append(record)
            naive_seconds = seconds_per_pixel["naive"] * pixels
            print(format_row(record, naive_seconds, naive_measured), flush=True)
    return records, naive_basis


def environment(device: str) -> dict[str, Any]:
    """Torch version, threads, CPU model and device name."""
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo
                    if line.startswith("model name")), "unknown")  # fmt: skip
    name = torch.cuda.get_device_name() if device.startswith("cuda") else cpu
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
            "device": device, "device_name": name}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(BENCHMARK_NETS),
                        choices=list(BENCHMARK_NETS))  # fmt: skip
    parser.add_argument("--sizes", type=int, nargs="+", help=f"default {DEFAULT_SIZES}")
    parser.add_argument("--repeats", type=int, help="timed calls after the warm-up (default 3)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--naive-budget", type=float, default=60.0, help="s per naive call")
    parser.add_argument("--budget", type=float, default=120.0, help="s per shift-and-stitch call")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_modes.json")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, repeats 1")
    parser.add_argument("--precisions", nargs="+", default=["float32"], choices=PRECISION_CHOICES,
                        help="strict float32 (TF32 off), bfloat16 autocast, bfloat16 compiled "
                        "(advanced methods only); default float32")  # fmt: skip
    parser.add_argument("--methods", nargs="+", help="subset of the methods (default all)")
    parser.add_argument("--engine", action="store_true",
                        help="advanced methods through the tiled engine")  # fmt: skip
    parser.add_argument("--tile", type=int, help="engine tile side (default: the image)")
    parser.add_argument("--on-device", action="store_true",
                        help="advanced: image copied once, map left on the device")  # fmt: skip
    parser.add_argument("--naive-batch", type=int, help="patches per naive forward pass")
    parser.add_argument("--memory-limit-gib", type=float, default=MEMORY_LIMIT_BYTES / 2**30,
                        help="skip runs whose estimated peak memory exceeds this")  # fmt: skip
    parser.add_argument("--compile-mode", default=DEFAULT_COMPILE_MODE,
                        help=f"torch.compile mode of {COMPILED}")  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return
    args.methods = args.methods or method_names()
    unknown = sorted(set(args.methods) - set(method_names()))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {method_names()}")
    if COMPILED in args.precisions and "bfloat16" not in args.precisions:
        args.precisions.insert(args.precisions.index(COMPILED), "bfloat16")  # its naive
    args.sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    env = environment(args.device)
    print(f"# bench_modes: torch {env['torch']}, {env['threads']} threads, CPU {env['cpu']}, "
          f"device {env['device']} ({env['device_name']}); median of {args.repeats} after a "
          f"warm-up")  # fmt: skip
    report: dict[str, Any] = {"environment": env, "sizes": args.sizes, "repeats": args.repeats,
                              "naive_budget_s": args.naive_budget, "budget_s": args.budget,
                              "nets": {}}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-modes-") as workdir:
        for net in args.nets:
            report["nets"][net] = benchmark_net(net, args, workdir)
            args.json.write_text(json.dumps(report, indent=2))  # kept if a later net is cut short
    print("\n~: naive's time extrapolated from its throughput at a smaller size (or its probe).")
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
