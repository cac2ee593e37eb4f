"""How large a tile fits: the automatic tile size from a memory budget."""

from __future__ import annotations

import math

import torch

from napari_dense.convert.dense import DenseClassifier

__all__ = ["auto_tile_size"]


def auto_tile_size(dense: DenseClassifier, device: torch.device, budget_bytes: int | None) -> int:
    """Largest tile side whose estimated peak memory fits the budget.

    The budget defaults to half the free GPU memory, or on CPU a quarter of the available host
    memory capped at 2 GiB (larger tiles bring no speed on CPU). The estimate is the plan's peak
    activation memory per pixel, doubled for convolution workspaces and reduced-precision copies.
    """
    if budget_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget_bytes = free // 2
        else:
            budget_bytes = min(_available_host_bytes() // 4, 2 * 2**30)
    bytes_per_pixel = 2 * dense.plan.bytes_per_megapixel / 1e6
    side = int(math.sqrt(budget_bytes / max(bytes_per_pixel, 1.0)))
    side -= max(dense.patch_size)  # the halo is read and computed too
    largest = 2048 if device.type == "cuda" else 1024
    stride = max(dense.period)
    return max(min(side, largest) // stride * stride, stride, 64 // stride * stride)


def _available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return 8 * 2**30
