"""napari conventions: plugin settings give the widget's defaults, Layers menu entries."""

from __future__ import annotations

import pytest

from napari_dense._napari import output_dialog as _output_dialog
from napari_dense._napari import settings as _settings
from napari_dense._napari.settings import RunSettings, run_settings


def test_declared_defaults_without_user_settings() -> None:
    settings = run_settings()
    assert settings == RunSettings(device="auto", precision="auto", tile=0, cache_folder="")


def test_the_widget_starts_from_the_plugin_settings(make_napari_viewer, monkeypatch) -> None:
    from napari_dense._napari.widget import DenseInferenceWidget

    chosen = RunSettings(device="cpu", precision="bfloat16", tile=256, cache_folder="")
    monkeypatch.setattr(_settings, "run_settings", lambda: chosen)
    monkeypatch.setattr("napari_dense._napari.widget.run_settings", lambda: chosen)
    widget = DenseInferenceWidget(make_napari_viewer())
    assert (widget._device.value, widget._precision.value, widget._tile.value) == (
        "cpu",
        "bfloat16",
        256,
    )
    # A setting the widget cannot offer (a GPU this machine lacks) falls back to auto.
    odd = RunSettings(device="cuda:7", precision="float64", tile=-3)
    monkeypatch.setattr("napari_dense._napari.widget.run_settings", lambda: odd)
    other = DenseInferenceWidget(make_napari_viewer())
    assert (other._device.value, other._precision.value, other._tile.value) == ("auto", "auto", 0)


def test_the_session_cache_lives_in_the_cache_folder_setting(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(_output_dialog, "_SESSION", [])
    monkeypatch.setattr(
        _settings, "run_settings", lambda: RunSettings(cache_folder=str(tmp_path / "cache"))
    )
    folder = _output_dialog.session_cache()
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("napari-dense-session-")
    assert _output_dialog.session_cache() == folder  # one per session


def test_the_manifest_declares_menus_and_settings() -> None:
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("napari-dense")
    menus = manifest.contributions.menus or {}
    commands = [item.command for item in menus["napari/layers/classify"]]
    assert commands == ["napari-dense.dense_widget", "napari-dense.compare_widget"]
    (config,) = manifest.contributions.configurations.values()
    assert set(config.properties) == {"device", "precision", "tile", "cache_folder"}
