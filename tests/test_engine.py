"""The tiled engine equals in-memory prediction for every input kind, tiling and border."""

from __future__ import annotations

import logging

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import napari_dense as nd
from napari_dense.evaluate.models import fdfe15, patchnet32
from napari_dense.io.sources import open_image
from napari_dense.run.engine import iter_predict

TILED_ATOL = 1e-5


def assemble(results, shape: tuple[int, ...]) -> np.ndarray:
    """Paste tile results into one (leading..., K, H, W) array."""
    out = np.full(shape, np.nan, dtype=np.float32)
    for result in results:
        y0, y1, x0, x1 = result.tile.box
        out[(*result.leading, slice(None), slice(y0, y1), slice(x0, x1))] = result.probabilities
    return out


@pytest.fixture(scope="module")
def grey_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return fdfe15(num_classes=3).eval()


@pytest.fixture(scope="module")
def rgb_model() -> torch.nn.Module:
    torch.manual_seed(2)
    return patchnet32(num_classes=2).eval()


@settings(max_examples=25, deadline=None)
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    tile=st.integers(16, 64),
    mode=st.sampled_from(["advanced", "simple", "custom", "checkered", "strided+checkered"]),
    border=st.sampled_from(["reflect", "edge", "constant"]),
    chunk=st.integers(5, 40),
)
def test_tiled_equals_untiled(height, width, tile, mode, border, chunk) -> None:
    torch.manual_seed(1)
    model = fdfe15(num_classes=3).eval()
    # "strided+checkered": the sample pattern sits on a grid of stride 2 (grid and pattern).
    custom = {"custom": {"5": "all"}, "strided+checkered": {"2": "none", "5": "checkered"}}
    sampling = custom.get(mode, mode)
    image = np.random.default_rng(height * 71 + width).random((height, width), dtype=np.float32)
    expected = nd.predict(image, model, 15, mode=sampling, border=border)
    lazy = da.from_array(image, chunks=chunk)
    results = list(
        iter_predict(lazy, model, 15, mode=sampling, border=border, tile=tile, device="cpu")
    )
    out = assemble(results, (3, height, width))
    np.testing.assert_allclose(out, expected, atol=TILED_ATOL, rtol=0)


def test_z_stack_channel_first_and_last(rgb_model: torch.nn.Module) -> None:
    rng = np.random.default_rng(0)
    stack = rng.random((2, 3, 40, 37), dtype=np.float32)  # (Z, C, Y, X)
    expected = np.stack([nd.predict(plane, rgb_model, 32, channel_axis=0) for plane in stack])
    first = assemble(iter_predict(stack, rgb_model, 32, tile=24, device="cpu"), (2, 2, 40, 37))
    np.testing.assert_allclose(first, expected, atol=TILED_ATOL)
    last = np.moveaxis(stack, 1, -1)  # (Z, Y, X, C)
    out = assemble(iter_predict(last, rgb_model, 32, tile=24, device="cpu"), (2, 2, 40, 37))
    np.testing.assert_allclose(out, expected, atol=TILED_ATOL)


def test_grey_time_and_z_axes(grey_model: torch.nn.Module) -> None:
    movie = np.random.default_rng(1).random((2, 3, 20, 21), dtype=np.float32)  # (T, Z, Y, X)
    out = assemble(iter_predict(movie, grey_model, 15, tile=16, device="cpu"), (2, 3, 3, 20, 21))
    np.testing.assert_allclose(out[1, 2], nd.predict(movie[1, 2], grey_model, 15), atol=TILED_ATOL)
    assert not np.isnan(out).any()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_integer_and_float_inputs(grey_model: torch.nn.Module, dtype: type) -> None:
    image = np.random.default_rng(2).integers(0, 250, (33, 29)).astype(dtype)
    out = assemble(iter_predict(image, grey_model, 15, tile=16, device="cpu"), (3, 33, 29))
    np.testing.assert_allclose(
        out, nd.predict(image.astype(np.float32), grey_model, 15), atol=TILED_ATOL
    )


