"""A map dragged back into napari opens as the live overlay looked, without a reader chooser.

Real viewers under Xvfb (pytest-xvfb). napari's reader chooser (``QtReaderDialog``) is replaced
by one that fails the test; napari's settings are a fresh, unsaved copy (the user's reader
preferences are never read or written here). No timings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from conftest import saved_model_file
from napari.errors import MultipleReaderError
from napari.settings import NapariSettings
from qtpy.QtCore import QMimeData, QPointF, Qt, QUrl
from qtpy.QtGui import QDropEvent

from napari_dense._napari.reader import (
    get_map_reader,
    is_probability_map,
    remember_map_reader,
)
from napari_dense._napari.widget import DenseInferenceWidget
from napari_dense.colours import class_rgb
from napari_dense.evaluate.models import fdfe15
from napari_dense.io.physical import PhysicalSpace
from napari_dense.io.store import ProbabilityStore

CLASSES = ["nucleus", "stain", "background"]
MICRONS = ("micrometer", "micrometer")


@pytest.fixture(autouse=True)
def settings(monkeypatch) -> NapariSettings:
    """napari's settings for this test only: no config file, no reader preferences."""
    fresh = NapariSettings(config_path=None)
    monkeypatch.setattr("napari.settings._SETTINGS", fresh)
    return fresh


@pytest.fixture(autouse=True)
def no_chooser(monkeypatch) -> list[str]:
    """napari's reader chooser fails the test (and records which path it was shown for)."""
    shown: list[str] = []

    class FailingReaderDialog:
        def __init__(self, pth: str = "", **_kwargs: object) -> None:
            shown.append(pth)
            pytest.fail(f"napari showed its reader chooser for {pth}")

    monkeypatch.setattr("napari._qt.dialogs.qt_reader_dialog.QtReaderDialog", FailingReaderDialog)
    return shown


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return saved_model_file(
        tmp_path_factory, lambda: fdfe15(num_classes=3), 15, 1, CLASSES, name="fdfe"
    )[1]


def _map(path: Path, dtype: str = "float32") -> ProbabilityStore:
    """A finished 3-class map at 0.25 µm with a 2-level pyramid, as a headless run writes it."""
    store = ProbabilityStore.create(
        path,
        shape=(3, 96, 128),
        axes="cyx",
        chunks=(32, 32),
        class_names=CLASSES,
        dtype=dtype,
        space=PhysicalSpace(scale=(0.25, 0.25), translation=(2.0, 3.0), units=MICRONS),
        pyramid_levels=2,
    )
    probabilities = np.random.default_rng(3).dirichlet((1, 1, 1), size=(96, 128))
    for y in range(0, 96, 32):
        for x in range(0, 128, 32):
            tile = probabilities[y : y + 32, x : x + 32].transpose(2, 0, 1)
            store.write_tile((), (y, y + 32, x, x + 32), tile.astype(np.float32))
    store.finalize()
    return ProbabilityStore.open(path)


