"""The Compare panel's Frontier view, driven as a user would (real viewer under Xvfb)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
pytest.importorskip("matplotlib")

from conftest import saved_model_file
from qtpy.QtCore import QTimer

import napari_dense as nd
from napari_dense._napari.compare_widget import CompareModesWidget
from napari_dense._napari.table import table_text
from napari_dense._napari.widget import DenseInferenceWidget, dense_widget_of
from napari_dense.evaluate.frontier import LEVELS, frontier_size
from napari_dense.evaluate.frontier import frontier as frontier_of
from napari_dense.evaluate.models import patchnet32


@pytest.fixture(scope="module")
def model_and_file(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    return saved_model_file(
        tmp_path_factory,
        lambda: patchnet32(num_classes=3),  # two max-pools: 3**2 = 9 settings
        32,
        3,
        ["a", "b", "c"],
        name="patchnet",
        activation="none",  # the network ends in a softmax
    )


@pytest.fixture
def panel(make_napari_viewer, model_and_file) -> CompareModesWidget:
    viewer = make_napari_viewer()
    image = np.random.default_rng(0).random((48, 56, 3), dtype=np.float32)
    viewer.add_image(image, name="cells", rgb=True)
    DenseInferenceWidget(viewer).load_model(model_and_file[1])
    panel = CompareModesWidget(viewer)
    panel._region.value = "whole image"
    panel._frontier._repeats.value = 1
    return panel


def test_frontier_fills_table_budget_picks_and_use_sets_the_switches(
    qtbot, panel, model_and_file
) -> None:
    model, _ = model_and_file
    view = panel._frontier
    dense = dense_widget_of(panel._viewer)
    layers = [layer.name for layer in nd.explain(model, 32).layers]
    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    seen: list[str] = []
    worker = view.run()
    assert worker is not None
    worker.yielded.connect(lambda row: seen.append(row.label))
    qtbot.waitUntil(lambda: view._worker is None, timeout=60_000)
    timer.stop()
    frontier = view.frontier
    assert frontier is not None

    # One table row per setting: every combination of the three levels for the two layers.
    total = frontier_size(model, 32)
    assert total == len(LEVELS) ** 2 == len(frontier.rows) == len(seen)
    assert view._bar.value == view._bar.max == total
    expected = {tuple(choice) for choice in itertools.product(LEVELS, repeat=len(layers))}
    assert {tuple(row.sampling[name] for name in layers) for row in frontier.rows} == expected
    table = table_text(view._table)
    assert [r[0] for r in table] == [row.label for row in frontier.rows]  # fastest first
    # Assembled as napari_dense.evaluate.frontier.frontier() assembles its rows.
    image = panel._viewer.layers["cells"].data
    reference = frontier_of(model, image, 32, activation=None, repeats=1)
    assert (frontier.layers, frontier.image_shape, frontier.device, frontier.search) == (
        reference.layers,
        (48, 56),
        reference.device,
        reference.search,
    )
    assert reference.image_shape == (48, 56)
    advanced = frontier.advanced
    assert advanced.class_change == 0 and table[frontier.rows.index(advanced)][3] == "1.00x"
    # Pareto marks: exactly the rows no other row beats in both time and class change.
    for row, cells in zip(frontier.rows, table, strict=True):
        dominated = any(
            o.seconds <= row.seconds
            and o.class_change <= row.class_change
            and (o.seconds < row.seconds or o.class_change < row.class_change)
            for o in frontier.rows
        )
        assert row.pareto is not dominated and (cells[-1] == "●") is row.pareto

    # The budget selects the cheapest qualifying row, as Frontier.pick does.
    for budget in (1.0, 0.0, 100.0, 20.0):
        view._budget.value = budget
        picked = frontier.pick(budget / 100)
        assert view.selected_row() == picked
        assert view._table.currentRow() == frontier.rows.index(picked)
        assert picked.label in view._picked.value
    assert view._axes.collections, "the plot shows the settings"

    # "Use this setting" sets the Dense inference switches to the selected row.
    view._budget.value = 100.0  # the fastest row of all
    fastest = min(frontier.rows, key=lambda row: row.seconds)
    view._use_button.clicked.emit()
    assert dense.sampling() == fastest.sampling
    other = next(row for row in frontier.rows if len(set(row.sampling.values())) > 1)
    view._table.selectRow(frontier.rows.index(other))  # a row the user clicks
    assert view.use_selected() == other
    assert dense.sampling() == other.sampling and dense._preset.value == "Custom"

    gaps = np.diff(ticks) * 1000
    assert len(gaps) > 5
    print(f"\nevent-loop latency during the frontier: max {gaps.max():.0f} ms over {len(gaps)}")


def test_cancel_stops_after_the_current_setting_and_a_rerun_completes(qtbot, panel) -> None:
    view = panel._frontier
    worker = view.run()
    assert worker is not None
    worker.yielded.connect(lambda _: view.cancel())
    qtbot.waitUntil(lambda: view._worker is None, timeout=60_000)
    assert 1 <= len(view._rows) < len(LEVELS) ** 2 and len(table_text(view._table)) == len(
        view._rows
    )
    assert view.frontier is None and view.selected_row() is None
    assert "cancelled" in view._status.value
    assert view._compute_button.enabled and not view._cancel_button.enabled
    assert not view._use_button.enabled
    assert view.run() is not None  # usable again
    qtbot.waitUntil(lambda: view._worker is None, timeout=60_000)
    assert view.frontier is not None and len(table_text(view._table)) == len(LEVELS) ** 2


@pytest.fixture
def messages(monkeypatch) -> list[str]:
    shown: list[str] = []
    monkeypatch.setattr("napari_dense._napari.frontier_view.show_error", shown.append)
    monkeypatch.setattr("napari_dense._napari.widget.show_error", shown.append)  # missing inputs
    return shown


def test_without_a_model_the_user_is_told(make_napari_viewer, messages) -> None:
    panel = CompareModesWidget(make_napari_viewer())
    assert panel._frontier.run() is None
    assert messages == ["napari-dense: choose an image layer and load a model in Dense inference"]


def test_a_grey_image_for_an_rgb_model_is_refused_as_run_refuses_it(panel, messages) -> None:
    view, viewer = panel._frontier, panel._viewer
    grey = viewer.add_image(np.zeros((48, 56), np.float32), name="grey")
    dense_widget_of(viewer)._image.value = grey  # a grey image for an RGB model
    assert view.run() is None  # the channel checks of a run, before any worker starts
    assert len(messages) == 1 and "expects 3 channel(s)" in messages[0], messages
    assert view.frontier is None and view._compute_button.enabled


def test_field_of_view_measures_only_the_visible_region(
    qtbot, make_napari_viewer, model_and_file
) -> None:
    viewer = make_napari_viewer(show=True)  # drawn: napari updates the corners it shows
    image = np.random.default_rng(1).random((300, 320, 3), dtype=np.float32)
    layer = viewer.add_image(image, name="cells", rgb=True)
    DenseInferenceWidget(viewer).load_model(model_and_file[1])
    panel = CompareModesWidget(viewer)
    panel._region.value = "field of view"
    panel._frontier._repeats.value = 1
    viewer.camera.center = (150, 160)
    viewer.camera.zoom = 8 * viewer.camera.zoom  # a 1/8 of the image in view
    layer.refresh()
    qtbot.waitUntil(lambda: np.ptp(layer.corner_pixels[:, 0]) < 200, timeout=10_000)
    (y0, x0), (y1, x1) = np.asarray(layer.corner_pixels, dtype=int)[:, :2]
    assert panel._frontier.run() is not None
    qtbot.waitUntil(lambda: panel._frontier._worker is None, timeout=120_000)
    frontier = panel._frontier.frontier
    assert frontier is not None
    height, width = frontier.image_shape
    assert 64 <= height < 300 and 64 <= width < 320  # the view, not the whole image
    assert height == max(y1 - y0, 64) and width == max(x1 - x0, 64)
