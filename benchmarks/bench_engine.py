"""End-to-end engine benchmark: zarr -> OME-Zarr throughput, memory versus image size, precision.

Measures, for one network and device:

1. **Overhead**: in-memory compute throughput (the dense network on one tile, median of repeats)
   versus end-to-end ``predict_to_zarr`` from a zarr image to an OME-Zarr map (read, halo,
   host->device copy, compute, write). Target: end-to-end >= 85 % of compute.
2. **Constant memory**: peak host RSS (and CUDA memory) of a whole run, each image size in a
   fresh process, for growing square images. Target: flat.
3. **Precision**: float32 / bfloat16 / float16 speed and max deviation from float32.

On CUDA each end-to-end run first warms the engine up on one tile of the same shape in the same
process (cuDNN autotuning, compilation): that time is reported apart as "first call", and the
timed run is the steady state. ``benchmarks/device_check.sh`` runs the 64×64 net in bfloat16 on a
32768² (1 gigapixel) uint8 zarr into a uint8 store (``--store-dtype uint8``).

Run ``python benchmarks/bench_engine.py`` (``--help`` for options). Prints markdown tables and
writes JSON to ``benchmarks/results/bench_engine.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from napari_dense import densify
from napari_dense.evaluate.models import BENCHMARK_NETS
from napari_dense.run._memory import current_rss, peak_rss, reset_peak_rss
from napari_dense.run.device import cuda_settings
from napari_dense.run.engine import iter_predict, make_predictor
from napari_dense.run.to_zarr import predict_to_zarr

RESULTS = Path(__file__).parent / "results"


def make_zarr_image(path: Path, size: int, channels: int, chunk: int = 1024) -> None:
    """A uint8 zarr image of ``size``² written chunk by chunk (never whole in memory).

    Chunks are drawn from 8 random blocks (incompressible like real noise, and a 32768² image
    is written in seconds), in parallel threads (each writes its own chunks).
    """
    shape = (size, size) if channels == 1 else (size, size, channels)
    chunks = (chunk, chunk) if channels == 1 else (chunk, chunk, channels)
    array = zarr.create_array(path, shape=shape, chunks=chunks, dtype="uint8")
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 255, chunks, np.uint8) for _ in range(8)]

    def write(corner: tuple[int, int]) -> None:
        y, x = corner
        block = blocks[(y // chunk * 7 + x // chunk) % len(blocks)]
        height, width = min(chunk, size - y), min(chunk, size - x)
        array[y : y + height, x : x + width] = block[:height, :width]

    corners = [(y, x) for y in range(0, size, chunk) for x in range(0, size, chunk)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(write, corners))


def build_model(net: str) -> tuple[torch.nn.Module, int, int]:
    """The benchmark network with fixed random weights."""
    factory, patch, channels = BENCHMARK_NETS[net]
    torch.manual_seed(0)
    return factory().eval(), patch, channels


def sync(device: str) -> None:
    """Wait for queued GPU work before reading a timer."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compute_throughput(net: str, tile: int, device: str, precision: str, repeats: int) -> float:
    """Mpx/s of the dense network alone on one tile already on the device."""
    model, patch, channels = build_model(net)
    dense = densify(model, patch).to(device).eval()
    x = torch.rand(1, channels, tile + patch - 1, tile + patch - 1, device=device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    times = []
    with (
        torch.inference_mode(),
        cuda_settings(torch.device(device), precision),  # strict float32: TF32 off
        torch.autocast(
            torch.device(device).type, dtype=dtype[precision], enabled=precision != "float32"
        ),
    ):
        dense(x)  # warm-up (and cuDNN autotuning)
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            dense(x)
            sync(device)
            times.append(time.perf_counter() - start)
    return tile * tile / 1e6 / statistics.median(times)


def warm_up(net: str, tile: int, device: str, precision: str) -> float:
    """Seconds of the engine's first call on a ``tile``² window shape (autotuning, compiling)."""
    model, patch, channels = build_model(net)
    shape = (tile, tile) if channels == 1 else (tile, tile, channels)
    axis = None if channels == 1 else -1
    predictor = make_predictor(np.zeros(shape, np.uint8), model, patch, channel_axis=axis,
                               tile=tile, device=device, precision=precision)  # fmt: skip
    return predictor.warm_up()


def end_to_end(
    net: str, size: int, tile: int, device: str, precision: str, workdir: Path,
    store_dtype: str = "float32",
) -> dict:  # fmt: skip
    """One predict_to_zarr run in this process: seconds, Mpx/s, peak memory."""
    model, patch, channels = build_model(net)
    source = workdir / f"image_{size}_{channels}.zarr"
    if not source.exists():
        make_zarr_image(source, size, channels)
    output = workdir / f"map_{net}_{size}_{precision}.zarr"
    first_call = warm_up(net, tile, device, precision) if device.startswith("cuda") else None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()  # a child starts with its parent's peak: measure this run only
    rss_before = current_rss()
    start = time.perf_counter()
    predict_to_zarr(
        source,
        model,
        output,
        patch_size=patch,
        tile=tile,
        device=device,
        precision=precision,
        dtype=store_dtype,
        overwrite=True,
    )
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "store_dtype": store_dtype,
        "first_call_s": first_call,
        "net": net,
        "size": size,
        "tile": tile,
        "device": device,
        "precision": precision,
        "seconds": seconds,
        "mpx_per_s": size * size / 1e6 / seconds,
        "peak_rss_mib": peak_rss() / 2**20,
        "rss_before_mib": rss_before / 2**20,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else 0.0,
    }


