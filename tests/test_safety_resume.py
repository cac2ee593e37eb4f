"""Resume continues the same run or refuses; one writer at a time; lost tiles are recomputed.

A partial store is made in-process (a run cancelled after a few tiles, as the GUI does); each
resume with something changed must raise ResumeMismatchError naming that difference and leave
every byte of the store as it was. The positive control resumes with the same settings and gets
the bytes of an uninterrupted run.
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

from napari_dense.evaluate.models import fdfe15
from napari_dense.io.store import MARKER_DIR, ProbabilityStore, StoreLockedError
from napari_dense.io.store._lock import OWNER_FILE
from napari_dense.run.fingerprint import FINGERPRINT_KEY, ResumeMismatchError, differences
from napari_dense.run.to_zarr import iter_into_store, predict_to_zarr, prepare_run, remaining_tasks

SETTINGS: dict[str, Any] = {"patch_size": 15, "tile": 16, "device": "cpu"}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).random((40, 36), dtype=np.float32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model, image) -> np.ndarray:
    """The map of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "map.zarr"
    return predict_to_zarr(image, model, out, **SETTINGS).read()


def tree(path: Path) -> dict[str, str]:
    found = {}
    for root, _, files in os.walk(path):
        for name in files:
            file = Path(root, name)
            found[os.path.relpath(file, path)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def partial(out: Path, image: Any, model: torch.nn.Module, tiles: int = 3, **options: Any):
    """A run cancelled after ``tiles`` tiles (the generator closed, as Cancel does)."""
    predictor, store = prepare_run(image, model, out, **{**SETTINGS, **options})
    run = iter_into_store(predictor, store, predictor.tasks())
    for _ in range(tiles):
        next(run)
    run.close()
    return store


def other_model() -> torch.nn.Module:
    torch.manual_seed(4)
    return fdfe15(num_classes=2).eval()


CHANGES: dict[str, tuple[dict[str, Any], str]] = {
    "another model": ({"model": "other"}, "network_sha256"),
    "another mode": ({"mode": "simple"}, "sampling"),
    "another border": ({"border": "constant"}, "border"),
    "another image of the same shape": ({"image": "other"}, "image.content_sha256"),
    "another dtype": ({"dtype": "uint8"}, "dtype"),
    "another tile": ({"tile": 32}, "tile"),
    "another precision": ({"precision": "bfloat16"}, "precision"),
    "another activation": ({"activation": "softmax"}, "activation"),
    "another normalisation": ({"normalisation": {"scale": 2.0}}, "normalisation"),
    "another interpolation": ({"interpolation": "nearest"}, "interpolation"),
}


@pytest.mark.parametrize("change", CHANGES, ids=list(CHANGES))
def test_resume_with_anything_changed_is_refused(tmp_path, model, image, change) -> None:
    out = tmp_path / "map.zarr"
    partial(out, image, model)
    before = tree(out)
    options, key = CHANGES[change]
    options = dict(options)
    resumed_model = other_model() if options.pop("model", None) else model
    resumed_image = image[::-1].copy() if options.pop("image", None) else image
    with pytest.raises(ResumeMismatchError) as caught:
        predict_to_zarr(resumed_image, resumed_model, out, resume=True, **{**SETTINGS, **options})
    message = str(caught.value)
    keys = [difference.key for difference in caught.value.differences]
    assert key in keys and set(keys) <= {key, "network_sha256"}  # another mode: another network
    assert caught.value.differences[0].label in message and "\n" not in message
    assert "was started by another run" in message and "--overwrite" in message
    assert tree(out) == before  # not a byte changed, the lock not even taken
    assert not ProbabilityStore.open(out).is_complete()


def test_several_differences_are_listed_in_one_line(tmp_path, model, image) -> None:
    out = tmp_path / "map.zarr"
    partial(out, image, model)
    with pytest.raises(ResumeMismatchError) as caught:
        predict_to_zarr(image, other_model(), out, resume=True, **SETTINGS, border="edge")
    message = str(caught.value)
    assert {d.key for d in caught.value.differences} == {"network_sha256", "border"}
    assert "model (network and weights)" in message and "border 'reflect' → 'edge'" in message


def test_resume_with_the_same_run_gives_the_uninterrupted_bytes(tmp_path, model, image, reference):
    out = tmp_path / "map.zarr"
    done = partial(out, image, model).completed_tiles()
    seen: list[tuple[int, ...]] = []
    store = predict_to_zarr(
        image, model, out, resume=True, on_tile=lambda r: seen.append(r.tile.box), **SETTINGS
    )
    assert store.is_complete() and len(seen) == 9 - 3
    assert not {box for _, box in done} & set(seen)
    np.testing.assert_array_equal(store.read(), reference)


def test_resume_without_a_tile_size_keeps_the_runs_tiles(tmp_path, model, image, reference):
    out = tmp_path / "map.zarr"
    partial(out, image, model)
    # The automatic size would differ (it depends on free memory); the store's is used.
    store = predict_to_zarr(image, model, out, resume=True, patch_size=15, device="cpu",
                            memory_budget=2**20)  # fmt: skip
    assert store.is_complete() and store.tile_shape == (16, 16)
    np.testing.assert_array_equal(store.read(), reference)


def test_an_image_file_changed_on_disk_is_noticed(tmp_path, model, image) -> None:
    path = tmp_path / "img.npy"
    np.save(path, image)
    out = tmp_path / "map.zarr"
    partial(out, path, model)
    edited = image.copy()
    edited[20, 20] += 0.5  # one pixel
    np.save(path, edited)
    with pytest.raises(ResumeMismatchError) as caught:
        predict_to_zarr(path, model, out, resume=True, **SETTINGS)
    keys = {d.key for d in caught.value.differences}
    assert {"image.files", "image.content_sha256"} <= keys


def test_the_same_pixels_from_another_file_are_another_image(tmp_path, model, image) -> None:
    np.save(tmp_path / "a.npy", image)
    np.save(tmp_path / "b.npy", image)
    out = tmp_path / "map.zarr"
    partial(out, tmp_path / "a.npy", model)
    with pytest.raises(ResumeMismatchError, match="image path"):
        predict_to_zarr(tmp_path / "b.npy", model, out, resume=True, **SETTINGS)


def test_a_store_without_fingerprint_is_not_resumed(tmp_path, model, image) -> None:
    out = tmp_path / "map.zarr"
    partial(out, image, model)
    group = zarr.open_group(str(out), mode="r+")
    provenance = dict(group.attrs["napari_dense"])
    del provenance[FINGERPRINT_KEY]
    group.attrs["napari_dense"] = provenance  # as an older napari-dense wrote it
    with pytest.raises(ResumeMismatchError, match="has no run fingerprint"):
        predict_to_zarr(image, model, out, resume=True, **SETTINGS)


def test_the_fingerprint_is_stored_and_compares_equal_to_itself(tmp_path, model, image) -> None:
    store = partial(tmp_path / "map.zarr", image, model)
    stored = store.attributes[FINGERPRINT_KEY]
    assert stored["border"] == "reflect" and stored["tile"] == [16, 16]
    assert stored["image"]["shape"] == [40, 36] and len(stored["network_sha256"]) == 64
    assert differences(stored, stored) == []


# ---------------------------------------------------------------------- lost tiles


def test_recorded_tiles_with_missing_or_broken_chunks_are_recomputed(
    tmp_path, model, image, reference
) -> None:
    out = tmp_path / "map.zarr"
    store = partial(out, image, model, tiles=4)
    done = sorted(store.completed_tiles())
    (_, lost), (_, broken) = done[0], done[1]
    tile = store.tile_shape

    def chunk_file(box: tuple[int, ...]) -> Path:
        return out / "0" / "c" / "0" / str(box[0] // tile[0]) / str(box[2] // tile[1])

    chunk_file(lost).unlink()
    chunk_file(broken).write_bytes(b"\x00garbage")
    predictor, resumed = prepare_run(image, model, out, resume=True, **SETTINGS)
    todo = {t.box for _, t in remaining_tasks(predictor, resumed)}
    assert lost in todo and broken in todo and len(todo) == 9 - 2
    list(iter_into_store(predictor, resumed, remaining_tasks(predictor, resumed)))
    resumed.finalize()
    np.testing.assert_array_equal(ProbabilityStore.open(out).read(), reference)


def test_an_all_zero_tile_is_a_chunk_on_disk(tmp_path) -> None:
    """Chunks are written even when they equal the fill value: a missing one means lost data."""
    store = ProbabilityStore.create(tmp_path / "z.zarr", shape=(2, 16, 32), axes="cyx",
                                    chunks=(16, 16), class_names=["a", "b"])  # fmt: skip
    store.write_tile((), (0, 16, 0, 16), np.zeros((2, 16, 16), np.float32))
    reopened = ProbabilityStore.open(tmp_path / "z.zarr")
    reopened.write_tile((), (0, 16, 16, 32), np.zeros((2, 16, 16), np.float32))
    assert sorted(p.name for p in (tmp_path / "z.zarr" / "0" / "c" / "0" / "0").iterdir()) == [
        "0",
        "1",
    ]
    assert reopened.forget_unreadable_tiles() == []


# ---------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_naming_the_owner(tmp_path, model, image) -> None:
    out = tmp_path / "map.zarr"
    predictor, first = prepare_run(image, model, out, **SETTINGS)
    run = iter_into_store(predictor, first, predictor.tasks())
    next(run)
    with pytest.raises(StoreLockedError) as caught:
        prepare_run(image, model, out, resume=True, **SETTINGS)
    message = str(caught.value)
    assert f"PID {os.getpid()} (this process)" in message and "started 20" in message
    assert caught.value.owner["pid"] == os.getpid() and "\n" not in message
    # Readers are never blocked.
    assert len(ProbabilityStore.open(out).completed_tiles()) == 1
    run.close()  # Cancel: the lock is released, so the run can be resumed at once
    assert not first.holds_lock
    _, second = prepare_run(image, model, out, resume=True, **SETTINGS)
    assert second.holds_lock
    with pytest.raises(StoreLockedError):
        first.acquire_lock()  # the cancelled run's object cannot take it back meanwhile


def test_a_forgotten_store_object_releases_its_lock(tmp_path, model, image) -> None:
    import gc

    out = tmp_path / "map.zarr"
    partial(out, image, model)
    _, store = prepare_run(image, model, out, resume=True, **SETTINGS)
    del store
    gc.collect()
    _, again = prepare_run(image, model, out, resume=True, **SETTINGS)
    assert again.holds_lock


def test_finalize_releases_the_lock(tmp_path, model, image) -> None:
    store = predict_to_zarr(image, model, tmp_path / "map.zarr", **SETTINGS)
    assert not store.holds_lock and store.is_complete()
    assert (tmp_path / "map.zarr" / MARKER_DIR).is_dir()
    # A finished map keeps no PID or host name.
    assert not (tmp_path / "map.zarr" / OWNER_FILE).exists() and store.lock_owner() == {}


def test_the_cli_lists_the_differences_in_one_line(tmp_path, image, capsys) -> None:
    from napari_dense.cli import main

    np.save(tmp_path / "img.npy", image)
    common = ["predict", "15x15", str(tmp_path / "img.npy"), "-o", str(tmp_path / "m.zarr")]
    assert main([*common, "--tile", "16", "--device", "cpu", "--quiet"]) == 0
    before = tree(tmp_path / "m.zarr")
    capsys.readouterr()
    argv = [*common, "--tile", "32", "--border", "constant", "--resume", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tile size [16, 16] → [32, 32]" in err
    assert "border 'reflect' → 'constant'" in err and "--overwrite" in err
    assert tree(tmp_path / "m.zarr") == before


def test_a_cli_resume_keeps_the_maps_pyramid_unless_told(tmp_path, image, capsys) -> None:
    """--pyramid defaults to None: a resumed map keeps its levels (0 would delete them)."""
    from napari_dense.cli import main

    np.save(tmp_path / "img.npy", image)
    out = tmp_path / "m.zarr"
    common = ["predict", "15x15", str(tmp_path / "img.npy"), "-o", str(out), "--tile", "16"]
    assert main([*common, "--device", "cpu", "--quiet", "--pyramid", "1"]) == 0
    level1 = ProbabilityStore.open(out).read(1)
    assert main([*common, "--device", "cpu", "--quiet", "--resume"]) == 0
    store = ProbabilityStore.open(out)
    assert store.pyramid_levels == 1 and store.is_complete()
    np.testing.assert_array_equal(store.read(1), level1)
    assert main([*common, "--quiet", "--resume", "--pyramid", "auto"]) == 0  # 40x36: no levels
    assert ProbabilityStore.open(out).pyramid_levels == 0 and not (out / "1").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        main([*common, "--pyramid", "-1"])
    assert caught.value.code == 2
    assert "expected 0 or more levels, or auto, got '-1'" in capsys.readouterr().err
