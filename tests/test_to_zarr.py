"""predict_to_zarr: OME-Zarr output, provenance, refusal to overwrite, resume after a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from ngff_check import assert_valid_ngff, every_store_is_valid_ngff  # noqa: F401

import napari_dense as nd
from napari_dense.io.physical import PhysicalSpace
from napari_dense.io.store import ProbabilityStore, StoreExistsError, StoreLockedError
from napari_dense.run.fingerprint import ResumeMismatchError
from napari_dense.run.to_zarr import iter_into_store, predict_to_zarr, prepare_run, remaining_tasks

#: Every store a test here writes is validated as strict NGFF 0.5 afterwards (tests/ngff_check.py).
pytestmark = pytest.mark.usefixtures("every_store_is_valid_ngff")


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


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_the_device_returns_the_stored_dtype_with_identical_bytes(tmp_path, model, image, dtype):
    softmax = torch.nn.Sequential(model, torch.nn.Softmax(dim=1))
    options: dict[str, Any] = {"patch_size": 15, "tile": 16, "device": "cpu", "dtype": dtype}
    predictor, store = prepare_run(image, softmax, tmp_path / "device.zarr", **options,
                                   pyramid_levels=1)  # fmt: skip
    assert predictor.output_dtype == dtype
    for _ in iter_into_store(predictor, store, remaining_tasks(predictor, store)):
        pass
    store.finalize()
    # The same run with float32 tiles converted on the host, as before.
    host, reference = prepare_run(image, softmax, tmp_path / "host.zarr", **options,
                                  pyramid_levels=1)  # fmt: skip
    host.output_dtype = "float32"
    for _ in iter_into_store(host, reference, remaining_tasks(host, reference)):
        pass
    reference.finalize()
    for level in (0, 1):
        got, want = store.level(level)[...], reference.level(level)[...]
        assert got.dtype == want.dtype == np.dtype(dtype) and got.tobytes() == want.tobytes()
    with pytest.raises(nd.InputError, match="dtype must be one of float32, float16, uint8"):
        prepare_run(image, softmax, tmp_path / "bad.zarr", patch_size=15, dtype="int16")


#: The child run of the crash matrix: 16 tiles, a pyramid level; it stops (sleeps) at ``point``
#: ("start": before its first tile, "middle": after 6 tiles, "finalize": in finalize, the lock held)
#: and prints "at point" so that the test can signal it there.
CHILD = """
import sys, time, torch
from napari_dense.evaluate.models import fdfe15
from napari_dense.io.store import ProbabilityStore
from napari_dense.run.to_zarr import predict_to_zarr
weights, image, out, point = sys.argv[1:]
model = fdfe15(num_classes=2).eval()
model.load_state_dict(torch.load(weights))
def stop(here):
    if here == point:
        print("at point", flush=True)
        time.sleep(60)
calls = []
def check(shape):
    calls.append(shape)
    if len(calls) == 1:
        stop("start")
def on_tile(result):
    if result.index == 5:
        stop("middle")
finalize = ProbabilityStore._finalize
def slow_finalize(self, *args):
    stop("finalize")
    finalize(self, *args)
ProbabilityStore._finalize = slow_finalize
predict_to_zarr(image, model, out, patch_size=15, tile=16, device="cpu", pyramid_levels=1,
                on_tile=on_tile, memory_check=check)
"""
#: Tiles the image of this module makes with ``tile=16``.
TILES = 16


@pytest.fixture(scope="module")
def crash_inputs(tmp_path_factory, model, image) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Weights and image files for the child, and the uninterrupted map (levels 0 and 1)."""
    folder = tmp_path_factory.mktemp("crash")
    torch.save(model.state_dict(), folder / "weights.pt")
    np.save(folder / "image.npy", image)
    reference = predict_to_zarr(folder / "image.npy", model, folder / "reference.zarr",
                                patch_size=15, tile=16, device="cpu", pyramid_levels=1)  # fmt: skip
    return folder / "weights.pt", folder / "image.npy", reference.read(0), reference.read(1)


@pytest.mark.parametrize("point", ["start", "middle", "finalize"])
@pytest.mark.parametrize(
    "signum", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name
)
def test_a_run_stopped_by_a_signal_resumes_to_identical_bytes(
    tmp_path, model, crash_inputs, point, signum
) -> None:
    weights, image_file, level0, level1 = crash_inputs
    out = tmp_path / "map.zarr"
    settings: dict[str, Any] = {"patch_size": 15, "tile": 16, "device": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(weights), str(image_file), str(out), point],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "at point\n"
        # A second writer is refused while the child runs, with the child named.
        with pytest.raises(StoreLockedError, match=f"PID {process.pid} on "):
            prepare_run(image_file, model, out, resume=True, **settings)
        os.kill(process.pid, signum)
        process.wait(timeout=60)
    finally:
        process.kill()
    if point == "start" and signum == signal.SIGINT:
        assert not out.exists()  # interrupted before any tile: nothing left behind
    else:
        partial = ProbabilityStore.open(out)
        done = partial.completed_tiles()
        assert not partial.is_complete()
        assert len(done) == {"start": 0, "middle": 6, "finalize": TILES}[point]
        with pytest.raises(StoreExistsError):
            predict_to_zarr(image_file, model, out, **settings)
        with pytest.raises(ResumeMismatchError, match="border 'reflect' → 'edge'"):
            predict_to_zarr(image_file, model, out, resume=True, **settings, border="edge")
    # The lock of the dead (or interrupted) child is recovered; only missing tiles are computed.
    resumed: list[tuple[int, int, int, int]] = []
    store = predict_to_zarr(image_file, model, out, resume=True, pyramid_levels=1,
                            on_tile=lambda r: resumed.append(r.tile.box), **settings)  # fmt: skip
    expected = {"start": TILES, "middle": TILES - 6, "finalize": 0}[point]
    assert store.is_complete() and len(resumed) == expected
    np.testing.assert_array_equal(store.read(0), level0)
    np.testing.assert_array_equal(store.read(1), level1)


