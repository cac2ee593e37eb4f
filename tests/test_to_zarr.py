"""predict_to_zarr: OME-Zarr output, provenance, refusal to overwrite, resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import napari_dense as nd
from napari_dense.models import fdfe15
from napari_dense.store import ProbabilityStore, StoreExistsError
from napari_dense.to_zarr import predict_to_zarr


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(3)
    return fdfe15(num_classes=2).eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).random((61, 50), dtype=np.float32)


def test_store_holds_the_prediction_and_provenance(tmp_path, model, image) -> None:
    out = tmp_path / "map.zarr"
    store = predict_to_zarr(
        image,
        model,
        out,
        patch_size=15,
        tile=16,
        device="cpu",
        class_names=["nucleus", "background"],
        pyramid_levels=1,
    )
    np.testing.assert_allclose(store.read(), nd.predict(image, model, 15), atol=1e-5)
    reopened = ProbabilityStore.open(out)
    assert reopened.is_complete()
    attrs = reopened.attributes
    for key in (
        "package_version",
        "patch_size",
        "mode",
        "tile_size",
        "device",
        "precision",
        "source_shape",
        "started",
        "finished",
        "megapixels_per_second",
    ):
        assert key in attrs, key
    assert attrs["tile_size"] == [16, 16] and attrs["mode"] == "advanced"
    assert tuple(reopened.array.chunks) == (2, 16, 16)
    assert reopened.class_names == ["nucleus", "background"]


def test_existing_output_is_never_overwritten_silently(tmp_path, model, image) -> None:
    out = tmp_path / "map.zarr"
    predict_to_zarr(image, model, out, patch_size=15, tile=32, device="cpu")
    with pytest.raises(StoreExistsError, match="overwrite"):
        predict_to_zarr(image, model, out, patch_size=15, tile=32, device="cpu")
    store = predict_to_zarr(image * 0, model, out, patch_size=15, tile=32, overwrite=True)
    np.testing.assert_allclose(store.read(), nd.predict(image * 0, model, 15), atol=1e-5)


def test_uint8_output(tmp_path, model, image) -> None:
    softmax = torch.nn.Sequential(model, torch.nn.Softmax(dim=1))
    store = predict_to_zarr(image, softmax, tmp_path / "u8.zarr", patch_size=15, dtype="uint8")
    assert store.array.dtype == np.uint8
    np.testing.assert_allclose(store.read(), nd.predict(image, softmax, 15), atol=0.5 / 255 + 1e-6)


def test_resume_after_a_run_killed_mid_way_gives_identical_output(tmp_path, model, image) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    np.save(tmp_path / "image.npy", image)
    out = tmp_path / "map.zarr"
    script = textwrap.dedent(f"""
        import time, torch
        from napari_dense.models import fdfe15
        from napari_dense.to_zarr import predict_to_zarr
        model = fdfe15(num_classes=2).eval()
        model.load_state_dict(torch.load({str(weights)!r}))
        def slow(result):
            print("tile", result.index, flush=True)
            time.sleep(0.2)
        predict_to_zarr({str(tmp_path / "image.npy")!r}, model, {str(out)!r}, patch_size=15,
                        tile=16, device="cpu", on_tile=slow)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("tile 5"):
            break
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = ProbabilityStore.open(out)
    done = partial.completed_tiles()
    assert not partial.is_complete() and 5 <= len(done) < 16
    with pytest.raises(StoreExistsError):
        predict_to_zarr(tmp_path / "image.npy", model, out, patch_size=15, tile=16)
    resumed: list[tuple[int, int, int, int]] = []
    store = predict_to_zarr(
        tmp_path / "image.npy",
        model,
        out,
        patch_size=15,
        tile=16,
        resume=True,
        on_tile=lambda r: resumed.append(r.tile.box),
    )
    assert store.is_complete() and len(resumed) == 16 - len(done)
    assert not {box for _, box in done} & set(resumed)
    reference = predict_to_zarr(image, model, tmp_path / "ref.zarr", patch_size=15, tile=16)
    np.testing.assert_array_equal(store.read(), reference.read())


def test_resume_with_another_tile_size_is_refused(tmp_path, model, image) -> None:
    out = tmp_path / "map.zarr"
    predict_to_zarr(image, model, out, patch_size=15, tile=16)
    with pytest.raises(nd.InputError, match="same --tile"):
        predict_to_zarr(image, model, out, patch_size=15, tile=32, resume=True)


def test_z_stack_output_axes(tmp_path, model) -> None:
    stack = np.random.default_rng(1).random((3, 20, 24), dtype=np.float32)
    store = predict_to_zarr(stack, model, tmp_path / "z.zarr", patch_size=15, tile=16)
    assert store.axes == "czyx" and store.array.shape == (2, 3, 20, 24)
    np.testing.assert_allclose(store.read()[:, 1], nd.predict(stack[1], model, 15), atol=1e-5)


def test_distributed_equals_single_process(tmp_path, model, image) -> None:
    pytest.importorskip("distributed")
    local = predict_to_zarr(image, model, tmp_path / "local.zarr", patch_size=15, tile=16)
    start = time.perf_counter()
    ticks: list[int] = []
    cluster = predict_to_zarr(
        image,
        model,
        tmp_path / "cluster.zarr",
        patch_size=15,
        tile=16,
        scheduler="local:2",
        on_tile=lambda r: ticks.append(r.index),
    )
    assert time.perf_counter() - start < 300
    assert cluster.is_complete() and sorted(ticks) == list(range(16))
    np.testing.assert_array_equal(cluster.read(), local.read())
    assert Path(tmp_path / "cluster.zarr").exists()
