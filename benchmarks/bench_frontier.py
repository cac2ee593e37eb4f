"""Accuracy–cost frontier of per-layer sampling (none / checkered / all) on two models.

For each model, every combination of per-layer samplings is timed on one image region (median
of repeats, one process), its peak memory measured, and its output compared with advanced (all
layers densified, exact): mean and 99th-percentile |Δp| and the fraction of pixels whose arg-max
class changes. Then the cheapest setting within a class-change budget is picked and its speedup
over advanced reported.

- ``ihc``: the demo model (``napari_dense/demo/models/ihc_patchnet.pt2``, trained) on the demo image
  (scikit-image's ``immunohistochemistry``).
- ``64x64``: the 64×64 benchmark net (random He-normal weights, seed 0, softmax) on the same
  image, normalised like the demo model.

Run ``python benchmarks/bench_frontier.py`` (``--help`` for options). Prints markdown tables,
writes the plots to ``--plots`` (default ``resources/``) and JSON to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage import data

import napari_dense as nd
from napari_dense.demo.run import find_demo_model
from napari_dense.demo.train import normalisation_of
from napari_dense.evaluate.models import BENCHMARK_NETS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
BUDGETS = (0.005, 0.01, 0.02, 0.05)


def model_of(name: str) -> tuple[Any, dict[str, Any]]:
    """The model (module or loaded model file) and the frontier arguments it needs."""
    if name == "ihc":
        return nd.load_classifier(find_demo_model()), {}
    factory, patch, _ = BENCHMARK_NETS[name]
    torch.manual_seed(0)
    model = factory().eval()
    # PyTorch's default init shrinks activations layer by layer: the deep 64x64 net's output is
    # then nearly constant (no pixel changes class in any setting). He-normal weights and zero
    # biases keep the random features' scale, so outputs vary across the image like a trained
    # net's.
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)
    image = data.immunohistochemistry()
    return model, {"patch_size": patch, "normalisation": normalisation_of(image)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="ihc,64x64", help="comma-separated: ihc, 15x15, 32x32, 64x64"
    )
    parser.add_argument(
        "--size", type=int, help="side of the centred region (default: 512 ihc, 256 others)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.01, help="class-change budget")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--plots", type=Path, default=ROOT / "resources")
    args = parser.parse_args()

    image = data.immunohistochemistry()  # (512, 512, 3) uint8, bundled
    height, width = image.shape[:2]
    print(
        f"# Frontier on the IHC image: torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads\n"
    )
    results: dict[str, Any] = {}
    for name in args.models.split(","):
        size = args.size or (512 if name == "ihc" else 256)
        y0, x0 = (height - size) // 2, (width - size) // 2
        region = (y0, y0 + size, x0, x0 + size)
        model, extra = model_of(name)
        start = time.perf_counter()
        front = nd.frontier(
            model,
            image,
            region=region,
            channel_axis=-1,
            device=args.device,
            repeats=args.repeats,
            **extra,
        )
        elapsed = time.perf_counter() - start
        picked = front.pick(args.budget)
        plot = args.plots / f"frontier_{name}.png"
        front.plot(plot, picked=picked)
        layers = ", ".join(front.layers)
        print(
            f"## {name} on a {size}x{size} region ({front.search} search over layers {layers}; "
            f"device {front.device}; {elapsed:.0f} s in all)\n"
        )
        print(front.to_markdown())
        print(
            f"\nBudget {args.budget:.0%} of pixels changing class -> {picked.label}: "
            f"{picked.seconds:.3f} s vs advanced {front.advanced.seconds:.3f} s "
            f"({front.speedup(picked):.2f}x faster), class change {picked.class_change:.2%}, "
            f"exact pixels {picked.density:.1%}; plot {plot}\n"
        )
        print("| class-change budget | picked | time (s) | speedup over advanced | class change |")
        print("|---:|---|---:|---:|---:|")
        for budget in BUDGETS:
            row = front.pick(budget)
            print(
                f"| {budget:.1%} | {row.label} | {row.seconds:.3f} | "
                f"{front.speedup(row):.2f}x | {row.class_change:.2%} |"
            )
        print()
        results[name] = {
            "frontier": [asdict(row) for row in front.rows],
            "picked": asdict(picked),
            "speedup": front.speedup(picked),
            "device": front.device,
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_frontier.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