def test_resume_with_another_tile_size_is_refused(tmp_path, model, image) -> None:
    out = tmp_path / "map.zarr"
    predict_to_zarr(image, model, out, patch_size=15, tile=16)
    with pytest.raises(nd.InputError, match=r"tile size \[16, 16\] → \[32, 32\]"):
        predict_to_zarr(image, model, out, patch_size=15, tile=32, resume=True)


def test_z_stack_output_axes(tmp_path, model) -> None:
    stack = np.random.default_rng(1).random((3, 20, 24), dtype=np.float32)
    store = predict_to_zarr(stack, model, tmp_path / "z.zarr", patch_size=15, tile=16)
    assert store.axes == "czyx" and store.array.shape == (2, 3, 20, 24)
    np.testing.assert_allclose(store.read()[:, 1], nd.predict(stack[1], model, 15), atol=1e-5)


def test_distributed_equals_single_process(tmp_path, model, image) -> None:
    pytest.importorskip("distributed")
    local = predict_to_zarr(
        image, model, tmp_path / "local.zarr", patch_size=15, tile=16, pyramid_levels=1
    )
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
        pyramid_levels=1,
    )
    assert time.perf_counter() - start < 300
    assert cluster.is_complete() and sorted(ticks) == list(range(16))
    np.testing.assert_array_equal(cluster.read(), local.read())
    # Workers write level 0 only; the run holding the lock adds their footprints to level 1.
    assert cluster.pyramid_pending() == set()
    np.testing.assert_array_equal(cluster.read(1), local.read(1))
    assert Path(tmp_path / "cluster.zarr").exists()


def _ome_zarr_input(path: Path, data: np.ndarray) -> Path:
    """A (1, Y, X) OME-Zarr 0.5 image at 0.25 µm, translated by (10, 20) µm (ome-zarr-models)."""
    from ome_zarr_models.v05.axes import Axis
    from ome_zarr_models.v05.image import Image
    from pydantic_zarr.v3 import ArraySpec

    axes = [Axis(name="c", type="channel")] + [
        Axis(name=name, type="space", unit="micrometer") for name in "yx"
    ]
    image = Image.new(
        array_specs=[ArraySpec.from_array(data, dimension_names=("c", "y", "x"))],
        paths=["0"], axes=axes, scales=[[1, 0.25, 0.25]], translations=[[0, 10, 20]], name="in",
    )  # fmt: skip
    image.to_zarr(zarr.storage.LocalStore(path), path="")["0"][:] = data
    return path


def test_the_map_sits_where_its_ome_zarr_input_sits(tmp_path, model, image) -> None:
    """0.25 µm + translation in, levels at 0.25 / 0.5 / 1 µm out; napari reopens both alike."""
    napari_ome_zarr = pytest.importorskip("napari_ome_zarr")
    source = _ome_zarr_input(tmp_path / "in.zarr", image[None])
    store = predict_to_zarr(str(source), model, tmp_path / "map.zarr", patch_size=15, tile=16,
                            device="cpu", pyramid_levels=2)  # fmt: skip
    multiscale = assert_valid_ngff(store.path).attributes.ome.multiscales[0]
    assert [a.unit for a in multiscale.axes] == [None, "micrometer", "micrometer"]
    transforms = [d.coordinateTransformations for d in multiscale.datasets]
    assert [list(t[0].scale) for t in transforms] == [[1, 0.25, 0.25], [1, 0.5, 0.5], [1, 1, 1]]
    assert [list(t[1].translation) for t in transforms] == [
        [0, 10, 20], [0, 10.125, 20.125], [0, 10.375, 20.375],
    ]  # fmt: skip
    assert store.attributes["space"]["scale"] == [0.25, 0.25]
    np.testing.assert_allclose(store.read(), nd.predict(image, model, 15), atol=1e-5)
    (_, given, _), *_ = napari_ome_zarr.napari_get_reader(str(source))(str(source))
    (_, mapped, _), *_ = napari_ome_zarr.napari_get_reader(str(store.path))(str(store.path))
    for key in ("scale", "translate", "units"):
        assert mapped.get(key) == given.get(key), key
    assert list(mapped["scale"]) == [0.25, 0.25]


def test_an_in_memory_array_takes_the_space_it_is_given(tmp_path, model, image) -> None:
    """The GUI passes a napari layer's scale/translate/units for its array; a bare array: pixels."""
    layer = {"scale": (0.5, 0.5), "translate": (3.0, 4.0), "units": ("µm", "µm")}
    store = predict_to_zarr(image, model, tmp_path / "a.zarr", patch_size=15, tile=32,
                            device="cpu", space=layer, pyramid_levels=1)  # fmt: skip
    expected = PhysicalSpace(scale=(0.5, 0.5), translation=(3.0, 4.0), units=("micrometer",) * 2)
    assert store.space == expected and store.level_space(1) == expected.downsampled(2)
    bare = predict_to_zarr(image, model, tmp_path / "b.zarr", patch_size=15, tile=32)
    assert bare.space == PhysicalSpace() and bare.attributes["space"]["scale"] == [1.0, 1.0]
    with pytest.raises(nd.InputError, match="pixel size must be two positive numbers"):
        predict_to_zarr(image, model, tmp_path / "c.zarr", patch_size=15, space={"scale": (0, 1)})
    assert not (tmp_path / "c.zarr").exists()
