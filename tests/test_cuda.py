"""The engine on a CUDA GPU (``pytest -m cuda``; every test here skips without CUDA).

Run by ``benchmarks/device_check.sh``. Tolerances:

- strict float32 (``precision="float32"``, TF32 off): scores within :data:`FP32_ATOL` of the
  per-patch oracle (``reference.patchwise`` on the CPU) and of the CPU engine;
- bfloat16 (autocast): softmax probabilities within :data:`BF16_ATOL` of float32 (bf16 keeps 8
  bits of mantissa; the CPU test of the same bound measured ~1e-2 at most).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import zarr

import napari_dense as nd
from napari_dense.evaluate.models import BENCHMARK_NETS
from napari_dense.evaluate.reference import patchwise
from napari_dense.run.engine import iter_predict, make_predictor
from napari_dense.run.to_zarr import predict_to_zarr

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FP32_ATOL = 1e-4
BF16_ATOL = 5e-2
SAMPLED = 300


def he_model(net: str, seed: int = 0) -> tuple[torch.nn.Module, int, int]:
    """A benchmark net with He-normal weights (default init makes deep nets' output constant),
    its last layer scaled so that its scores have a standard deviation of about 1 (as a trained
    net's), so that absolute tolerances mean the same for every net."""
    factory, patch, channels = BENCHMARK_NETS[net]
    torch.manual_seed(seed)
    model = factory(num_classes=4).eval()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    for module in layers:
        torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        torch.nn.init.zeros_(module.bias)
    with torch.no_grad():
        scale = model(torch.randn(256, channels, patch, patch)).std()
        layers[-1].weight /= scale
    return model, patch, channels


def uint8_image(size: int, channels: int, seed: int = 0) -> np.ndarray:
    shape = (size, size) if channels == 1 else (size, size, channels)
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


NORM = {"scale": 1 / 255, "mean": [0.5], "std": [0.25]}


def assemble(results, shape) -> np.ndarray:
    out = np.full(shape, np.nan, dtype=np.float32)
    for r in results:
        y0, y1, x0, x1 = r.tile.box
        out[:, y0:y1, x0:x1] = r.probabilities
    return out


@pytest.mark.parametrize("net", list(BENCHMARK_NETS))
def test_strict_float32_on_the_gpu_equals_the_oracle(net: str) -> None:
    model, patch, channels = he_model(net)
    image = uint8_image(200, channels)
    options = {"normalisation": NORM, "tile": 96, "precision": "float32"}
    gpu = assemble(iter_predict(image, model, patch, device="cuda", **options), (4, 200, 200))
    positions = np.random.default_rng(1).integers(0, 200, (SAMPLED, 2))
    normalised = (image.astype(np.float32) / 255 - 0.5) / 0.25
    oracle = patchwise(normalised, model, patch, channel_axis=None if channels == 1 else -1,
                       positions=positions)  # fmt: skip
    assert np.abs(gpu[:, positions[:, 0], positions[:, 1]] - oracle).max() <= FP32_ATOL
    cpu = assemble(iter_predict(image, model, patch, device="cpu", **options), (4, 200, 200))
    assert np.abs(gpu - cpu).max() <= FP32_ATOL
    assert np.abs(cpu).max() > 100 * FP32_ATOL  # the scores are not all ~0


def test_precision_auto_is_bfloat16_and_within_its_tolerance() -> None:
    model, patch, channels = he_model("32x32")
    image = uint8_image(160, channels)
    options = {"normalisation": NORM, "activation": "softmax", "tile": 80}
    auto = make_predictor(image, model, patch, device="cuda", precision="auto", **options)
    assert auto.precision == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    reduced = assemble(auto.run(auto.tasks()), (4, 160, 160))
    exact = assemble(
        iter_predict(image, model, patch, device="cuda", precision="float32", **options),
        (4, 160, 160),
    )
    deviation = np.abs(reduced - exact).max()
    assert deviation <= BF16_ATOL
    assert auto.first_call_seconds is not None and auto.first_call_seconds > 0


def test_double_buffered_run_equals_tile_by_tile_compute() -> None:
    model, patch, channels = he_model("15x15")
    image = uint8_image(300, channels)
    predictor = make_predictor(image, model, patch, device="cuda", precision="float32",
                               normalisation=NORM, tile=64)  # fmt: skip
    piped = list(predictor.run(predictor.tasks()))
    assert len(piped) == 25 and [r.index for r in piped] == list(range(25))
    for result in piped:
        window = predictor.read(result.leading, result.tile)
        assert window.dtype == np.uint8  # travels as stored
        alone = predictor.compute(window, result.tile)
        np.testing.assert_allclose(result.probabilities, alone, rtol=0, atol=1e-6)
    assert all(r.peak_device_bytes > 0 and r.compute_seconds > 0 for r in piped)


def test_output_dtype_comes_back_from_the_device() -> None:
    model, patch, channels = he_model("15x15")
    image = uint8_image(128, channels)
    options = {"normalisation": NORM, "activation": "softmax", "tile": 64, "device": "cuda"}
    exact = assemble(iter_predict(image, model, patch, precision="float32", **options),
                     (4, 128, 128))  # fmt: skip
    for dtype, tolerance in (("float16", 1e-3), ("uint8", 0.5 / 255 + 1e-4)):
        predictor = make_predictor(image, model, patch, precision="float32",
                                   output_dtype=dtype, **options)  # fmt: skip
        results = list(predictor.run(predictor.tasks()))
        assert {r.probabilities.dtype for r in results} == {np.dtype(dtype)}
        got = assemble(results, (4, 128, 128))
        if dtype == "uint8":
            got = got / 255
        assert np.abs(got - exact).max() <= tolerance


def _reserved_now() -> int:
    """CUDA memory this process holds, its cache emptied."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved()


def test_a_real_out_of_memory_splits_the_tile_with_the_same_result(caplog) -> None:
    model, patch, channels = he_model("64x64")
    image = uint8_image(1024, channels)
    options = {"normalisation": NORM, "precision": "float32", "device": "cuda"}
    whole = make_predictor(image, model, patch, tile=1024, **options)
    torch.cuda.reset_peak_memory_stats()
    base = _reserved_now()
    expected = assemble(whole.run(whole.tasks()), (4, 1024, 1024))
    need = torch.cuda.max_memory_allocated() - base
    small = make_predictor(image, model, patch, tile=256, **options)
    torch.cuda.reset_peak_memory_stats()
    base = _reserved_now()
    list(small.run(small.tasks()))
    need_small = torch.cuda.max_memory_allocated() - base
    assert need_small < need / 3
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        # Room for a 256-px part, not for the whole 1024-px tile.
        budget = _reserved_now() + (need_small + need // 3)
        torch.cuda.set_per_process_memory_fraction(budget / total)
        predictor = make_predictor(image, model, patch, tile=1024, **options)
        with caplog.at_level(logging.WARNING, logger="napari_dense.run.engine"):
            results = list(predictor.run(predictor.tasks()))
        assert predictor._split_side is not None and predictor._split_side < 1024
        assert sum("out of memory" in r.message for r in caplog.records) == 1
        got = assemble(results, (4, 1024, 1024))
        assert np.abs(got - expected).max() <= FP32_ATOL
        # Even the smallest part cannot fit: one clear error naming the fixes.
        hopeless = make_predictor(image, model, patch, tile=1024, **options)  # weights moved
        torch.cuda.set_per_process_memory_fraction((_reserved_now() + 2**20) / total)
        with pytest.raises(nd.NapariDenseError, match="out of memory even for the smallest"):
            list(hopeless.run(hopeless.tasks()))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def test_the_engine_writes_a_store_on_the_gpu(tmp_path) -> None:
    model, patch, _ = he_model("15x15")
    source = zarr.create_array(tmp_path / "image.zarr", shape=(300, 280), chunks=(128, 128),
                               dtype="uint8")  # fmt: skip
    source[:] = uint8_image(300, 1)[:, :280]
    settings = {"patch_size": patch, "normalisation": NORM, "activation": "softmax",
                "tile": 128, "precision": "float32"}  # fmt: skip
    gpu = predict_to_zarr(tmp_path / "image.zarr", model, tmp_path / "gpu.zarr",
                          device="cuda", **settings)  # fmt: skip
    cpu = predict_to_zarr(tmp_path / "image.zarr", model, tmp_path / "cpu.zarr",
                          device="cpu", **settings)  # fmt: skip
    assert gpu.is_complete() and gpu.attributes["device"].startswith("cuda")
    assert np.abs(gpu.read() - cpu.read()).max() <= FP32_ATOL


def test_a_compiled_network_compiles_once_per_process() -> None:
    model, patch, channels = he_model("15x15")
    image = uint8_image(128, channels)
    options = {"normalisation": NORM, "activation": "softmax", "tile": 64, "device": "cuda"}
    first = make_predictor(image, model, patch, compile="default", **options)
    compiled = assemble(first.run(first.tasks()), (4, 128, 128))
    second = make_predictor(image, model, patch, compile="default", **options)  # a new conversion
    again = assemble(second.run(second.tasks()), (4, 128, 128))
    assert first.first_call_seconds > 0 and second.first_call_seconds == 0.0
    np.testing.assert_array_equal(again, compiled)
    eager = assemble(iter_predict(image, model, patch, **options), (4, 128, 128))
    assert np.abs(compiled - eager).max() <= BF16_ATOL
