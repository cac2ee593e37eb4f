"""Outputs: overwrite deletes only a map this project wrote; nothing is left when nothing ran.

Every refusal is checked for its exception class, a one-line message naming what is there and
what to do, and the bytes on disk unchanged. The positive control (our own store is replaced)
shows the refusals are not a blanket "never overwrite".
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

import napari_dense as nd
from napari_dense.cli import main
from napari_dense.io.store import (
    OverwriteRefusedError,
    ProbabilityStore,
    StoreExistsError,
    StoreLockedError,
)
from napari_dense.run.to_zarr import iter_into_store, predict_to_zarr, prepare_run

CHOOSE = "choose another output path"


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).random((40, 36), dtype=np.float32)


def tree(path: Path) -> dict[str, str]:
    """Every file and folder under ``path`` (itself included) with the SHA-256 of its bytes."""
    if path.is_file() or path.is_symlink():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    found = {".": "dir"}
    for root, folders, files in os.walk(path):
        for name in folders:
            found[os.path.relpath(os.path.join(root, name), path)] = "dir"
        for name in files:
            file = Path(root, name)
            found[os.path.relpath(file, path)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def run(image: Any, model: torch.nn.Module, out: Path, **options: Any) -> ProbabilityStore:
    return predict_to_zarr(image, model, out, patch_size=15, tile=16, device="cpu", **options)


def refused(error: pytest.ExceptionInfo[BaseException], *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.fixture
def input_zarr(tmp_path: Path, image: np.ndarray) -> Path:
    path = tmp_path / "img.zarr"
    array = zarr.create_array(str(path), shape=image.shape, chunks=(16, 16), dtype="float32")
    array[...] = image
    return path


# ---------------------------------------------------------------------- the input is never deleted


@pytest.mark.parametrize("overwrite", [True, False])
def test_output_onto_the_input_is_refused_and_the_input_kept(input_zarr, model, overwrite) -> None:
    before = tree(input_zarr)
    with pytest.raises(OverwriteRefusedError) as caught:
        run(input_zarr, model, input_zarr, overwrite=overwrite)
    refused(caught, f"{input_zarr} is the input image", "never deletes its input", CHOOSE)
    assert tree(input_zarr) == before


def test_a_folder_containing_the_input_is_never_deleted(tmp_path, image, model) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    np.save(folder / "img.npy", image)
    before = tree(folder)
    with pytest.raises(OverwriteRefusedError) as caught:
        run(folder / "img.npy", model, folder, overwrite=True)
    refused(caught, f"{folder} contains the input {folder / 'img.npy'}", CHOOSE)
    assert tree(folder) == before


def test_the_input_reached_through_a_symbolic_link_is_recognised(input_zarr, model) -> None:
    link = input_zarr.parent / "link.zarr"
    link.symlink_to(input_zarr, target_is_directory=True)
    before = tree(input_zarr)
    with pytest.raises(OverwriteRefusedError) as caught:  # the input named through the link
        run(link, model, input_zarr, overwrite=True)
    refused(caught, "is the input image")
    with pytest.raises(OverwriteRefusedError) as caught:  # the output is a link
        run(input_zarr, model, link, overwrite=True)
    refused(caught, f"{link} is a symbolic link", "does not follow links", CHOOSE)
    assert tree(input_zarr) == before and link.is_symlink()


def test_an_opened_zarr_array_is_protected_as_well(input_zarr, model) -> None:
    before = tree(input_zarr)
    with pytest.raises(OverwriteRefusedError, match="is the input image"):
        run(zarr.open_array(str(input_zarr), mode="r"), model, input_zarr, overwrite=True)
    assert tree(input_zarr) == before


def test_the_gui_protects_a_layer_source_it_passes_as_an_array(input_zarr, image, model) -> None:
    before = tree(input_zarr)
    with pytest.raises(OverwriteRefusedError, match="is the input image"):
        run(image, model, input_zarr, overwrite=True, protect=[input_zarr])
    assert tree(input_zarr) == before


def test_the_cli_refuses_in_one_line_and_keeps_the_input(input_zarr, capsys) -> None:
    before = tree(input_zarr)
    argv = ["predict", "15x15", str(input_zarr), "-o", str(input_zarr), "--overwrite"]
    assert main([*argv, "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the input image" in err and CHOOSE in err
    assert tree(input_zarr) == before


# ---------------------------------------------------------------------- what is not ours


def test_a_regular_file_is_never_deleted(tmp_path, image, model) -> None:
    out = tmp_path / "results.zarr"
    out.write_bytes(b"a week of measurements")
    for overwrite in (True, False):
        with pytest.raises(OverwriteRefusedError) as caught:
            run(image, model, out, overwrite=overwrite)
        refused(caught, f"{out} is a file", "not deleted", CHOOSE)
    assert out.read_bytes() == b"a week of measurements"


def test_another_zarr_is_never_deleted(tmp_path, image, model) -> None:
    out = tmp_path / "other.zarr"
    other = zarr.create_group(str(out), attributes={"ome": {"version": "0.5"}})
    other.create_array("0", shape=(4, 4), dtype="uint8")[...] = 7
    before = tree(out)
    with pytest.raises(OverwriteRefusedError) as caught:
        run(image, model, out, overwrite=True)
    refused(caught, "napari-dense did not write", "'napari_dense' attribute", CHOOSE)
    assert tree(out) == before


def test_a_folder_that_is_no_zarr_is_never_deleted(tmp_path, image, model) -> None:
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("...")
    with pytest.raises(OverwriteRefusedError) as caught:
        run(image, model, out, overwrite=True)
    refused(caught, "is not a Zarr store", CHOOSE)
    assert tree(out) == {".": "dir", "chapter1.tex": hashlib.sha256(b"...").hexdigest()}


def test_our_store_holding_foreign_files_is_not_deleted(tmp_path, image, model) -> None:
    out = tmp_path / "map.zarr"
    run(image, model, out)
    (out / "notes.txt").write_text("annotations made by hand")
    before = tree(out)
    with pytest.raises(OverwriteRefusedError) as caught:
        run(image, model, out, overwrite=True)
    refused(caught, "files napari-dense did not write (notes.txt)", "move them out")
    assert tree(out) == before


def test_our_own_store_is_replaced(tmp_path, image, model) -> None:
    """Positive control: the refusals above are specific, not a blanket refusal."""
    out = tmp_path / "map.zarr"
    run(image, model, out, pyramid_levels=1)
    with pytest.raises(StoreExistsError) as caught:
        run(image, model, out)
    refused(caught, "exists; pass overwrite=True (CLI: --overwrite) or resume=True")
    store = run(image[::-1].copy(), model, out, overwrite=True)
    assert store.is_complete() and store.pyramid_levels == 0 and not (out / "1").exists()
    np.testing.assert_allclose(store.read(), nd.predict(image[::-1].copy(), model, 15), atol=1e-5)


def test_a_store_another_run_writes_is_not_replaced(tmp_path, image, model) -> None:
    out = tmp_path / "map.zarr"
    _, writing = prepare_run(image, model, out, patch_size=15, tile=16, device="cpu")
    assert writing.holds_lock
    before = tree(out)
    with pytest.raises(StoreLockedError) as caught:
        run(image, model, out, overwrite=True)
    refused(caught, "is being written by another run", f"PID {os.getpid()}", "wait for it")
    assert tree(out) == before
    writing.release_lock()
    assert run(image, model, out, overwrite=True).is_complete()


# ---------------------------------------------------------------------- nothing left behind


class Stop(Exception):
    pass


def failing_at_first_tile(_: tuple[int, int]) -> None:
    raise Stop("the device fell over")


@pytest.mark.parametrize("error", [Stop, KeyboardInterrupt])
def test_a_run_failing_before_its_first_tile_leaves_no_store(tmp_path, image, model, error) -> None:
    def check(_: tuple[int, int]) -> None:
        raise error()

    out = tmp_path / "map.zarr"
    with pytest.raises(error):
        run(image, model, out, memory_check=check)
    assert not out.exists()


def test_the_gui_path_also_leaves_no_store_when_nothing_was_computed(tmp_path, image, model):
    out = tmp_path / "map.zarr"
    predictor, store = prepare_run(
        image, model, out, patch_size=15, tile=16, device="cpu", memory_check=failing_at_first_tile
    )
    with pytest.raises(Stop):
        list(iter_into_store(predictor, store, predictor.tasks()))
    assert not out.exists() and not store.holds_lock


def test_a_store_with_tiles_is_kept_when_the_run_fails(tmp_path, image, model) -> None:
    calls: list[int] = []

    def fail_third(_: tuple[int, int]) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise Stop("later")

    out = tmp_path / "map.zarr"
    with pytest.raises(Stop):
        run(image, model, out, memory_check=fail_third)
    store = ProbabilityStore.open(out)
    assert len(store.completed_tiles()) == 2 and not store.is_complete()


def test_a_failing_resume_never_deletes_the_earlier_tiles(tmp_path, image, model) -> None:
    out = tmp_path / "map.zarr"
    predictor, store = prepare_run(image, model, out, patch_size=15, tile=16, device="cpu")
    tiles = iter_into_store(predictor, store, predictor.tasks())
    next(tiles)
    tiles.close()  # cancelled after one tile
    with pytest.raises(Stop):
        run(image, model, out, resume=True, memory_check=failing_at_first_tile)
    assert len(ProbabilityStore.open(out).completed_tiles()) == 1


# ---------------------------------------------------------------------- resume onto odd paths


def test_resume_onto_a_regular_file_says_so(tmp_path, image, model) -> None:
    out = tmp_path / "map.zarr"
    out.write_text("x")
    with pytest.raises(nd.InputError) as caught:
        run(image, model, out, resume=True)
    refused(caught, f"{out} is a file, not the folder of an interrupted run", CHOOSE)
    assert "Errno" not in str(caught.value) and out.read_text() == "x"


def test_resume_onto_the_input_is_refused(input_zarr, model) -> None:
    before = tree(input_zarr)
    with pytest.raises(nd.InputError) as caught:
        run(input_zarr, model, input_zarr, resume=True)
    refused(caught, "is the input image", "another output path")
    assert tree(input_zarr) == before


def test_resume_without_an_earlier_run_starts_one(tmp_path, image, model) -> None:
    store = run(image, model, tmp_path / "new.zarr", resume=True)
    assert store.is_complete()
    np.testing.assert_allclose(store.read(), nd.predict(image, model, 15), atol=1e-5)