def test_zarr_tiff_npy_and_ome_zarr_paths(tmp_path, grey_model: torch.nn.Module) -> None:
    tifffile = pytest.importorskip("tifffile")
    image = np.random.default_rng(3).random((45, 52), dtype=np.float32)
    expected = nd.predict(image, grey_model, 15)
    zarr_path = tmp_path / "image.zarr"
    zarr.create_array(zarr_path, data=image, chunks=(16, 16))
    tiff_path = tmp_path / "image.tif"
    tifffile.imwrite(tiff_path, image, tile=(16, 16))
    npy_path = tmp_path / "image.npy"
    np.save(npy_path, image)
    ome_path = tmp_path / "image.ome.zarr"
    group = zarr.open_group(ome_path, mode="w")
    names = ("c", "y", "x")  # NGFF 0.5 requires them; the reader validates with ome-zarr-models
    group.create_array("0", data=image[None], chunks=(1, 16, 16), dimension_names=names)
    group.create_array("1", data=image[None, ::2, ::2], chunks=(1, 16, 16), dimension_names=names)
    axes = [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space"},
        {"name": "x", "type": "space"},
    ]
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": axes,
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1]}],
                    },
                    {
                        "path": "1",
                        "coordinateTransformations": [{"type": "scale", "scale": [1, 2, 2]}],
                    },
                ],
            }
        ],
    }
    for path in (zarr_path, tiff_path, npy_path, ome_path, str(zarr_path)):
        out = assemble(iter_predict(path, grey_model, 15, tile=20, device="cpu"), (3, 45, 52))
        np.testing.assert_allclose(out, expected, atol=TILED_ATOL, err_msg=str(path))
    low = assemble(iter_predict(ome_path, grey_model, 15, level=1, device="cpu"), (3, 23, 26))
    np.testing.assert_allclose(low, nd.predict(image[::2, ::2], grey_model, 15), atol=TILED_ATOL)
    with pytest.raises(nd.InputError, match="levels 0-1; level 5"):
        next(iter_predict(ome_path, grey_model, 15, level=5))


def test_out_of_memory_splits_tiles_once_with_same_result(grey_model, caplog) -> None:
    image = np.random.default_rng(4).random((70, 66), dtype=np.float32)
    seen: list[tuple[int, int]] = []

    def small_gpu(window: tuple[int, int]) -> None:
        seen.append(window)
        if window[0] * window[1] > 30 * 30:
            raise torch.OutOfMemoryError("simulated")

    with caplog.at_level(logging.WARNING, logger="napari_dense.run.engine"):
        results = list(
            iter_predict(image, grey_model, 15, tile=48, device="cpu", memory_check=small_gpu)
        )
    out = assemble(results, (3, 70, 66))
    np.testing.assert_allclose(out, nd.predict(image, grey_model, 15), atol=TILED_ATOL)
    assert sum("out of memory" in r.message for r in caplog.records) == 1
    # The first tile tries 62x62 then 38x38 windows; every later one goes straight to 26x26.
    assert [w for w in seen if w[0] * w[1] > 30 * 30] == [(62, 62), (38, 38)]


def test_out_of_memory_at_the_smallest_tile_is_a_clear_error(grey_model) -> None:
    def no_memory(window: tuple[int, int]) -> None:
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(nd.NapariDenseError, match="out of memory even for the smallest tiles"):
        list(iter_predict(np.zeros((40, 40)), grey_model, 15, tile=32, memory_check=no_memory))


def test_closing_the_generator_stops_after_the_current_tile(grey_model) -> None:
    calls: list[tuple[int, int]] = []
    results = iter_predict(
        np.zeros((64, 64)), grey_model, 15, tile=16, device="cpu", memory_check=calls.append
    )
    first = next(results)
    assert (first.index, first.total) == (0, 16)
    next(results)
    results.close()
    assert len(calls) == 2


