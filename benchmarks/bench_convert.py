"""Conversion time: torch.fx vs torch.export as the graph front end, with and without self-check.

For the demo models (``napari_dense/demo/models``) and the benchmark networks
(``napari_dense.evaluate.models.BENCHMARK_NETS``, random weights, seed 0), measures the wall
time of ``densify`` (``sampling="all"``, CPU):

- **fx**: ``densify(module)``: the module is traced with torch.fx (the default front end);
- **export**: ``torch.export.export(module.eval(), (example,))`` then ``densify(program)``: the
  graph taken with torch.export, as ``densify`` does itself when fx cannot trace a model;
- **.pt2** (demo models only): ``densify`` of the shipped program as ``load_classifier``
  returns it (already exported: what a user of a model file pays).

each with the self-check (``verify=True``, the default) and without (``verify=False``); the
demo modules are the training script's classes with the shipped programs' weights. Every time
is the median of ``--repeats`` calls after one warm-up, in one process (the first call of
each front end in the process, which pays for lazy initialisation, is printed above the
table). The self-check's share is ``certify`` alone (timed the same way, on the same
conversion) over the conversion without it; "on/off" is the ratio of the two medians; the
last columns are what the check compared and its two forward passes timed alone (the dense
network on the random images, the model on the patches). Prints a markdown table.

Run ``python benchmarks/bench_convert.py`` (``--repeats``, ``--threads``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

import napari_dense as nd
from napari_dense.convert.acquire import ExportedModule
from napari_dense.convert.costs import _build, _plan_with_costs
from napari_dense.convert.dense import DenseClassifier
from napari_dense.convert.patchnet import _trace
from napari_dense.convert.verify import certify
from napari_dense.demo.run import find_demo_model
from napari_dense.demo.train import IhcPatchNet, IhcSelecSLS
from napari_dense.evaluate.models import BENCHMARK_NETS

DEMO = {"ihc_patchnet": IhcPatchNet, "ihc_selecsls": IhcSelecSLS}


def nets() -> list[tuple[str, nn.Module, int, int, Any]]:
    """``(name, module, patch, channels, program or None)`` for every net measured."""
    found: list[tuple[str, nn.Module, int, int, Any]] = []
    for name, cls in DEMO.items():
        loaded = nd.load_classifier(find_demo_model(f"{name}.pt2"))
        module = cls()
        program: Any = loaded.module  # an ExportedModule
        module.load_state_dict(program.exported_program.state_dict)
        patch, channels = loaded.patch_size[0], int(loaded.metadata.in_channels or 3)
        found.append((name, module.eval(), patch, channels, program))
    for name, (factory, patch, channels) in BENCHMARK_NETS.items():
        torch.manual_seed(0)
        found.append((f"{factory.__name__} ({name})", factory().eval(), patch, channels, None))
    return found


def median_ms(call: Callable[[], Any] | None, repeats: int) -> float:
    if call is None:
        return 0.0
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def certify_ms(model: Any, patch: int, repeats: int) -> tuple[float, float, float, str]:
    """The self-check alone on one conversion of ``model``, and its two forward passes alone:
    the dense network on the random images, ``model`` on the patches compared."""
    traced = _trace(model, patch, None)
    network, plan, builder = _build(traced, "all")
    dense = DenseClassifier(network, _plan_with_costs(traced, plan))
    check = median_ms(partial(certify, model, traced, dense, builder), repeats)
    verified = certify(model, traced, dense, builder)
    images = torch.randn(verified.batch, traced.in_channels, *verified.input_size)
    patches = torch.randn(verified.positions, traced.in_channels, patch, patch)
    with torch.no_grad():
        dense_ms = median_ms(partial(dense, images), repeats)
        runner = ExportedModule(model) if isinstance(model, ExportedProgram) else model
        model_ms = median_ms(partial(runner, patches), repeats)
    size = verified.input_size
    where = f"{verified.positions} positions, {verified.batch}×{size[0]}×{size[1]}"
    return check, dense_ms, model_ms, where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # ihc_selecsls is padded: densify warns it is not exact
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# densify(sampling='all') time, CPU ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of "
        f"{args.repeats}; load average {os.getloadavg()[0]:.1f} at the start\n"
    )
    found = nets()
    name, module, patch, channels, _ = found[0]
    start = time.perf_counter()
    nd.densify(module, patch, verify=False)
    cold_fx = time.perf_counter() - start
    start = time.perf_counter()
    torch.export.export(module, (torch.zeros(2, channels, patch, patch),))
    cold_export = time.perf_counter() - start
    print(
        f"First call in this process ({name}): densify via fx {1e3 * cold_fx:.0f} ms, "
        f"torch.export.export {1e3 * cold_export:.0f} ms.\n"
    )
    print(
        "| net | front end | export call ms | densify ms, verify=False | densify ms, verify=True "
        "| on/off | self-check alone ms | self-check share | checked | dense fwd ms "
        "| model fwd ms |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|---|--:|--:|")
    for name, module, patch, channels, shipped in found:
        example = torch.zeros(2, channels, patch, patch)
        exported = torch.export.export(module, (example,))
        rows: list[tuple[str, Any, Callable[[], Any] | None]] = [
            ("fx", module, None),
            ("export", exported, partial(torch.export.export, module, (example,))),
        ]
        if shipped is not None:
            rows.append((".pt2", shipped, None))
        for front, model, export in rows:
            export_ms = median_ms(export, max(3, args.repeats // 2))
            off = median_ms(partial(nd.densify, model, patch, verify=False), args.repeats)
            on = median_ms(partial(nd.densify, model, patch, verify=True), args.repeats)
            alone, dense_ms, model_ms, where = certify_ms(model, patch, args.repeats)
            total_off = export_ms + off
            print(
                f"| {name} | {front} | {export_ms:.0f} | {total_off:.1f} | "
                f"{export_ms + on:.1f} | {(export_ms + on) / total_off:.2f} | {alone:.2f} | "
                f"{100 * alone / total_off:.1f} % | {where} | {dense_ms:.2f} | {model_ms:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