def in_subprocess(args: list[str]) -> dict:
    """Run ``end_to_end`` in a fresh interpreter so its peak RSS is its own."""
    result = subprocess.run(
        [sys.executable, __file__, "--worker", *args], check=True, capture_output=True, text=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def deviation(net: str, device: str, precision: str, size: int = 256) -> float:
    """Max |reduced - float32| of the engine's output on a random image."""
    model, patch, channels = build_model(net)
    shape = (size, size) if channels == 1 else (size, size, channels)
    image = np.random.default_rng(1).random(shape, dtype=np.float32)

    def run(prec: str) -> Any:  # one tile covers the image
        return next(iter_predict(image, model, patch, device=device, precision=prec, tile=size))

    reduced, exact = run(precision).probabilities, run("float32").probabilities
    return float(np.abs(reduced - exact).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="15x15", choices=list(BENCHMARK_NETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_engine.json")
    parser.add_argument("--workdir", type=Path, help="where test images go (default: a tmp dir)")
    parser.add_argument("--store-dtype", default="float32", choices=["float32", "float16", "uint8"])
    parser.add_argument("--skip-deviation", action="store_true",
                        help="skip the deviation of reduced precisions from float32")  # fmt: skip
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        net, size, tile, device, precision, workdir, store_dtype = args.worker
        run = end_to_end(net, int(size), int(tile), device, precision, Path(workdir), store_dtype)
        print(json.dumps(run))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="napari-dense-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else next(
            (
                line.split(":", 1)[1].strip()
                for line in open("/proc/cpuinfo")
                if line.startswith("model name")
            ),
            "cpu",
        )
    )
    print(
        f"# bench_engine: net {args.net}, device {args.device} ({device_name}), tile "
        f"{args.tile}, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    report: dict = {
        "net": args.net,
        "device": args.device,
        "device_name": device_name,
        "tile": args.tile,
        "runs": [],
        "precision": [],
    }

    print(
        "| size | precision | compute Mpx/s | end-to-end Mpx/s | end-to-end / compute "
        "| seconds | first call s | peak RSS MiB | peak CUDA MiB |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for precision in args.precisions:
        compute = compute_throughput(args.net, args.tile, args.device, precision, args.repeats)
        for size in args.sizes:
            run = in_subprocess(
                [args.net, str(size), str(args.tile), args.device, precision, str(workdir),
                 args.store_dtype]
            )  # fmt: skip
            run["compute_mpx_per_s"] = compute
            report["runs"].append(run)
            print(
                f"| {size}² | {precision} | {compute:.2f} | {run['mpx_per_s']:.2f} | "
                f"{run['mpx_per_s'] / compute:.0%} | {run['seconds']:.1f} | "
                + ("—" if run["first_call_s"] is None else f"{run['first_call_s']:.1f}")
                + f" | {run['peak_rss_mib']:.0f} | {run['peak_cuda_mib']:.0f} |",
                flush=True,
            )
        if precision != "float32" and not args.skip_deviation:
            report["precision"].append(
                {"precision": precision, "max_abs_dev": deviation(args.net, args.device, precision)}
            )
    if report["precision"]:
        print("\n| precision | max abs deviation from float32 (256² random image) |\n|---|---:|")
        for row in report["precision"]:
            print(f"| {row['precision']} | {row['max_abs_dev']:.2e} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
