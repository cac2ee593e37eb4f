"""Constant memory: peak RSS of a whole zarr -> OME-Zarr run does not grow with image size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import zarr

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from napari_dense.run._memory import peak_rss, reset_peak_rss
    from napari_dense.evaluate.models import fdfe15
    from napari_dense.run.to_zarr import predict_to_zarr
    torch.manual_seed(0)
    model = fdfe15(num_classes=2).eval()
    reset_peak_rss()  # a child process starts with its parent's peak
    predict_to_zarr(sys.argv[1], model, sys.argv[2], patch_size=15, mode="simple", tile=512,
                    dtype="uint8", device="cpu")
    print(json.dumps({"peak_mib": peak_rss() / 2**20}))
""")


def _zarr_image(path, size: int) -> None:
    array = zarr.create_array(path, shape=(size, size), chunks=(1024, 1024), dtype="uint8")
    rng = np.random.default_rng(0)
    for y in range(0, size, 1024):
        array[y : y + 1024] = rng.integers(0, 255, (min(1024, size - y), size), np.uint8)


def _peak_mib(tmp_path, size: int) -> float:
    image = tmp_path / f"image_{size}.zarr"
    _zarr_image(image, size)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(image), str(tmp_path / f"map_{size}.zarr")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def test_peak_memory_is_flat_from_2k_to_8k(tmp_path) -> None:
    small, large = _peak_mib(tmp_path, 2048), _peak_mib(tmp_path, 8192)
    print(f"\npeak RSS: 2048² {small:.0f} MiB, 8192² {large:.0f} MiB")
    # 16x the pixels; the 8k image alone would be 64 MiB as uint8 and its map 512 MiB as float32.
    assert large < small + 64, (small, large)