def _drop(viewer, path: Path) -> None:
    """Drag-and-drop ``path`` on the canvas, as Qt delivers it (QtViewer.dropEvent)."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    event = QDropEvent(
        QPointF(10, 10),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.NoButton,
        Qt.KeyboardModifier.NoModifier,
    )
    viewer.window._qt_viewer.dropEvent(event)


def _look(layer) -> dict[str, object]:
    """What a class layer looks like: name, colour, blending, window, visibility, placement."""
    return {
        "name": layer.name,
        "colour": tuple(np.round(layer.colormap.colors[-1], 4)),
        "blending": layer.blending,
        "contrast_limits": tuple(float(v) for v in layer.contrast_limits),
        "opacity": float(layer.opacity),
        "visible": layer.visible,
        "multiscale": layer.multiscale,
        "scale": tuple(float(v) for v in layer.scale),
        "translate": tuple(float(v) for v in layer.translate),
        "units": tuple(str(u) for u in layer.units),
    }


def _level0(layer) -> np.ndarray:
    return np.asarray(layer.data[0] if layer.multiscale else layer.data, dtype=np.float32)


def test_a_saved_map_dropped_back_in_looks_like_the_live_overlay(
    settings, qtbot, make_napari_viewer, model_file, tmp_path, no_chooser
) -> None:
    viewer = make_napari_viewer()
    image = np.random.default_rng(0).random((80, 96), np.float32)
    viewer.add_image(image, name="grey", scale=(0.25, 0.25), translate=(10, 20), units="µm")
    widget = DenseInferenceWidget(viewer)
    widget.load_model(model_file)
    widget._output.value = tmp_path / "run.zarr"
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    overlay = list(widget._output_layers)
    during_run = [_look(layer) for layer in overlay]
    assert [look["visible"] for look in during_run] == [True, True, False]  # background hidden
    run = (tmp_path / "run.zarr").resolve()  # the run's own output is remembered as it ends
    assert settings.plugins.extension2reader == {f"{run}/": "napari-dense"}

    saved = tmp_path / "saved.zarr"  # File › Save Selected Layers, napari-dense's writer
    viewer.layers.selection = set(overlay)
    assert viewer.layers.save(str(saved), selected=True, plugin="napari-dense") == [str(saved)]
    assert settings.plugins.extension2reader == {
        f"{run}/": "napari-dense",
        f"{saved.resolve()}/": "napari-dense",
    }
    for layer in overlay:
        viewer.layers.remove(layer)

    _drop(viewer, saved)
    reopened = [layer for layer in viewer.layers if layer.name != "grey"]
    assert [_look(layer) for layer in reopened] == during_run
    assert all(layer.source.reader_plugin == "napari-dense" for layer in reopened)
    expected = widget._store.read()
    for k, layer in enumerate(reopened):
        np.testing.assert_allclose(_level0(layer), expected[k], atol=1e-6)
        assert layer.metadata["napari_dense"]["class"] == CLASSES[k]
    for layer in reopened:
        viewer.layers.remove(layer)
    _drop(viewer, run)  # the run's output itself, dropped in: no chooser either
    assert [_look(layer) for layer in viewer.layers if layer.name != "grey"] == during_run
    widget._image.reset_choices()
    assert [layer.name for layer in widget._image.choices] == ["grey"]  # maps are no input
    assert no_chooser == []


def test_without_a_preference_napari_would_ask_and_the_map_reader_answers(
    settings, make_napari_viewer, tmp_path
) -> None:
    store = _map(tmp_path / "headless.zarr")
    viewer = make_napari_viewer()
    # Why the preference: napari's builtins and napari-ome-zarr claim every folder too.
    with pytest.raises(MultipleReaderError):
        viewer.open(store.path, plugin=None)  # what a drop and `napari map.zarr` do
    assert remember_map_reader(store.path)
    assert not remember_map_reader(store.path)  # once
    layers = viewer.open(store.path, plugin=None)
    assert [layer.name for layer in layers] == [f"{name} (napari-dense)" for name in CLASSES]
    assert [layer.visible for layer in layers] == [True, True, False]
    for k, layer in enumerate(layers):
        assert layer.blending == "additive" and layer.multiscale
        assert tuple(layer.colormap.colors[-1][:3]) == pytest.approx(class_rgb(k))
        assert tuple(layer.scale) == (0.25, 0.25) and tuple(layer.translate) == (2.0, 3.0)
        assert tuple(str(u) for u in layer.units) == ("micrometer", "micrometer")
        assert len(layer.data) == 3  # every pyramid level, read lazily
        np.testing.assert_allclose(_level0(layer), store.read()[k], atol=0)


def test_the_users_reader_preference_is_kept(
    settings, make_napari_viewer, tmp_path, no_chooser
) -> None:
    store = _map(tmp_path / "mine.zarr")
    settings.plugins.extension2reader = {"*.zarr/": "napari-ome-zarr"}
    assert not remember_map_reader(store.path)
    assert settings.plugins.extension2reader == {"*.zarr/": "napari-ome-zarr"}
    viewer = make_napari_viewer()
    _drop(viewer, store.path)
    assert [layer.source.reader_plugin for layer in viewer.layers] == ["napari-ome-zarr"] * 3
    assert no_chooser == []


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_round_trip_through_napari_ome_zarr(make_napari_viewer, tmp_path, dtype) -> None:
    pytest.importorskip("napari_ome_zarr")
    store = _map(tmp_path / "map.zarr", dtype)
    viewer = make_napari_viewer()
    layers = viewer.open(store.path, plugin="napari-ome-zarr")
    assert [layer.name for layer in layers] == [f"map: {name}" for name in CLASSES]
    assert [layer.visible for layer in layers] == [True, True, False]  # omero "active"
    top = 255.0 if dtype == "uint8" else 1.0
    for k, layer in enumerate(layers):
        assert tuple(layer.colormap.colors[-1][:3]) == pytest.approx(class_rgb(k))  # omero colour
        assert tuple(layer.contrast_limits) == (0.0, top)  # omero window
        assert tuple(layer.scale) == (0.25, 0.25)
        assert tuple(str(u) for u in layer.units) == ("micrometer", "micrometer")
        assert layer.multiscale and len(layer.data) == 3
        np.testing.assert_allclose(_level0(layer) / top, store.read()[k], atol=0)
    # napari's channel split makes the first layer opaque; the others add up (as the overlay).
    assert [layer.blending for layer in layers[1:]] == ["additive", "additive"]


def test_the_map_reader_claims_only_napari_dense_maps(tmp_path) -> None:
    import zarr

    ours = _map(tmp_path / "ours.zarr").path
    zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=3).attrs["ome"] = {}
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.zarr").write_text("not a folder")
    assert is_probability_map(ours) and get_map_reader(str(ours)) is not None
    assert get_map_reader([str(ours)]) is not None
    assert get_map_reader([str(ours), str(ours)]) is None
    for other in ("plain.zarr", "folder", "file.zarr", "missing.zarr"):
        assert get_map_reader(str(tmp_path / other)) is None
    assert not remember_map_reader(tmp_path / "plain.zarr")
