"""Bad input, one policy everywhere: NaN/inf, tile sizes, damaged chunks, value ranges, CLI lines.

Each test builds its bad input itself and asserts the exact outcome: the error class or exit
status, a message fragment that names the fix, and that no output is marked complete.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import napari_dense as nd
from napari_dense.cli import main
from napari_dense.evaluate.compare import compare_modes
from napari_dense.evaluate.models import fdfe15
from napari_dense.io.input_checks import NonFiniteError, ValueRangeWarning, check_value_range
from napari_dense.io.store import ProbabilityStore
from napari_dense.run.engine import MIN_TILE, iter_predict
from napari_dense.run.to_zarr import predict_to_zarr


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return fdfe15(num_classes=3).eval()


def _nan_image() -> np.ndarray:
    image = np.random.default_rng(0).random((40, 40), dtype=np.float32)
    image[20, 7] = np.nan
    image[3, 30] = np.inf
    return image


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "napari_dense.cli", *args], capture_output=True, text=True
    )


def _one_line(result: subprocess.CompletedProcess[str], *fragments: str, status: int = 2) -> None:
    assert result.returncode == status, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("napari-dense: error: ")
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# -- NaN / inf: refused by default everywhere, read as 0 on request ----------------------------


def test_predict_refuses_nan_naming_the_option(model) -> None:
    with pytest.raises(NonFiniteError, match=r"2 NaN/infinite .*non_finite='zero'"):
        nd.predict(_nan_image(), model, 15)


def test_zero_policy_equals_replacing_them_first(model) -> None:
    image = _nan_image()
    replaced = nd.predict(image, model, 15, non_finite="zero")
    expected = nd.predict(np.nan_to_num(image, nan=0, posinf=0, neginf=0), model, 15)
    np.testing.assert_array_equal(replaced, expected)
    assert np.isnan(image[20, 7])  # the caller's array is left as it was


def test_engine_refuses_the_tile_that_holds_nan(model) -> None:
    with pytest.raises(NonFiniteError, match=r"tile \(0, 16, 0, 16\).*non_finite='zero'"):
        list(iter_predict(_nan_image(), model, 15, tile=16, device="cpu"))


def test_engine_zero_policy_equals_predict(model) -> None:
    image = _nan_image()
    results = list(iter_predict(image, model, 15, tile=16, non_finite="zero", device="cpu"))
    out = np.zeros((3, 40, 40), np.float32)
    for r in results:
        y0, y1, x0, x1 = r.tile.box
        out[:, y0:y1, x0:x1] = r.probabilities
    expected = nd.predict(image, model, 15, non_finite="zero")
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_a_nan_map_is_never_marked_complete(model, tmp_path) -> None:
    out = tmp_path / "map.zarr"
    with pytest.raises(NonFiniteError):
        predict_to_zarr(_nan_image(), model, out, patch_size=15, tile=16, device="cpu")
    assert not out.exists() or not ProbabilityStore.open(out).is_complete()
    store = predict_to_zarr(
        _nan_image(), model, tmp_path / "zero.zarr", patch_size=15, tile=16, non_finite="zero"
    )
    assert store.is_complete() and store.attributes["non_finite"] == "zero"
    assert np.isfinite(store.read()).all()


def test_compare_and_frontier_share_the_policy(model) -> None:
    with pytest.raises(NonFiniteError, match="non_finite='zero'"):
        compare_modes(_nan_image(), model, 15, oracle_pixels=5)
    with pytest.raises(NonFiniteError, match="non_finite='zero'"):
        nd.frontier(model, _nan_image(), 15, repeats=1)
    with pytest.raises(nd.InputError, match="non_finite must be one of"):
        nd.predict(_nan_image(), model, 15, non_finite="ignore")


def test_cli_predict_and_compare_refuse_nan_and_name_the_flag(tmp_path) -> None:
    image = tmp_path / "nan.npy"
    np.save(image, _nan_image())
    out = tmp_path / "map.zarr"
    _one_line(
        _cli("predict", "15x15", str(image), "-o", str(out), "--quiet"),
        "NaN/infinite",
        "--non-finite zero",
    )
    assert not out.exists() or not ProbabilityStore.open(out).is_complete()
    _one_line(_cli("compare", "15x15", str(image)), "--non-finite zero")
    done = _cli(
        "predict", "15x15", str(image), "-o", str(tmp_path / "z.zarr"), "--quiet",
        "--non-finite", "zero",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert ProbabilityStore.open(tmp_path / "z.zarr").is_complete()


# -- tile sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize("tile", [-5, 0, 1, MIN_TILE - 1, (32, 8)])
def test_tiles_below_the_minimum_are_refused(model, tile) -> None:
    with pytest.raises(nd.InputError, match=f"at least {MIN_TILE} px"):
        list(iter_predict(np.zeros((40, 40), np.float32), model, 15, tile=tile))


def test_cli_tile_minus_5_is_one_line(tmp_path) -> None:
    image = tmp_path / "grey.npy"
    np.save(image, np.zeros((40, 40), np.float32))
    out = tmp_path / "m.zarr"
    _one_line(_cli("predict", "15x15", str(image), "-o", str(out), "--tile", "-5"), "at least 16")
    assert not out.exists() or not ProbabilityStore.open(out).is_complete()


# -- damaged input chunks ------------------------------------------------------------------------


def _damaged_zarr(path: Path) -> Path:
    array = zarr.create_array(str(path), shape=(64, 64), chunks=(32, 32), dtype="float32")
    array[:] = np.random.default_rng(1).random((64, 64), dtype=np.float32)
    chunk = path / "c" / "1" / "1"
    assert chunk.is_file()
    chunk.write_bytes(b"\x00garbage, not a compressed chunk" * 3)
    return path


def test_a_damaged_chunk_is_named_and_the_store_stays_incomplete(model, tmp_path) -> None:
    source = _damaged_zarr(tmp_path / "image.zarr")
    out = tmp_path / "map.zarr"
    with pytest.raises(nd.InputError) as caught:
        predict_to_zarr(str(source), model, out, patch_size=15, tile=32, device="cpu")
    message = str(caught.value)
    assert "\n" not in message
    assert "the chunk at rows 32:64, columns 32:64" in message and str(source) in message
    assert "--resume" in message
    if out.exists():
        store = ProbabilityStore.open(out)
        assert not store.is_complete() and len(store.completed_tiles()) < 4


def test_cli_damaged_chunk_is_one_line(tmp_path) -> None:
    source = _damaged_zarr(tmp_path / "image.zarr")
    result = _cli("predict", "15x15", str(source), "-o", str(tmp_path / "m.zarr"), "--quiet")
    _one_line(result, "cannot read the chunk at rows 32:64, columns 32:64")


# -- value range vs normalisation ------------------------------------------------------------------


def test_uint16_into_a_1_over_255_model_warns_once_naming_both(model) -> None:
    norm = {"scale": 1 / 255, "mean": [0.5], "std": [0.25]}
    image = np.zeros((40, 40), np.uint16)
    with pytest.warns(ValueRangeWarning, match=r"uint16 .*65535.*scale 0\.00392157.*255") as rec:
        list(iter_predict(image, model, 15, tile=32, normalisation=norm, device="cpu"))
    assert len([w for w in rec if w.category is ValueRangeWarning]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", ValueRangeWarning)
        list(iter_predict(image.astype(np.uint8), model, 15, tile=32, normalisation=norm))
    assert check_value_range("uint8", {"scale": 1 / 65535}) is True
    assert check_value_range("float32", norm) is False
    assert check_value_range("uint16", None) is False


# -- CLI errors stay one line ---------------------------------------------------------------


def test_scheduler_local_0_is_refused_before_anything_is_created(tmp_path) -> None:
    image = tmp_path / "grey.npy"
    np.save(image, np.zeros((40, 40), np.float32))
    out = tmp_path / "m.zarr"
    for bad in ("local:0", "local:x", "nowhere"):
        result = _cli("predict", "15x15", str(image), "-o", str(out), "--scheduler", bad)
        _one_line(result, "--scheduler")
        assert not out.exists()


def test_empty_or_outside_region_names_the_rule(tmp_path) -> None:
    image = tmp_path / "grey.npy"
    np.save(image, np.zeros((40, 40), np.float32))
    for region in ("5:5,0:10", "0:10,30:50", "10:0,0:10"):
        _one_line(_cli("compare", "15x15", str(image), "--region", region), "0 <= y0 < y1")


def test_frontier_plot_into_a_missing_folder_fails_before_measuring(tmp_path, capsys) -> None:
    image = tmp_path / "grey.npy"
    np.save(image, np.zeros((40, 40), np.float32))
    plot = tmp_path / "missing" / "f.png"
    assert main(["frontier", "15x15", str(image), "--plot", str(plot), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "does not exist; create it first" in err and err.count("\n") == 1


def test_warnings_are_one_line_without_traceback(tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "scaled.pt2"
    nd.save_classifier(fdfe15(num_classes=2).eval(), path, metadata=nd.ModelMetadata(
        patch_size=(15, 15), in_channels=1,
        normalisation={"scale": 1 / 255, "mean": [0.5], "std": [0.25]},
    ))  # fmt: skip
    image = tmp_path / "u16.npy"
    np.save(image, np.zeros((40, 40), np.uint16))
    result = _cli("predict", str(path), str(image), "-o", str(tmp_path / "m.zarr"), "--quiet")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("napari-dense: warning: "), lines
    assert "uint16" in lines[0] and "warnings.warn" not in result.stderr