def test_field_of_view_tiles_come_first(grey_model) -> None:
    results = iter_predict(np.zeros((64, 64)), grey_model, 15, tile=16, centre=(60, 60))
    assert next(results).tile.box == (48, 64, 48, 64)


def test_skip_resumes_only_missing_tiles(grey_model) -> None:
    image = np.random.default_rng(5).random((32, 32), dtype=np.float32)
    skip = [((), (0, 16, 0, 16)), ((), (16, 32, 16, 32))]
    boxes = [r.tile.box for r in iter_predict(image, grey_model, 15, tile=16, skip=skip)]
    assert boxes == [(0, 16, 16, 32), (16, 32, 0, 16)]


def test_normalisation_and_activation(grey_model) -> None:
    image = np.random.default_rng(6).integers(0, 255, (30, 30)).astype(np.uint8)
    norm = {"scale": 1 / 255, "mean": [0.5], "std": [0.25]}
    out = assemble(
        iter_predict(image, grey_model, 15, normalisation=norm, activation="softmax", tile=16),
        (3, 30, 30),
    )
    logits = nd.predict((image / 255 - 0.5) / 0.25, grey_model, 15)
    expected = torch.softmax(torch.from_numpy(logits), dim=0).numpy()
    np.testing.assert_allclose(out, expected, atol=TILED_ATOL)
    np.testing.assert_allclose(out.sum(0), 1, atol=1e-5)
    # Interpolated modes: interpolated scores, then softmax, in predict as in the engine.
    for mode in ("simple", "checkered"):
        options = nd.RunOptions(mode=mode, activation="softmax")
        tiled = assemble(
            iter_predict(image, grey_model, 15, options=options, normalisation=norm, tile=16),
            (3, 30, 30),
        )
        whole = nd.predict((image / 255 - 0.5) / 0.25, grey_model, 15, options=options)
        np.testing.assert_allclose(tiled, whole, atol=TILED_ATOL)
        np.testing.assert_allclose(whole.sum(0), 1, atol=1e-5)
        # predict applies the same normalisation (one implementation) to the raw image.
        raw = nd.predict(image, grey_model, 15, options=options, normalisation=norm)
        np.testing.assert_allclose(raw, whole, atol=1e-6)


def test_bfloat16_stays_close_to_float32(rgb_model) -> None:
    image = np.random.default_rng(7).random((40, 40, 3), dtype=np.float32)
    exact = nd.predict(image, rgb_model, 32)
    reduced = assemble(
        iter_predict(image, rgb_model, 32, precision="bfloat16", tile=40), (2, 40, 40)
    )
    deviation = np.abs(reduced - exact).max()
    assert 0 < deviation < 0.05  # softmax probabilities; measured ~1e-2 at most


def test_bad_engine_arguments(grey_model) -> None:
    with pytest.raises(nd.InputError, match="precision must be one of"):
        next(iter_predict(np.zeros((20, 20)), grey_model, 15, precision="int8"))
    with pytest.raises(nd.InputError, match=r"expects 1 channel.*image .* has 4"):
        open_image(np.zeros((4, 20, 20)), channels=1, channel_axis=0)
    with pytest.raises(nd.InputError, match="no axis of the image"):
        open_image(np.zeros((5, 20, 20)), channels=3)
    with pytest.raises(nd.InputError, match="image file not found"):
        next(iter_predict("/nonexistent/image.tif", grey_model, 15))
    with pytest.raises(nd.InputError, match="activation must be 'softmax', 'sigmoid' or None"):
        next(iter_predict(np.zeros((20, 20)), grey_model, 15, activation="relu"))


def test_compiled_network_gives_the_same_map(grey_model) -> None:
    image = np.random.default_rng(8).random((40, 36), dtype=np.float32)
    compiled = assemble(iter_predict(image, grey_model, 15, tile=24, compile=True), (3, 40, 36))
    np.testing.assert_allclose(compiled, nd.predict(image, grey_model, 15), atol=1e-4)
