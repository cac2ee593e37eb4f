"""GUI latency and honest estimates: latency-sized tiles, the calibration probe (no timings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import saved_model_file

import napari_dense as nd
from napari_dense.errors import InputError
from napari_dense.evaluate import estimate
from napari_dense.evaluate.models import patchnet32


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return saved_model_file(
        tmp_path_factory,
        lambda: patchnet32(num_classes=2),
        32,
        3,
        ["a", "b"],
        name="p",
        activation="none",
    )[1]


@pytest.fixture(autouse=True)
def _fresh_probes(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(estimate, "_probes", {})
    cache = tmp_path / "session-cache"
    cache.mkdir()
    monkeypatch.setattr("napari_dense._napari.output_dialog._SESSION", [cache])


def test_gui_tiles_are_latency_sized_unless_the_user_sets_one() -> None:
    assert estimate.gui_tile_size(0) == estimate.GUI_TILE == 512
    assert estimate.gui_tile_size(None) == 512
    assert estimate.gui_tile_size(256) == 256


def test_cached_probe_measures_once_per_key() -> None:
    calls: list[int] = []

    def measure() -> float:
        calls.append(1)
        return 1e9 * len(calls)

    assert estimate.known_probe("k") is None
    assert estimate.cached_probe("k", measure) == 1e9
    assert estimate.cached_probe("k", measure) == 1e9
    assert estimate.known_probe("k") == 1e9
    assert estimate.cached_probe("other", measure) == 2e9
    assert len(calls) == 2


def test_probe_rate_counts_the_window_and_the_estimate_scales_by_the_halo() -> None:
    dense = nd.densify(patchnet32(num_classes=2).eval(), 32)
    rate = estimate.probe_rate(dense, "cpu", side=16)
    assert np.isfinite(rate) and rate > 0
    plan = dense.plan
    plain = estimate.estimate_run(plan, 512 * 512, 512 * 512, "cpu", 1e9)
    with_halo = estimate.estimate_run(plan, 512 * 512, 512 * 512, "cpu", 1e9, halo=(32, 32))
    assert plain.seconds == pytest.approx(plan.macs_per_pixel * 512 * 512 / 1e9)
    assert with_halo.seconds == pytest.approx(plain.seconds * (543 / 512) ** 2)


def test_widget_probes_once_for_two_estimates_and_says_so(
    qtbot, make_napari_viewer, model_file, monkeypatch
) -> None:
    from napari_dense._napari import widget as _widget

    calls: list[str] = []

    def fake_probe(prepare):
        calls.append("cpu")
        return 2e9

    monkeypatch.setattr(_widget, "probe_tile_rate", fake_probe)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((600, 700, 3), np.float32), name="cells", rgb=True)
    widget = _widget.DenseInferenceWidget(viewer)
    widget._device.value = "cpu"
    widget.load_model(model_file)
    qtbot.waitUntil(lambda: "(probe)" in widget._estimate.value, timeout=60_000)
    widget._update_estimate()
    widget._tile.value = 256  # another estimate, same model, sampling, device and image
    assert "(probe)" in widget._estimate.value
    assert calls == ["cpu"]
    plan = widget.plan()
    expected = estimate.estimate_run(plan, 600 * 700, 256 * 256, "cpu", 2e9)  # output pixels
    assert expected.describe() in widget._estimate.value
    viewer.add_image(np.zeros((300, 300, 3), np.float32), name="other", rgb=True)
    widget._image.value = viewer.layers["other"]  # another image: probed again
    qtbot.waitUntil(lambda: len(calls) == 2, timeout=60_000)


def test_the_probe_times_one_real_tile_read_computed_and_written_with_its_pyramid(
    tmp_path, monkeypatch
) -> None:
    import functools

    from napari_dense.io.store import ProbabilityStore
    from napari_dense.run.to_zarr import prepare_run

    model = patchnet32(num_classes=2).eval()
    image = np.random.default_rng(0).random((600, 700, 3), dtype=np.float32)
    written: list[tuple[int, int, int, int]] = []
    levels: list[int] = []
    original = ProbabilityStore.write_tile

    def recording(self, leading, box, probabilities):
        written.append(tuple(box))
        levels.append(self.pyramid_levels)
        return original(self, leading, box, probabilities)

    monkeypatch.setattr(ProbabilityStore, "write_tile", recording)
    paths: list[Path] = []
    prepare = functools.partial(
        prepare_run, image, model, patch_size=32, channel_axis=-1, device="cpu", tile=256,
        pyramid_levels="auto",
    )  # fmt: skip

    def scratch(path: Path):
        paths.append(path)
        return prepare(output=path)

    rate = estimate.probe_tile_rate(scratch)
    assert np.isfinite(rate) and rate > 0
    assert len(written) == 2 and all(level >= 1 for level in levels)  # warm-up, then timed
    y0, y1, x0, x1 = written[0]
    assert y0 <= 300 < y1 and x0 <= 350 < x1  # the tile at the image's centre first
    assert written[1] != written[0]
    assert not paths[0].exists()  # the scratch store is removed


def test_a_gui_run_uses_latency_sized_tiles(qtbot, make_napari_viewer, model_file, monkeypatch):
    from napari_dense._napari import run_panel as _run_panel
    from napari_dense._napari.widget import DenseInferenceWidget
    from napari_dense.run.options import RunOptions

    seen: dict[str, Any] = {}

    def refusing_prepare(*_args, **kwargs):
        seen.update(kwargs)
        raise InputError("stopped by the test")

    monkeypatch.setattr(_run_panel, "prepare_run", refusing_prepare)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64, 3), np.float32), name="cells", rgb=True)
    widget = DenseInferenceWidget(viewer)
    widget.load_model(model_file)
    widget.run()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    options = seen["options"]  # one RunOptions from the widget's controls
    assert isinstance(options, RunOptions) and options.channel_axis == -1  # an RGB layer
    assert options.tile == 512 and options.mode == "advanced" and seen["resume"] is False
    widget._tile.value = 128
    widget.run()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert seen["options"].tile == 128


def test_chunk_cache_reads_nothing_where_no_tile_landed(tmp_path) -> None:
    from napari_dense._napari.overlay import ChunkCache
    from napari_dense.io.store import ProbabilityStore

    store = ProbabilityStore.create(
        tmp_path / "map.zarr", shape=(2, 64, 64), axes="cyx", chunks=16, class_names=["a", "b"],
        pyramid_levels=1,
    )  # fmt: skip
    cache = ChunkCache(store)
    empty = cache.region(0, (), slice(0, 64), slice(0, 64))
    assert cache.reads == 0 and empty.shape == (2, 64, 64) and not empty.any()
    tile = np.full((2, 16, 16), 0.25, np.float32)
    store.write_tile((), (16, 32, 0, 16), tile)
    cache.invalidate((), (16, 32, 0, 16))
    filled = cache.region(0, (), slice(0, 64), slice(0, 64))
    assert cache.reads >= 1
    assert (filled[:, 16:32, 0:16] == 0.25).all() and not filled[:, :16].any()
    # A reopened (resumed) store: its recorded tiles are read, the others are not.
    again = ChunkCache(store)
    assert (again.region(0, (), slice(16, 32), slice(0, 16)) == 0.25).all()
    reads = again.reads
    assert not again.region(0, (), slice(32, 64), slice(32, 64)).any() and again.reads == reads


def test_chunk_cache_region_of_one_class_equals_that_class_of_all(tmp_path) -> None:
    from napari_dense._napari.overlay import ChunkCache
    from napari_dense.io.store import ProbabilityStore

    store = ProbabilityStore.create(
        tmp_path / "map.zarr", shape=(3, 40, 40), axes="cyx", chunks=16,
        class_names=["a", "b", "c"],
    )  # fmt: skip
    tile = np.random.default_rng(1).random((3, 16, 16), dtype=np.float32)
    store.write_tile((), (0, 16, 16, 32), tile)
    cache = ChunkCache(store)
    every = cache.region(0, (), slice(5, 30), slice(3, 40))
    for k in range(3):
        one = cache.region(0, (), slice(5, 30), slice(3, 40), k)
        assert one.shape == (1, 25, 37) and np.array_equal(one[0], every[k])
    assert np.array_equal(every[:, 0:11, 13:29], tile[:, 5:16, :])
