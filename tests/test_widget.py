"""The napari plugin, driven as a user would (real viewer under Xvfb via pytest-xvfb)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from architectures import ConcatNet
from conftest import saved_model_file
from qtpy.QtCore import QTimer

import napari_dense as nd
from napari_dense._napari.compare_widget import CompareModesWidget
from napari_dense._napari.table import table_text
from napari_dense._napari.widget import DenseInferenceWidget
from napari_dense.evaluate.models import patchnet32
from napari_dense.model_files import ModelMetadata, save_classifier
from napari_dense.run.engine import TileResult

CLASSES = ["nucleus", "other"]


@pytest.fixture(scope="module")
def model_and_file(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    return saved_model_file(
        tmp_path_factory,
        lambda: patchnet32(num_classes=2),
        32,
        3,
        CLASSES,
        name="patchnet",
        activation="none",  # the network ends in a softmax
    )


@pytest.fixture(autouse=True)
def _fresh_session_cache(tmp_path, monkeypatch) -> None:
    """Each test its own cache folder; a dialog nobody answers fails instead of hanging."""
    cache = tmp_path / "session-cache"
    cache.mkdir()
    monkeypatch.setattr("napari_dense._napari.output_dialog._SESSION", [cache])

    def unexpected(*_args, **_kwargs):
        raise AssertionError("a dialog was opened that the test did not expect")

    for name in ("ask_existing_output", "choose_output", "confirm_code_execution"):
        monkeypatch.setattr(f"napari_dense._napari.output_dialog.{name}", unexpected)


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).random((70, 83, 3), dtype=np.float32)


def _wait(qtbot, widget: DenseInferenceWidget, timeout: int = 120_000) -> None:
    qtbot.waitUntil(lambda: widget._worker is None, timeout=timeout)


def _output(widget: DenseInferenceWidget) -> np.ndarray:
    # What the overlay's full-resolution level shows (read through its views, as napari does).
    levels = [layer.data[0] if layer.multiscale else layer.data for layer in widget._output_layers]
    return np.stack([np.asarray(level) for level in levels])


@pytest.fixture
def dense_widget(make_napari_viewer, model_and_file, image) -> DenseInferenceWidget:
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells", rgb=True)
    widget = DenseInferenceWidget(viewer)
    widget.load_model(model_and_file[1])
    return widget


@pytest.mark.parametrize("preset", ["Advanced", "Simple", "Custom"])
def test_run_fills_the_overlay_with_the_exact_prediction(
    qtbot, dense_widget, model_and_file, image, preset
) -> None:
    model, _ = model_and_file
    widget = dense_widget
    if preset == "Custom":
        first, second = widget._layer_switches.values()
        first.value, second.value = "checkered", "all"
        assert widget._preset.value == "Custom"
    else:
        widget._preset.value = preset
    widget._tile.value = 32
    sampling = widget.sampling()
    assert widget.run() is not None
    _wait(qtbot, widget)
    out = _output(widget)
    expected = nd.predict(image, model, 32, mode=sampling)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert widget._run_button.enabled and not widget._cancel_button.enabled
    assert widget._store.is_complete()
    assert [layer.name for layer in widget._output_layers] == [
        f"{c} (napari-dense)" for c in CLASSES
    ]


def test_layer_switches_are_three_way_and_apply_sampling_round_trips(
    dense_widget, model_and_file
) -> None:
    model, _ = model_and_file
    widget = dense_widget
    names = [layer.name for layer in nd.explain(model, 32).layers]
    assert list(widget._layer_switches) == names and len(names) == 2
    assert all(c.choices == ("none", "checkered", "all") for c in widget._layer_switches.values())

    def density_shown() -> str:
        return widget._estimate.value.split(" of pixels computed")[0].rsplit("· ", 1)[-1]

    assert widget._preset.value == "Advanced"
    assert widget.sampling() == dict.fromkeys(names, "all")
    assert density_shown() == "100%"
    widget._preset.value = "Simple"
    assert widget.sampling() == dict.fromkeys(names, "none")
    assert density_shown() == "6.2%"  # one exact pixel per 4x4 (output stride 4)

    widget._layer_switches[names[1]].value = "checkered"  # touching a layer: Custom
    assert widget.sampling() == {names[0]: "none", names[1]: "checkered"}
    assert widget._preset.value == "Custom"

    for mapping in (
        {names[0]: "checkered", names[1]: "all"},
        {names[0]: "all", names[1]: "none"},
        {names[0]: "checkered", names[1]: "checkered"},
    ):
        widget.apply_sampling(mapping)
        assert widget.sampling() == mapping and widget._preset.value == "Custom"
        density = nd.explain(model, 32, sampling=mapping).density
        assert density_shown() == (f"{density:.0%}" if density >= 0.1 else f"{density:.1%}")
    widget.apply_sampling(dict.fromkeys(names, "all"))
    assert widget._preset.value == "Advanced"
    widget.apply_sampling({names[1]: "checkered"})  # unnamed layers: "none", as densify reads
    assert widget.sampling() == {names[0]: "none", names[1]: "checkered"}
    widget.apply_sampling({})
    assert widget._preset.value == "Simple"
    with pytest.raises(ValueError, match="no striding layer named 'nope'"):
        widget.apply_sampling({"nope": "all"})
    with pytest.raises(ValueError, match="one of none, checkered, all"):
        widget.apply_sampling({names[0]: "half"})
    assert widget.sampling() == dict.fromkeys(names, "none")  # a refused mapping changes nothing


def test_tied_layers_switch_together(make_napari_viewer, tmp_path) -> None:
    # ConcatNet's two strided branches are joined by a concat: one lattice, one sampling.
    path = tmp_path / "concat.pt2"
    metadata = ModelMetadata(patch_size=(12, 12), in_channels=1, class_names=["a", "b"])
    save_classifier(ConcatNet().eval(), path, metadata=metadata)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((40, 40), np.float32), name="grey")
    widget = DenseInferenceWidget(viewer)
    widget.load_model(path)
    tied = [layer for layer in nd.explain(ConcatNet(), 12).layers if layer.tied_with]
    assert len(tied) == 2
    widget._layer_switches[tied[0].name].value = "checkered"
    assert widget.sampling() == {tied[0].name: "checkered", tied[1].name: "checkered"}
    assert widget._preset.value == "Custom" and "pixels computed" in widget._estimate.value


def test_cancel_keeps_finished_tiles_and_resume_finishes_them(
    qtbot, make_napari_viewer, model_and_file, monkeypatch
) -> None:
    model, path = model_and_file
    image = np.random.default_rng(1).random((256, 256, 3), dtype=np.float32)
    viewer = make_napari_viewer()
    viewer.add_image(image, name="big", rgb=True)
    widget = DenseInferenceWidget(viewer)
    widget.load_model(path)
    widget._tile.value = 16  # 256 tiles: a cancel lands well before the end
    worker = widget.run()
    assert worker is not None
    worker.yielded.connect(lambda item: isinstance(item, TileResult) and widget.cancel())
    _wait(qtbot, widget)
    store = widget._store
    done = store.completed_tiles()
    assert 1 <= len(done) < widget._tiles_total == 256
    assert not store.is_complete() and "stopped" in widget._status.value
    expected = nd.predict(image, model, 32)
    out = _output(widget)
    for _, (y0, y1, x0, x1) in done:
        np.testing.assert_allclose(out[:, y0:y1, x0:x1], expected[:, y0:y1, x0:x1], atol=1e-5)
    # Run again: the same run's output exists, the user picks Resume.
    asked: list[Path] = []
    monkeypatch.setattr(
        "napari_dense._napari.output_dialog.ask_existing_output",
        lambda output, parent=None: asked.append(output) or "resume",
    )
    assert widget.run() is not None
    _wait(qtbot, widget)
    assert asked == [store.path]
    assert widget._store.path == store.path and widget._store.is_complete()
    assert (
        f"({len(done)} already done)" in widget._status.value or "done in" in widget._status.value
    )
    np.testing.assert_allclose(_output(widget), expected, atol=1e-5)


def test_gui_stays_responsive_during_a_run(qtbot, dense_widget) -> None:
    widget = dense_widget
    widget._tile.value = 32
    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    started = time.perf_counter()
    widget.run()
    _wait(qtbot, widget)
    finished = time.perf_counter()
    timer.stop()
    # The event loop kept running while the worker computed (no timing threshold: the figures
    # are measured by benchmarks/bench_gui.py, not asserted here).
    during = [t for t in ticks if started < t < finished]
    assert len(during) >= 2, (len(ticks), finished - started)
    gaps = np.diff(ticks) * 1000
    print(
        f"\nevent-loop latency during a run: max {gaps.max():.0f} ms, "
        f"median {np.median(gaps):.0f} ms over {len(gaps)} ticks"
    )


def test_compare_panel_fills_table_and_difference_layer(qtbot, dense_widget) -> None:
    viewer = dense_widget._viewer
    panel = CompareModesWidget(viewer)
    panel._region.value = "whole image"
    worker = panel.run()
    assert worker is not None
    qtbot.waitUntil(lambda: panel.comparison is not None, timeout=120_000)
    comparison = panel.comparison
    assert [r.mode for r in comparison.results] == ["simple", "advanced"]
    assert len(table_text(panel._table)) == 2
    assert comparison.oracle_max_abs_diff < 1e-4
    assert comparison.results[0].max_abs_diff > comparison.results[1].max_abs_diff == 0
    difference = viewer.layers["|simple − advanced| (napari-dense)"]
    assert not difference.visible and difference.opacity == 0.5  # the overlay stays readable
    assert difference not in dense_widget._image.choices  # never an input
    table = table_text(panel._table)  # the cells as shown, not the values given
    numbers = [cell for row in table for cell in row[2:]]
    assert all(cell == "0" or len(cell.replace(".", "").lstrip("0").split("e")[0]) <= 3
               for cell in numbers), numbers  # fmt: skip
    assert panel.copy_markdown().startswith("| mode |")


def test_compare_refuses_a_grey_layer_for_an_rgb_model_as_run_does(
    dense_widget, monkeypatch
) -> None:
    viewer = dense_widget._viewer
    viewer.add_image(np.zeros((40, 40), np.float32), name="grey")
    dense_widget._image.value = viewer.layers["grey"]
    shown: list[str] = []
    monkeypatch.setattr("napari_dense._napari.widget.show_error", shown.append)
    panel = CompareModesWidget(viewer)
    assert panel.run() is None and dense_widget.run() is None
    assert len(shown) == 2 and all("expects 3 channel(s)" in message for message in shown)


def test_dropping_a_model_file_loads_it(make_napari_viewer, model_and_file) -> None:
    viewer = make_napari_viewer()
    layers_before = len(viewer.layers)
    viewer.open(str(model_and_file[1]), plugin="napari-dense")
    assert len(viewer.layers) == layers_before
    from napari_dense._napari.widget import dense_widget_of

    widget = dense_widget_of(viewer)
    assert widget._loaded is not None and "patch 32x32" in widget._model_info.value


def test_writer_round_trip_with_napari_ome_zarr(qtbot, dense_widget, tmp_path) -> None:
    reader_module = pytest.importorskip("napari_ome_zarr._reader")
    widget = dense_widget
    widget._tile.value = 48
    widget.run()
    _wait(qtbot, widget)
    viewer = widget._viewer
    out = tmp_path / "export.zarr"
    viewer.layers.selection = set(widget._output_layers)
    written = viewer.layers.save(str(out), selected=True, plugin="napari-dense")
    assert written == [str(out)]
    reader = reader_module.napari_get_reader(str(out))
    assert reader is not None
    layer_data = reader(str(out))
    data = np.asarray(
        layer_data[0][0][0] if isinstance(layer_data[0][0], list) else layer_data[0][0]
    )
    np.testing.assert_allclose(data, _output(widget), atol=1e-6)
    from napari_dense.io.store import ProbabilityStore

    store = ProbabilityStore.open(out)
    assert store.attributes["patch_size"] == [32, 32]
    assert store.class_names == CLASSES


def test_a_torch_error_during_a_run_reaches_the_user(qtbot, dense_widget, monkeypatch) -> None:
    # torch raises RuntimeError (out of memory, ...), which superqt's workers would only warn
    # about: the run must end with a notification, not silently.
    def failing_compute(*_args, **_kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    shown: list[str] = []
    monkeypatch.setattr("napari_dense.run.engine.TiledPredictor.compute", failing_compute)
    monkeypatch.setattr("napari_dense._napari.run_panel.show_error", shown.append)
    assert dense_widget.run() is not None
    _wait(qtbot, dense_widget)
    assert any("CUDA out of memory (simulated)" in message for message in shown), shown
