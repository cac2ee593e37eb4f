"""ProbabilityStore: OME-Zarr 0.5 output written tile by tile, resumable, safe for many writers."""

from __future__ import annotations

import json
import multiprocessing
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from ngff_check import assert_valid_ngff, every_store_is_valid_ngff  # noqa: F401

from napari_dense.errors import InputError, NapariDenseError
from napari_dense.io.physical import PhysicalSpace
from napari_dense.io.store import (
    MARKER_DIR,
    ProbabilityStore,
    StoreExistsError,
    StoreIncompleteError,
    StoreWriteError,
    auto_pyramid_levels,
)

#: Every store a test here writes is validated as strict NGFF 0.5 afterwards (tests/ngff_check.py).
pytestmark = pytest.mark.usefixtures("every_store_is_valid_ngff")

TILE = (16, 16)
CLASSES = ["nucleus", "membrane", "background"]


def boxes(height: int, width: int, tile: tuple[int, int] = TILE) -> Iterator[tuple[int, ...]]:
    """The chunk grid of a plane, edge tiles cut to the image."""
    for y0 in range(0, height, tile[0]):
        for x0 in range(0, width, tile[1]):
            yield y0, min(y0 + tile[0], height), x0, min(x0 + tile[1], width)


def random_map(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def write_all(store: ProbabilityStore, full: np.ndarray) -> None:
    """Write every tile of ``full`` (in the store's axis order) through write_tile."""
    height, width = store.plane_shape
    for leading in np.ndindex(*store.leading_shape):
        for box in boxes(height, width, store.tile_shape):
            store.write_tile(leading, box, tile_of(store, full, leading, box))


def tile_of(
    store: ProbabilityStore, full: np.ndarray, leading: tuple[int, ...], box: tuple[int, ...]
) -> np.ndarray:
    y0, y1, x0, x1 = box
    index: dict[str, Any] = dict(zip(store.leading_axes, leading, strict=True))
    index.update(c=slice(None), y=slice(y0, y1), x=slice(x0, x1))
    return full[tuple(index[axis] for axis in store.axes)]


def naive_local_mean(level: np.ndarray) -> np.ndarray:
    """2×2 mean over the last two axes, pixel by pixel; edge blocks average what they have."""
    height, width = level.shape[-2:]
    out = np.zeros((*level.shape[:-2], -(-height // 2), -(-width // 2)), dtype=np.float32)
    for i in range(out.shape[-2]):
        for j in range(out.shape[-1]):
            out[..., i, j] = level[..., 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(axis=(-2, -1))
    return out


def make(tmp_path: Path, name: str = "map.zarr", **options: Any) -> ProbabilityStore:
    settings: dict[str, Any] = {
        "shape": (3, 37, 45),
        "axes": "cyx",
        "chunks": TILE,
        "class_names": CLASSES,
    }
    settings.update(options)
    return ProbabilityStore.create(tmp_path / name, **settings)


# ---------------------------------------------------------------------- writing and reading


def test_round_trip_with_edge_tiles_smaller_than_the_chunk(tmp_path) -> None:
    store = make(tmp_path)
    full = random_map((3, 37, 45))
    write_all(store, full)
    assert store.array.dtype == np.float32 and store.dtype == np.float32
    assert tuple(store.array.chunks) == (3, *TILE)
    np.testing.assert_array_equal(store.read(), full)
    assert store.read().dtype == np.float32


def test_unwritten_regions_read_as_zero(tmp_path) -> None:
    store = make(tmp_path)
    tile = random_map((3, 16, 16)) + 0.1
    store.write_tile((), (16, 32, 0, 16), tile)
    expected = np.zeros((3, 37, 45), np.float32)
    expected[:, 16:32, 0:16] = tile
    np.testing.assert_array_equal(store.read(), expected)


def test_uint8_stores_rounded_and_clipped_percent_of_255(tmp_path) -> None:
    store = make(tmp_path, dtype="uint8")
    full = random_map((3, 37, 45))
    full[0, 0, :4] = [-0.2, 1.3, 0.5 / 255, 1.5 / 255]  # clipping, and round half to even
    write_all(store, full)
    assert store.array.dtype == np.uint8
    expected = np.clip(np.round(full * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(store.array[...], expected)
    assert list(store.array[0, 0, :4]) == [0, 255, 0, 2]
    np.testing.assert_allclose(store.read(), np.clip(full, 0, 1), atol=0.5 / 255 + 1e-7)
    np.testing.assert_array_equal(store.read(), expected.astype(np.float32) / 255)


def test_float16_store(tmp_path) -> None:
    store = make(tmp_path, dtype="float16")
    full = random_map((3, 37, 45))
    write_all(store, full)
    assert store.array.dtype == np.float16
    np.testing.assert_array_equal(store.array[...], full.astype(np.float16))
    np.testing.assert_array_equal(store.read(), full.astype(np.float16).astype(np.float32))


def test_tiles_already_in_the_store_dtype_are_written_unchanged(tmp_path) -> None:
    """The device returns uint8 / float16 tiles: stored as they are, not scaled by 255 again."""
    quantised = np.random.default_rng(2).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    store = make(tmp_path, dtype="uint8", pyramid_levels=1)
    store.write_tile((), (0, 16, 0, 16), quantised)
    np.testing.assert_array_equal(store.array[:, :16, :16], quantised)
    halves = random_map((3, 16, 16)).astype(np.float16)
    half = make(tmp_path, name="f16.zarr", dtype="float16")
    half.write_tile((), (0, 16, 0, 16), halves)
    assert half.array[:, :16, :16].tobytes() == halves.tobytes()
    full = make(tmp_path, name="f32.zarr")  # uint8 into a float store: read as round(p * 255)
    full.write_tile((), (0, 16, 0, 16), quantised)
    np.testing.assert_array_equal(full.array[:, :16, :16], quantised / np.float32(255))


def test_stacks_take_leading_indices_in_axis_order(tmp_path) -> None:
    store = make(tmp_path, shape=(2, 3, 4, 20, 24), axes="tczyx")
    assert store.leading_axes == "tz" and store.leading_shape == (2, 4)
    assert tuple(store.array.chunks) == (1, 3, 1, *TILE)
    full = random_map((2, 3, 4, 20, 24))
    write_all(store, full)
    np.testing.assert_array_equal(store.read(), full)
    assert ((1, 3), (16, 20, 16, 24)) in store.completed_tiles()
    assert len(store.completed_tiles()) == 2 * 4 * 4


def test_completed_tiles_lists_exactly_what_was_written(tmp_path) -> None:
    store = make(tmp_path, shape=(3, 2, 37, 45), axes="czyx")
    assert store.completed_tiles() == set()
    written = {((1,), (0, 16, 0, 16)), ((0,), (32, 37, 32, 45)), ((1,), (16, 32, 32, 45))}
    for leading, (y0, y1, x0, x1) in written:
        store.write_tile(leading, (y0, y1, x0, x1), random_map((3, y1 - y0, x1 - x0)))
    assert store.completed_tiles() == written
    # Writing a tile again (a re-run) records it once.
    store.write_tile((1,), (0, 16, 0, 16), random_map((3, 16, 16)))
    assert store.completed_tiles() == written
    assert store.missing_chunks() == 2 * 3 * 3 - 3


def test_a_failed_data_write_leaves_no_marker(tmp_path, monkeypatch) -> None:
    store = make(tmp_path)

    def disk_full(self: Any, selection: Any, value: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(store.array), "__setitem__", disk_full)
    with pytest.raises(StoreWriteError, match="No space left on device") as caught:
        store.write_tile((), (0, 16, 0, 16), random_map((3, 16, 16)))
    assert "--resume" in str(caught.value) and "\n" not in str(caught.value)
    assert store.completed_tiles() == set()
    assert not any(p.name.startswith("y") for p in (tmp_path / "map.zarr" / MARKER_DIR).iterdir())

    def crash(self: Any, selection: Any, value: Any) -> None:
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(type(store.array), "__setitem__", crash)
    with pytest.raises(RuntimeError, match="killed"):
        store.write_tile((), (0, 16, 0, 16), random_map((3, 16, 16)))
    assert store.completed_tiles() == set()


def test_the_marker_is_created_after_the_data_are_on_disk(tmp_path, monkeypatch) -> None:
    store = make(tmp_path)
    tile = random_map((3, 16, 16)) + 0.5
    record = ProbabilityStore._record
    seen: list[np.ndarray] = []

    def record_after_checking(self: ProbabilityStore, leading: Any, box: Any) -> None:
        # What another process would read from disk at the moment the tile is recorded.
        seen.append(ProbabilityStore.open(self.path).read()[:, 16:32, 16:32])
        assert self.completed_tiles() == set()
        record(self, leading, box)

    monkeypatch.setattr(ProbabilityStore, "_record", record_after_checking)
    store.write_tile((), (16, 32, 16, 32), tile)
    np.testing.assert_array_equal(seen[0], tile)
    assert store.completed_tiles() == {((), (16, 32, 16, 32))}


def test_leftover_temporary_marker_files_are_ignored(tmp_path) -> None:
    store = make(tmp_path)
    store.write_tile((), (0, 16, 0, 16), random_map((3, 16, 16)))
    markers = tmp_path / "map.zarr" / MARKER_DIR
    (markers / ".0123abcd.tmp").touch()  # left by a process killed inside _record
    (markers / "notes.txt").touch()
    assert store.completed_tiles() == {((), (0, 16, 0, 16))}


def test_write_tile_rejects_bad_tiles(tmp_path) -> None:
    store = make(tmp_path)
    with pytest.raises(InputError, match="not aligned"):
        store.write_tile((), (8, 24, 0, 16), random_map((3, 16, 16)))
    with pytest.raises(InputError, match="not aligned"):
        store.write_tile((), (0, 10, 0, 16), random_map((3, 10, 16)))  # short, not at the edge
    with pytest.raises(InputError, match="shape"):
        store.write_tile((), (0, 16, 0, 16), random_map((2, 16, 16)))
    with pytest.raises(InputError, match="leading index"):
        store.write_tile((0,), (0, 16, 0, 16), random_map((3, 16, 16)))
    # Several whole chunks at once are aligned too.
    store.write_tile((), (0, 32, 16, 45), random_map((3, 32, 29)))
    assert store.completed_tiles() == {((), (0, 32, 16, 45))}
    assert store.missing_chunks() == 9 - 4


# ---------------------------------------------------------------------- resume and overwrite


def test_reopen_and_continue(tmp_path) -> None:
    first = make(tmp_path, shape=(3, 2, 37, 45), axes="czyx", dtype="uint8", scale=(2, 0.5, 0.5))
    full = random_map((3, 2, 37, 45))
    tasks = [(lead, box) for lead in [(0,), (1,)] for box in boxes(37, 45)]
    for leading, box in tasks[:7]:
        first.write_tile(leading, box, tile_of(first, full, leading, box))
    del first  # as if the process had died

    store = ProbabilityStore.open(tmp_path / "map.zarr")
    assert store.axes == "czyx" and store.class_names == CLASSES
    assert store.dtype == np.uint8 and store.scale == (2.0, 0.5, 0.5)
    assert store.tile_shape == TILE and store.array.shape == (3, 2, 37, 45)
    assert store.completed_tiles() == set(tasks[:7]) and not store.is_complete()
    for leading, box in tasks:
        if (leading, box) not in store.completed_tiles():
            store.write_tile(leading, box, tile_of(store, full, leading, box))
    store.finalize()
    expected = np.clip(np.round(full * 255), 0, 255) / np.float32(255)
    np.testing.assert_array_equal(ProbabilityStore.open(tmp_path / "map.zarr").read(), expected)


def test_existing_path_is_refused_with_the_fix_in_the_message(tmp_path) -> None:
    make(tmp_path)
    with pytest.raises(StoreExistsError) as caught:
        make(tmp_path)
    message = str(caught.value)
    assert message == (
        f"{tmp_path / 'map.zarr'} exists; pass overwrite=True (CLI: --overwrite) or resume=True "
        "(--resume)"
    )
    assert isinstance(caught.value, FileExistsError) and isinstance(caught.value, NapariDenseError)


def test_overwrite_replaces_the_store(tmp_path) -> None:
    old = make(tmp_path)
    write_all(old, random_map((3, 37, 45)))
    old.finalize(pyramid_levels=1)
    store = make(tmp_path, shape=(2, 20, 20), class_names=["a", "b"], overwrite=True)
    assert store.array.shape == (2, 20, 20) and store.class_names == ["a", "b"]
    assert store.completed_tiles() == set() and not store.is_complete()
    assert not (tmp_path / "map.zarr" / "1").exists()
    np.testing.assert_array_equal(store.read(), 0)


def test_overwrite_never_deletes_a_directory_that_is_not_a_zarr_store(tmp_path) -> None:
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "thesis.tex").write_text("...")
    with pytest.raises(StoreExistsError, match="not a Zarr store"):
        make(tmp_path, name="results", overwrite=True)
    assert (precious / "thesis.tex").read_text() == "..."
    # An empty directory may be replaced; a file never is.
    (tmp_path / "empty.zarr").mkdir()
    make(tmp_path, name="empty.zarr", overwrite=True)
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(StoreExistsError, match="is a file"):
        make(tmp_path, name="file.zarr", overwrite=True)
    assert (tmp_path / "file.zarr").read_text() == "x"


def test_an_unwritable_path_gives_a_one_line_error(tmp_path) -> None:
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("x")
    with pytest.raises(StoreWriteError) as caught:
        ProbabilityStore.create(blocker / "map.zarr", shape=(1, 8, 8), axes="cyx", chunks=(8, 8),
                                class_names=["a"])  # fmt: skip
    message = str(caught.value)
    assert str(blocker / "map.zarr") in message and "writable" in message and "\n" not in message
    assert isinstance(caught.value, OSError)


@pytest.mark.parametrize("kind", ["missing", "plain", "foreign", "zarr_v2", "array"])
def test_open_refuses_what_is_not_a_probability_map(tmp_path, kind) -> None:
    path = tmp_path / "other.zarr"
    if kind == "plain":
        path.mkdir()
        (path / "data.txt").write_text("x")
    elif kind == "foreign":
        zarr.create_group(str(path), zarr_format=3, attributes={"ome": {"version": "0.5"}})
    elif kind == "zarr_v2":
        zarr.create_group(str(path), zarr_format=2)
    elif kind == "array":
        zarr.create_array(str(path), shape=(4,), dtype="float32")
    with pytest.raises(InputError) as caught:
        ProbabilityStore.open(path)
    expected = "does not exist" if kind == "missing" else "not a napari-dense probability map"
    assert expected in str(caught.value) and str(path) in str(caught.value)


def test_create_checks_its_arguments(tmp_path) -> None:
    with pytest.raises(InputError, match="class names"):
        make(tmp_path, class_names=["a", "b"])
    with pytest.raises(InputError, match="axes"):
        make(tmp_path, axes="yxc")
    with pytest.raises(InputError, match="shape"):
        make(tmp_path, shape=(3, 37))
    with pytest.raises(InputError, match="dtype"):
        make(tmp_path, dtype="int16")
    with pytest.raises(InputError, match="scale"):
        make(tmp_path, scale=(1.0,))
    with pytest.raises(InputError, match="JSON"):
        make(tmp_path, attributes={"model": object()})
    assert not (tmp_path / "map.zarr").exists()


# ---------------------------------------------------------------------- finalize and metadata


def test_finalize_builds_a_local_mean_pyramid(tmp_path) -> None:
    store = make(tmp_path, shape=(3, 2, 37, 45), axes="czyx", scale=(3.0, 0.5, 0.25))
    full = random_map((3, 2, 37, 45))
    write_all(store, full)
    store.finalize(pyramid_levels=2)
    level1, level2 = naive_local_mean(full), naive_local_mean(naive_local_mean(full))
    assert store.level(1).shape == (3, 2, 19, 23) and store.level(2).shape == (3, 2, 10, 12)
    np.testing.assert_allclose(store.read(1), level1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(store.read(2), level2, rtol=1e-6, atol=1e-7)
    datasets = store._group.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in datasets]
    assert scales == [[1, 3, 0.5, 0.25], [1, 3, 1.0, 0.5], [1, 3, 2.0, 1.0]]
    translations = [d["coordinateTransformations"][1]["translation"] for d in datasets[1:]]
    assert translations == [[0, 0, 0.25, 0.125], [0, 0, 0.75, 0.375]]
    assert "translation" not in json.dumps(datasets[0])


def end_built(tmp_path: Path, full: np.ndarray, levels: int, **options: Any) -> ProbabilityStore:
    """The same map with its pyramid built at the end by finalize (the reference)."""
    store = make(tmp_path, name="end_built.zarr", **options)
    write_all(store, full)
    store.finalize(pyramid_levels=levels)
    return store


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("chunks", [(16, 16), (7, 9)], ids=["aligned", "straddling"])
def test_a_live_pyramid_equals_one_built_at_the_end(tmp_path, dtype, chunks) -> None:
    shape = (3, 2, 37, 45)
    options: dict[str, Any] = {"shape": shape, "axes": "czyx", "chunks": chunks, "dtype": dtype}
    live = make(tmp_path, pyramid_levels=2, **options)
    assert live.pyramid_levels == 2 and live.level(2).shape == (3, 2, 10, 12)
    full = random_map(shape)
    tasks = [((z,), box) for z in range(2) for box in boxes(37, 45, chunks)]
    order = np.random.default_rng(5).permutation(len(tasks))  # tiles land in any order
    for index in order:
        leading, box = tasks[index]
        live.write_tile(leading, box, tile_of(live, full, leading, box))
    assert live.pyramid_pending() == set()
    reference = end_built(tmp_path, full, 2, **options)
    for level in (1, 2):  # bit-identical before finalize: a viewer sees the final pyramid
        np.testing.assert_array_equal(live.level(level)[...], reference.level(level)[...])
    live.finalize()
    assert live.is_complete() and live.pyramid_levels == 2
    np.testing.assert_array_equal(live.level(2)[...], reference.level(2)[...])


def test_each_tile_updates_only_its_footprint(tmp_path) -> None:
    store = make(tmp_path, pyramid_levels=2)
    tile = random_map((3, 16, 16))
    store.write_tile((), (16, 32, 16, 32), tile)
    level1 = np.zeros((3, 19, 23), np.float32)
    level1[:, 8:16, 8:16] = naive_local_mean(tile)
    np.testing.assert_allclose(store.read(1), level1, rtol=1e-6, atol=1e-7)
    level2 = np.zeros((3, 10, 12), np.float32)
    level2[:, 4:8, 4:8] = naive_local_mean(naive_local_mean(tile))
    np.testing.assert_allclose(store.read(2), level2, rtol=1e-6, atol=1e-7)


def test_finalize_does_not_rebuild_a_filled_pyramid(tmp_path, monkeypatch) -> None:
    store = make(tmp_path, pyramid_levels=2)
    write_all(store, random_map((3, 37, 45)))
    calls: list[str] = []
    monkeypatch.setattr(ProbabilityStore, "_build_level", lambda *a: calls.append("build"))
    monkeypatch.setattr(ProbabilityStore, "_update_footprint", lambda *a: calls.append("tile"))
    store.finalize(pyramid_levels=2)
    assert calls == [] and store.is_complete()


def test_tiles_of_other_writers_are_added_to_the_pyramid_by_the_lock_holder(tmp_path) -> None:
    owner = make(tmp_path, pyramid_levels=1)
    full = random_map((3, 37, 45))
    worker = ProbabilityStore.open(owner.path)  # a dask worker: no lock, level 0 only
    assert not worker.holds_lock
    write_all(worker, full)
    assert len(owner.pyramid_pending()) == 9
    np.testing.assert_array_equal(owner.read(1), 0)
    owner.update_pyramid((), (0, 16, 0, 16))
    assert len(owner.pyramid_pending()) == 8
    owner.finalize()
    assert owner.pyramid_pending() == set()
    reference = end_built(tmp_path, full, 1)
    np.testing.assert_array_equal(owner.level(1)[...], reference.level(1)[...])


def test_finalize_adds_and_removes_levels_around_the_live_ones(tmp_path) -> None:
    full = random_map((3, 37, 45))
    store = make(tmp_path, pyramid_levels=1)
    write_all(store, full)
    reader = ProbabilityStore.open(store.path)  # another process's view of the same store
    assert reader.pyramid_levels == 1
    store.finalize(pyramid_levels=3)
    assert reader.pyramid_levels == 3 and reader.level_space(3).scale == (8.0, 8.0)
    reference = end_built(tmp_path, full, 3)
    for level in (1, 2, 3):
        np.testing.assert_array_equal(store.level(level)[...], reference.level(level)[...])
    store.finalize(pyramid_levels=0)
    assert store.pyramid_levels == 0 and not (tmp_path / "map.zarr" / "1").exists()


def test_auto_pyramid_levels_go_down_to_about_512_px(tmp_path) -> None:
    assert auto_pyramid_levels(512, 512) == 0 and auto_pyramid_levels(513, 100) == 1
    assert auto_pyramid_levels(16384, 16384) == 5 and auto_pyramid_levels(100_000, 100_000) == 8
    store = make(tmp_path, shape=(2, 3000, 1100), class_names=["a", "b"], pyramid_levels="auto")
    assert store.pyramid_levels == 3 and store.level(3).shape == (2, 375, 138)
    with pytest.raises(InputError, match="pyramid_levels"):
        make(tmp_path, name="bad.zarr", pyramid_levels=-1)


def test_uint8_pyramid_stays_within_rounding(tmp_path) -> None:
    store = make(tmp_path, dtype="uint8")
    full = random_map((3, 37, 45))
    write_all(store, full)
    store.finalize(pyramid_levels=1)
    assert store.level(1).dtype == np.uint8
    np.testing.assert_allclose(store.read(1), naive_local_mean(store.read()), atol=0.5 / 255)


def test_finalizing_again_with_fewer_levels_drops_the_extra_ones(tmp_path) -> None:
    store = make(tmp_path)
    write_all(store, random_map((3, 37, 45)))
    store.finalize(pyramid_levels=3)
    assert store.pyramid_levels == 3 and (tmp_path / "map.zarr" / "3").exists()
    store.finalize(pyramid_levels=1)
    assert store.pyramid_levels == 1 and store.is_complete()
    assert not (tmp_path / "map.zarr" / "2").exists()


def test_is_complete_only_after_finalize(tmp_path) -> None:
    store = make(tmp_path, attributes={"complete": True})  # not the caller's to decide
    assert not store.is_complete()
    write_all(store, random_map((3, 37, 45)))
    assert not store.is_complete()
    store.finalize(attributes={"finished": "now", "complete": True})
    assert store.is_complete() and ProbabilityStore.open(store.path).is_complete()


def test_finalize_refuses_a_store_with_missing_tiles(tmp_path) -> None:
    store = make(tmp_path)
    store.write_tile((), (0, 16, 0, 16), random_map((3, 16, 16)))
    with pytest.raises(StoreIncompleteError, match="lacks 8 tile"):
        store.finalize()
    assert not store.is_complete()


def test_a_finalized_store_refuses_new_tiles(tmp_path) -> None:
    store = make(tmp_path)
    write_all(store, random_map((3, 37, 45)))
    store.finalize(pyramid_levels=1)
    with pytest.raises(InputError, match="finalized"):
        store.write_tile((), (0, 16, 0, 16), random_map((3, 16, 16)))
    with pytest.raises(InputError, match="finalized"):
        ProbabilityStore.open(store.path).write_tile((), (0, 16, 0, 16), random_map((3, 16, 16)))


def test_ngff_metadata(tmp_path) -> None:
    store = make(tmp_path, shape=(2, 3, 4, 20, 24), axes="tczyx", scale=(2.0, 0.5, 0.5))
    write_all(store, random_map((2, 3, 4, 20, 24)))
    store.finalize(pyramid_levels=1)
    group_json = json.loads((tmp_path / "map.zarr" / "zarr.json").read_text())
    assert group_json["zarr_format"] == 3 and group_json["node_type"] == "group"
    ome = group_json["attributes"]["ome"]
    assert ome["version"] == "0.5"
    (multiscale,) = ome["multiscales"]
    assert "version" not in multiscale  # 0.5 keeps the version in "ome" only
    assert multiscale["name"] == "map"
    assert multiscale["axes"] == [
        {"name": "t", "type": "time"},
        {"name": "c", "type": "channel"},
        {"name": "z", "type": "space"},
        {"name": "y", "type": "space"},
        {"name": "x", "type": "space"},
    ]
    assert [d["path"] for d in multiscale["datasets"]] == ["0", "1"]
    assert multiscale["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [1, 1, 2, 0.5, 0.5]}
    ]
    assert multiscale["datasets"][1]["coordinateTransformations"][0]["scale"] == [1, 1, 2, 1, 1]
    channels = ome["omero"]["channels"]
    assert [c["label"] for c in channels] == CLASSES
    assert all(c["window"] == {"start": 0, "end": 1, "min": 0, "max": 1} for c in channels)
    # As in the live overlay: background hidden, the other classes shown.
    assert [c["active"] for c in channels] == [True, True, False]
    colours = [c["color"] for c in channels]
    assert len(set(colours)) == 3 and colours[0] == "FF00FF"
    assert all(len(c) == 6 and int(c, 16) >= 0 for c in colours)
    for level in ("0", "1"):
        array_json = json.loads((tmp_path / "map.zarr" / level / "zarr.json").read_text())
        assert array_json["dimension_names"] == ["t", "c", "z", "y", "x"]
        assert array_json["fill_value"] == 0
        assert array_json["chunk_grid"]["configuration"]["chunk_shape"] == [1, 3, 1, 16, 16]


def test_uint8_window_is_0_to_255(tmp_path) -> None:
    store = make(tmp_path, dtype="uint8")
    channels = store._group.attrs["ome"]["omero"]["channels"]
    assert all(c["window"] == {"start": 0, "end": 255, "min": 0, "max": 255} for c in channels)


def test_many_classes_get_distinct_colours_first(tmp_path) -> None:
    names = [f"class {i}" for i in range(10)]
    store = make(tmp_path, shape=(10, 8, 8), class_names=names)
    colours = [c["color"] for c in store._group.attrs["ome"]["omero"]["channels"]]
    assert len(set(colours)) == 10


def test_provenance_lives_beside_the_ome_metadata(tmp_path) -> None:
    provenance = {"model": "fdfe15", "patch_size": [15, 15], "rate": np.float32(2.5),
                  "source_path": tmp_path / "image.tif"}  # fmt: skip
    store = make(tmp_path, attributes=provenance)
    write_all(store, random_map((3, 37, 45)))
    store.finalize(attributes={"finished": "2025-01-01T00:00:00+00:00", "model": "fdfe15"})
    attributes = json.loads((tmp_path / "map.zarr" / "zarr.json").read_text())["attributes"]
    assert set(attributes) == {"ome", "napari_dense"}
    assert attributes["napari_dense"] == {
        "model": "fdfe15",
        "patch_size": [15, 15],
        "rate": 2.5,
        "source_path": str(tmp_path / "image.tif"),
        "finished": "2025-01-01T00:00:00+00:00",
        "complete": True,
    }
    assert "napari_dense" not in json.dumps(attributes["ome"])
    assert store.attributes == attributes["napari_dense"]


def test_pickles_by_path(tmp_path) -> None:
    store = make(tmp_path)
    store.write_tile((), (0, 16, 0, 16), random_map((3, 16, 16)))
    clone = pickle.loads(pickle.dumps(store))
    assert clone.path == store.path and clone.completed_tiles() == store.completed_tiles()


# ---------------------------------------------------------------------- other readers


def test_ome_zarr_py_reads_the_store(tmp_path) -> None:
    pytest.importorskip("ome_zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    store = make(tmp_path, shape=(3, 2, 37, 45), axes="czyx", scale=(2.0, 0.5, 0.5))
    full = random_map((3, 2, 37, 45))
    write_all(store, full)
    store.finalize(pyramid_levels=2)
    location = parse_url(str(tmp_path / "map.zarr"))
    assert location is not None and location.version == "0.5"
    node = next(iter(Reader(location)()))
    assert node.load(Multiscales) is not None
    assert [tuple(level.shape) for level in node.data] == [
        (3, 2, 37, 45),
        (3, 2, 19, 23),
        (3, 2, 10, 12),
    ]
    np.testing.assert_array_equal(np.asarray(node.data[0]), full)
    assert node.metadata["channel_names"] == CLASSES
    assert node.metadata["contrast_limits"] == [[0, 1]] * 3
    assert [a["name"] for a in node.metadata["axes"]] == ["c", "z", "y", "x"]


def test_ome_zarr_models_validates_the_metadata(tmp_path) -> None:
    store = make(tmp_path, shape=(1, 3, 2, 37, 45), axes="tczyx", dtype="uint8")
    write_all(store, random_map((1, 3, 2, 37, 45)))
    store.finalize(pyramid_levels=2)
    image = assert_valid_ngff(store.path)
    assert image.attributes.ome.multiscales[0].datasets[2].path == "2"
    # A live pyramid is valid NGFF from the start, while tiles are still missing.
    live = make(tmp_path, name="live.zarr", shape=(3, 37, 45), pyramid_levels=2)
    live.write_tile((), (0, 16, 0, 16), random_map((3, 16, 16)))
    image = assert_valid_ngff(live.path)
    assert [d.path for d in image.attributes.ome.multiscales[0].datasets] == ["0", "1", "2"]


def test_the_validator_fails_a_store_whose_metadata_is_wrong(tmp_path) -> None:
    """The NGFF check can fail: a level the metadata lists is missing, axes renamed."""
    store = make(tmp_path, pyramid_levels=1)
    del store._group["1"]
    with pytest.raises(ValueError, match="no array was found"):
        assert_valid_ngff(store.path)
    with pytest.raises(InputError, match=r"not a napari-dense probability map \(invalid OME-Zarr"):
        ProbabilityStore.open(store.path)
    other = make(tmp_path, name="other.zarr")
    ome = other._group.attrs["ome"]
    ome["multiscales"][0]["axes"][1]["name"] = "q"
    other._group.update_attributes({"ome": ome})
    with pytest.raises(ValueError, match="dimension names"):
        assert_valid_ngff(other.path)
    with pytest.raises(InputError, match=r"invalid OME-Zarr 0\.5 metadata"):
        ProbabilityStore.open(other.path)
    for path in (store.path, other.path):  # not left for the after-test check
        __import__("shutil").rmtree(path)


# ---------------------------------------------------------------------- physical space

MICRONS = PhysicalSpace(scale=(0.25, 0.25), translation=(10.0, 20.0), units=("micrometer",) * 2)


def test_physical_space_of_every_level(tmp_path) -> None:
    store = make(tmp_path, space=MICRONS, pyramid_levels=2)
    multiscale = store._group.attrs["ome"]["multiscales"][0]
    assert [a.get("unit") for a in multiscale["axes"]] == [None, "micrometer", "micrometer"]
    transforms = [d["coordinateTransformations"] for d in multiscale["datasets"]]
    assert [t[0]["scale"] for t in transforms] == [[1, 0.25, 0.25], [1, 0.5, 0.5], [1, 1, 1]]
    assert [t[1]["translation"] for t in transforms] == [
        [0, 10, 20],
        [0, 10.125, 20.125],
        [0, 10.375, 20.375],
    ]
    reopened = ProbabilityStore.open(store.path)
    assert reopened.space == MICRONS and reopened.scale == (0.25, 0.25)
    for level in range(3):
        assert reopened.level_space(level) == MICRONS.downsampled(2**level)
    write_all(store, random_map((3, 37, 45)))
    store.finalize()  # the metadata rewritten by finalize keeps the space
    assert ProbabilityStore.open(store.path).level_space(2) == MICRONS.downsampled(4)


def test_a_napari_layers_scale_translate_and_units_give_the_same_space(tmp_path) -> None:
    layer = {"scale": (1.0, 0.25, 0.25), "translate": (0.0, 10, 20), "units": ("pixel", "µm", "µm")}
    store = make(tmp_path, space=layer, shape=(3, 2, 37, 45), axes="czyx", scale=(3.0, 0.25, 0.25))
    assert store.space == MICRONS and store.scale == (3.0, 0.25, 0.25)
    with pytest.raises(InputError, match="give the pixel size once"):
        make(tmp_path, name="b.zarr", space=MICRONS, scale=(0.5, 0.5))
    with pytest.raises(InputError, match="pixel size must be two positive numbers"):
        make(tmp_path, name="c.zarr", space={"scale": (-1.0, 1.0)})
    with pytest.raises(InputError, match="space must be"):
        make(tmp_path, name="d.zarr", space=0.25)
    assert not any((tmp_path / name).exists() for name in ("b.zarr", "c.zarr", "d.zarr"))


def test_napari_ome_zarr_reopens_the_map_as_the_live_overlay_shows_it(tmp_path) -> None:
    """Class names, the one colour table, 0..1 windows, background hidden, every level."""
    pytest.importorskip("napari_ome_zarr")
    from napari_ome_zarr import napari_get_reader

    from napari_dense.colours import class_rgb, is_background

    store = make(tmp_path, pyramid_levels=1)
    write_all(store, random_map((3, 37, 45)))
    store.finalize()
    reader = napari_get_reader(str(store.path))
    assert reader is not None
    ((data, options, kind),) = reader(str(store.path))
    assert kind == "image" and [level.shape for level in data] == [(3, 37, 45), (3, 19, 23)]
    assert options["channel_axis"] == 0 and options["contrast_limits"] == [[0, 1]] * 3
    assert [name.split(": ")[-1] for name in options["name"]] == CLASSES
    assert options["visible"] == [not is_background(name) for name in CLASSES]
    assert options["visible"] == [True, True, False]
    for index, colormap in enumerate(options["colormap"]):
        np.testing.assert_allclose(colormap.colors[-1][:3], class_rgb(index), atol=1e-6)


def test_one_colour_table(tmp_path) -> None:
    from napari_dense import colours
    from napari_dense.io import store

    assert store.CHANNEL_COLOURS is colours.CLASS_COLOURS
    assert colours.class_colour(12) == colours.CLASS_COLOURS[2]
    assert colours.class_rgb(0) == (1.0, 0.0, 1.0)
    assert [colours.is_background(n) for n in ("Background", "bg", "tissue background")] == [
        True,
        True,
        True,
    ]
    assert not any(colours.is_background(n) for n in ("nucleus", "stroma", "backbone"))


# ---------------------------------------------------------------------- several writers


def _write_tiles_in_a_process(path: str, seed: int, tasks: list[Any], barrier: Any) -> None:
    """Worker (spawned): open the store by path and write its share of the tiles."""
    store = ProbabilityStore.open(path)
    full = random_map((3, 2, 37, 45), seed)
    barrier.wait()  # both processes write at the same time
    for leading, box in tasks:
        store.write_tile(leading, box, tile_of(store, full, leading, box))


def test_two_processes_write_different_tiles(tmp_path) -> None:
    store = make(tmp_path, shape=(3, 2, 37, 45), axes="czyx", chunks=(8, 8))
    tasks = [((z,), box) for z in range(2) for box in boxes(37, 45, (8, 8))]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [
        context.Process(
            target=_write_tiles_in_a_process,
            args=(str(store.path), 7, tasks[share::2], barrier),
        )
        for share in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert store.completed_tiles() == set(tasks)
    assert store.missing_chunks() == 0
    np.testing.assert_array_equal(store.read(), random_map((3, 2, 37, 45), 7))
    store.finalize()
    assert store.is_complete()
