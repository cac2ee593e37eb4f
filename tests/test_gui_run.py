"""The Dense inference widget's run as a desktop program: inputs, outputs, cancelling, panels.

Real viewers under Xvfb (pytest-xvfb); dialogs are replaced by recorded answers. No timings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from conftest import saved_model_file

import napari_dense as nd
from napari_dense._napari.live_run import NearestFirst, ViewFollower
from napari_dense._napari.widget import DOCK_WIDTH, DenseInferenceWidget
from napari_dense.evaluate.models import fdfe15
from napari_dense.io.store import ProbabilityStore
from napari_dense.model_files import ModelMetadata, save_classifier
from napari_dense.run.engine import TileResult
from napari_dense.run.tiling import plan_tiles

CLASSES = ["nucleus", "stain", "background"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    return saved_model_file(
        tmp_path_factory, lambda: fdfe15(num_classes=3), 15, 1, CLASSES, name="fdfe"
    )


@pytest.fixture(autouse=True)
def answers(tmp_path, monkeypatch) -> dict[str, list]:
    """A fresh session cache; every dialog answers from these lists (and records its question)."""
    cache = tmp_path / "session-cache"
    cache.mkdir()
    monkeypatch.setattr("napari_dense._napari.output_dialog._SESSION", [cache])
    recorded: dict[str, list] = {"asked": [], "existing": [], "choose": [], "code": []}

    def answer(kind: str, question: Path) -> object:
        recorded["asked"].append((kind, question))
        if not recorded[kind]:
            raise AssertionError(f"unexpected {kind} dialog about {question}")
        return recorded[kind].pop(0)

    monkeypatch.setattr(
        "napari_dense._napari.output_dialog.ask_existing_output",
        lambda path, parent=None: answer("existing", path),
    )
    monkeypatch.setattr(
        "napari_dense._napari.output_dialog.choose_output",
        lambda path, parent=None: answer("choose", path),
    )
    monkeypatch.setattr(
        "napari_dense._napari.output_dialog.confirm_code_execution",
        lambda path, parent=None: answer("code", path),
    )
    return recorded


def _widget(viewer, model_file, image, **layer) -> DenseInferenceWidget:
    viewer.add_image(image, name="grey", **layer)
    widget = DenseInferenceWidget(viewer)
    widget.load_model(model_file[1])
    return widget


def _wait(qtbot, widget: DenseInferenceWidget) -> None:
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)


def test_output_layers_are_never_offered_as_input(qtbot, make_napari_viewer, model_file) -> None:
    viewer = make_napari_viewer()
    widget = _widget(viewer, model_file, np.random.default_rng(0).random((40, 50), np.float32))
    widget.run()
    _wait(qtbot, widget)
    assert len(viewer.layers) == 1 + len(CLASSES)
    assert [name for name, _ in widget._image._default_choices(widget._image)] == ["grey"]
    assert [choice for choice in widget._image.choices] == [viewer.layers["grey"]]
    viewer.layers.remove("grey")  # only outputs left: nothing to run on
    assert widget._image.value is None and widget.run() is None


def test_output_layers_are_multiscale_views_of_every_store_level(
    qtbot, make_napari_viewer, model_file
) -> None:
    model, _ = model_file
    image = np.random.default_rng(1).random((300, 1100), np.float32)
    viewer = make_napari_viewer()
    widget = _widget(viewer, model_file, image)
    widget._tile.value = 128
    widget.run()
    _wait(qtbot, widget)
    store = widget._store
    assert store.is_complete() and store.pyramid_levels == 2  # 1100 -> 550 -> 275
    expected = nd.predict(image, model, 15)
    for k, layer in enumerate(widget._output_layers):
        assert layer.multiscale and len(layer.data) == 3
        assert [level.shape for level in layer.data] == [(300, 1100), (150, 550), (75, 275)]
        np.testing.assert_allclose(np.asarray(layer.data[0]), expected[k], atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(layer.data[2]), store.read(2)[k], atol=0
        )  # the views read the store's levels as they are
    visible = [layer.name for layer in widget._output_layers if layer.visible]
    assert visible == ["nucleus (napari-dense)", "stain (napari-dense)"]  # background hidden


def test_removing_the_input_layer_cancels_the_run_with_a_message(
    qtbot, make_napari_viewer, model_file, monkeypatch
) -> None:
    viewer = make_napari_viewer()
    widget = _widget(viewer, model_file, np.random.default_rng(2).random((256, 256), np.float32))
    widget._tile.value = 16  # 256 tiles
    warned: list[str] = []
    monkeypatch.setattr("napari_dense._napari.run_panel.show_warning", warned.append)
    worker = widget.run()
    removed: list[bool] = []

    def remove_input(item: object) -> None:
        if isinstance(item, TileResult) and not removed:
            removed.append(True)
            viewer.layers.remove("grey")

    worker.yielded.connect(remove_input)
    _wait(qtbot, widget)
    store = widget._store
    assert worker.abort_requested and not store.is_complete()
    assert 1 <= len(store.completed_tiles()) < 256
    assert widget._status.value == "cancelled: the input layer was removed"
    assert len(warned) == 1 and "'grey' was removed" in warned[0] and str(store.path) in warned[0]
    assert widget._image.value is None  # no output layer became the input


def test_closing_the_widget_cancels_its_run(qtbot, make_napari_viewer, model_file) -> None:
    viewer = make_napari_viewer()
    widget = _widget(viewer, model_file, np.random.default_rng(3).random((256, 256), np.float32))
    widget._tile.value = 16
    worker = widget.run()
    finished: list[bool] = []
    worker.finished.connect(lambda: finished.append(True))
    closed: list[bool] = []

    def close_widget(item: object) -> None:
        if isinstance(item, TileResult) and not closed:
            closed.append(True)
            widget.native.close()
            widget.native.deleteLater()

    worker.yielded.connect(close_widget)
    qtbot.waitUntil(lambda: bool(finished), timeout=120_000)
    assert worker.abort_requested
    store = ProbabilityStore.open(widget._store.path)
    assert not store.is_complete() and len(store.completed_tiles()) < 256
    assert not store.lock_owner() or not widget._store.holds_lock  # released: resumable


def test_show_class_keeps_its_classes(qtbot, make_napari_viewer, model_file) -> None:
    viewer = make_napari_viewer()
    widget = _widget(viewer, model_file, np.zeros((40, 40), np.float32))
    assert widget._class.choices == ("all", *CLASSES)
    viewer.add_image(np.zeros((10, 10)), name="another")
    widget.reset_choices()  # what napari does on every layer change
    assert widget._class.choices == ("all", *CLASSES)
    widget._class.value = "stain"
    widget.run()
    _wait(qtbot, widget)
    assert widget._class.choices == ("all", *CLASSES) and widget._class.value == "stain"
    assert [layer.visible for layer in widget._output_layers] == [False, True, False]


def test_a_second_run_reuses_the_output_layers(
    qtbot, make_napari_viewer, model_file, tmp_path, answers
) -> None:
    model, _ = model_file
    image = np.random.default_rng(2).random((48, 56), np.float32)
    viewer = make_napari_viewer()
    widget = _widget(viewer, model_file, image)
    widget._output.value = tmp_path / "first.zarr"
    widget.run()
    _wait(qtbot, widget)
    first = widget._output_layers
    viewer.layers["grey"].data = image[::-1].copy()  # the same layer, another image
    widget._output.value = tmp_path / "second.zarr"
    widget.run()
    _wait(qtbot, widget)
    second = widget._output_layers
    assert all(a is b for a, b in zip(first, second, strict=True))  # reused, not re-added
    assert len(viewer.layers) == 1 + len(CLASSES)
    expected = nd.predict(image[::-1].copy(), model, 15)
    for k, layer in enumerate(second):
        assert layer.metadata["napari_dense"]["store"] == str(tmp_path / "second.zarr")
        np.testing.assert_allclose(np.asarray(layer.data), expected[k], atol=1e-5)


def test_shown_layers_are_added_first_then_the_rest_in_class_order(
    qtbot, make_napari_viewer, tmp_path
) -> None:
    from napari_dense._napari.overlay import LiveOverlay

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64), np.float32), name="grey")
    store = ProbabilityStore.create(
        tmp_path / "map.zarr", shape=(3, 64, 64), axes="cyx", chunks=32, class_names=CLASSES,
        pyramid_levels=1,
    )  # fmt: skip
    inserted: list[str] = []
    viewer.layers.events.inserted.connect(lambda event: inserted.append(event.value.name))
    overlay = LiveOverlay(viewer, store, (1.0, 1.0), (0.0, 0.0), shown="background")
    assert overlay.added == []  # nothing added on the call itself: one per event-loop turn
    qtbot.waitUntil(lambda: len(overlay.added) == len(CLASSES), timeout=30_000)
    names = [f"{name} (napari-dense)" for name in CLASSES]
    assert inserted == [names[2], names[0], names[1]]  # the shown class first
    assert [layer.name for layer in viewer.layers][1:] == names  # in class order
    assert [layer.visible for layer in overlay.layers] == [False, False, True]
    assert all(layer.multiscale and len(layer.data) == 2 for layer in overlay.layers)


def test_long_model_information_wraps_and_the_dock_stays_narrow(
    qtbot, make_napari_viewer, tmp_path
) -> None:
    name = "padded-" + "x" * 500
    path = tmp_path / "long.pt2"
    torch.manual_seed(0)
    padded = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                 torch.nn.Conv2d(4, 2, 5))  # fmt: skip
    metadata = ModelMetadata(patch_size=(5, 5), in_channels=1, class_names=["a", "b"], name=name)
    save_classifier(padded, path, metadata=metadata)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((30, 30), np.float32))
    window = viewer.window._qt_window
    width_before = window.width()
    widget = DenseInferenceWidget(viewer)
    widget.load_model(path)
    viewer.window.add_dock_widget(widget, area="right")
    qtbot.wait(50)
    info = widget._model_info.native
    assert name in info.toolTip() and "NOT exact" in info.text()
    assert len(info.text()) < 120 and "padding" in info.toolTip().lower()  # details on demand
    assert widget.native.minimumSizeHint().width() <= DOCK_WIDTH
    assert widget.native.sizeHint().width() <= DOCK_WIDTH
    screen = window.screen().availableGeometry().width()
    assert window.width() <= max(width_before, screen)  # the dock did not widen the window


def test_existing_output_resume_overwrite_choose_or_cancel(
    qtbot, make_napari_viewer, model_file, tmp_path, answers
) -> None:
    model, _ = model_file
    image = np.random.default_rng(4).random((64, 64), np.float32)
    viewer = make_napari_viewer()
    widget = _widget(viewer, model_file, image)
    output = tmp_path / "map.zarr"
    widget._output.value = output
    widget._preset.value = "Simple"
    widget.run()
    _wait(qtbot, widget)
    assert answers["asked"] == []  # a new output: no question
    assert ProbabilityStore.open(output).attributes["mode"] == "simple"  # the preset's name
    before = sorted(
        (p.relative_to(output), p.read_bytes()) for p in output.rglob("*") if p.is_file()
    )

    answers["existing"].append("cancel")
    assert widget.run() is None
    after = sorted(
        (p.relative_to(output), p.read_bytes()) for p in output.rglob("*") if p.is_file()
    )
    assert after == before  # cancelled: bytes unchanged

    widget._preset.value = "Advanced"
    answers["existing"].append("overwrite")
    widget.run()
    _wait(qtbot, widget)
    store = ProbabilityStore.open(output)
    assert store.is_complete() and store.attributes["mode"] == "advanced"
    np.testing.assert_allclose(store.read(), nd.predict(image, model, 15), atol=1e-5)

    other = tmp_path / "other.zarr"
    answers["existing"].append("choose")
    answers["choose"].append(other)
    widget.run()
    _wait(qtbot, widget)
    assert ProbabilityStore.open(other).is_complete() and Path(str(widget._output.value)) == other
    assert [kind for kind, _ in answers["asked"]] == ["existing", "existing", "existing", "choose"]


def test_multiscale_input_runs_on_the_chosen_level_with_its_scale(
    qtbot, make_napari_viewer, model_file
) -> None:
    model, _ = model_file
    rng = np.random.default_rng(5)
    level0 = rng.random((128, 96), np.float32)
    level1 = level0.reshape(64, 2, 48, 2).mean(axis=(1, 3))
    viewer = make_napari_viewer()
    widget = _widget(
        viewer, model_file, [level0, level1], multiscale=True, scale=(0.5, 0.5), translate=(3, 4)
    )
    assert not widget._level.native.isHidden() and widget._level.choices == (0, 1)
    widget._level.value = 1
    assert "64 × 48" in widget._level.native.currentText()
    widget.run()
    _wait(qtbot, widget)
    [first, *_] = widget._output_layers
    assert not first.multiscale and first.data.shape == (64, 48)
    np.testing.assert_allclose(first.scale, (1.0, 1.0))  # level 1: twice level 0's pixel size
    np.testing.assert_allclose(first.translate, (3.25, 4.25))  # centres of 2x2 blocks
    np.testing.assert_allclose(np.asarray(first.data), nd.predict(level1, model, 15)[0], atol=1e-5)


def test_a_python_file_model_asks_first_and_no_leaves_nothing_loaded(
    make_napari_viewer, tmp_path, answers
) -> None:
    code = tmp_path / "net.py"
    marker = tmp_path / "code-ran"
    code.write_text(
        f"import os\nfrom torch import nn\nos.mkdir({str(marker)!r})\n\n"
        "class PatchNet(nn.Sequential):\n    def __init__(self):\n"
        "        super().__init__(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))\n",
        "utf-8",
    )
    torch.save(
        torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3)
        ).state_dict(),
        tmp_path / "net.pth",
    )
    sidecar = tmp_path / "model.yaml"
    sidecar.write_text(
        "python_file: net.py\nclass_name: PatchNet\nweights: net.pth\npatch_size: 5\n"
        "class_names: [a, b]\n",
        "utf-8",
    )
    viewer = make_napari_viewer()
    widget = DenseInferenceWidget(viewer)
    answers["code"].append(False)
    widget.load_model(sidecar)
    assert answers["asked"] == [("code", code.resolve())]
    assert widget._loaded is None and not marker.exists()  # No: nothing ran, nothing loaded
    answers["code"].append(True)
    widget.load_model(sidecar)
    assert widget._loaded is not None and marker.exists()


def test_tiles_follow_the_view() -> None:
    plan = plan_tiles((256, 256), 64, (15, 15), (1, 1), "reflect")
    tasks = [((), tile) for tile in plan.tiles()]
    follower = ViewFollower((0.0, 0.0))
    queue = NearestFirst(tasks, follower)
    first = queue.pop()
    assert first is not None and first[1].box == (0, 64, 0, 64)
    follower.set((250.0, 250.0))  # the user panned to the other corner
    following = queue.pop()
    assert following is not None and following[1].box == (192, 256, 192, 256)
    assert len(queue) == 14


def test_a_map_reopened_through_napari_ome_zarr_looks_like_the_overlay(
    qtbot, make_napari_viewer, model_file, tmp_path
) -> None:
    reader_module = pytest.importorskip("napari_ome_zarr._reader")
    viewer = make_napari_viewer()
    widget = _widget(viewer, model_file, np.random.default_rng(6).random((48, 40), np.float32))
    widget._output.value = tmp_path / "run.zarr"
    widget.run()
    _wait(qtbot, widget)
    reader = reader_module.napari_get_reader(str(tmp_path / "run.zarr"))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(tmp_path / "run.zarr"))
    assert kind == "image" and kwargs["channel_axis"] == 0
    assert [name.split(": ")[-1] for name in kwargs["name"]] == CLASSES  # "run: nucleus"
    overlay_visible = [layer.visible for layer in widget._output_layers]
    assert list(kwargs["visible"]) == overlay_visible == [True, True, False]  # background hidden
    level0 = np.asarray(data[0] if isinstance(data, list) else data)
    np.testing.assert_allclose(level0, widget._store.read(), atol=0)
