"""Back ends wired into the GUI: the physical space of runs and saved maps.

Real viewers under Xvfb (pytest-xvfb); dialogs never open (outputs go to fresh paths).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from conftest import saved_model_file

from napari_dense._napari.widget import DenseInferenceWidget
from napari_dense._napari.writer import write_probability_maps
from napari_dense.evaluate.models import fdfe15
from napari_dense.io.physical import PhysicalSpace
from napari_dense.io.store import ProbabilityStore

CLASSES = ["nucleus", "stain", "background"]
MICRONS = ("micrometer", "micrometer")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return saved_model_file(
        tmp_path_factory,
        lambda: fdfe15(num_classes=3),
        15,
        1,
        CLASSES,
        name="fdfe",
        activation="softmax",
    )[1]


def _run(qtbot, viewer, model_file: Path, output: Path, level: int = 0) -> DenseInferenceWidget:
    widget = DenseInferenceWidget(viewer)
    widget.load_model(model_file)
    widget._output.value = output
    if level:
        widget._level.value = level
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert widget._store is not None and widget._store.is_complete()
    return widget


def _layer_space(layer) -> tuple[tuple[float, ...], tuple[float, ...], tuple[str, ...]]:
    return (
        tuple(float(v) for v in layer.scale[-2:]),
        tuple(float(v) for v in layer.translate[-2:]),
        tuple(str(u) for u in layer.units[-2:]),
    )


def test_run_store_and_class_layers_carry_the_input_layers_space(
    qtbot, make_napari_viewer, model_file, tmp_path
) -> None:
    viewer = make_napari_viewer()
    image = np.random.default_rng(0).random((40, 50), np.float32)
    viewer.add_image(image, name="grey", scale=(0.25, 0.25), translate=(10, 20), units="µm")
    widget = _run(qtbot, viewer, model_file, tmp_path / "map.ome.zarr")
    expected = PhysicalSpace(scale=(0.25, 0.25), translation=(10.0, 20.0), units=MICRONS)
    assert widget._store.level_space(0) == expected
    assert ProbabilityStore.open(widget._store.path).space == expected
    assert len(widget._output_layers) == len(CLASSES)
    for layer in widget._output_layers:
        assert _layer_space(layer) == ((0.25, 0.25), (10.0, 20.0), MICRONS)

    saved = tmp_path / "saved.ome.zarr"
    tuples = [layer.as_layer_data_tuple() for layer in widget._output_layers]
    assert write_probability_maps(str(saved), tuples) == [str(saved)]
    reopened = ProbabilityStore.open(saved)
    assert reopened.space == expected
    assert reopened.class_names == CLASSES
    np.testing.assert_allclose(reopened.read(0), widget._store.read(0), atol=0)


def test_run_on_a_coarser_level_carries_that_levels_transform(
    qtbot, make_napari_viewer, model_file, tmp_path
) -> None:
    viewer = make_napari_viewer()
    fine = np.random.default_rng(1).random((64, 80), np.float32)
    coarse = fine.reshape(32, 2, 40, 2).mean(axis=(1, 3))
    viewer.add_image(
        [fine, coarse], multiscale=True, name="grey", scale=(0.5, 0.5), translate=(10, 20)
    )
    widget = _run(qtbot, viewer, model_file, tmp_path / "map.ome.zarr", level=1)
    assert widget._store.read(0).shape[-2:] == (32, 40)
    # Level 1 pixels are 2x larger, their centres half a level-0 pixel further.
    space = widget._store.level_space(0)
    assert space.scale == (1.0, 1.0) and space.translation == (10.25, 20.25)
    assert space.units == (None, None)  # napari's default "pixel": no physical unit
    for layer in widget._output_layers:
        assert _layer_space(layer)[:2] == ((1.0, 1.0), (10.25, 20.25))


def test_writer_keeps_a_plain_layers_space(tmp_path) -> None:
    probabilities = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    meta = {"name": "p", "scale": [2.0, 3.0], "translate": [-1.0, 5.0], "units": ("nm", "nm")}
    write_probability_maps(str(tmp_path / "p.ome.zarr"), [(probabilities, meta, "image")])
    store = ProbabilityStore.open(tmp_path / "p.ome.zarr")
    assert store.space == PhysicalSpace(
        scale=(2.0, 3.0), translation=(-1.0, 5.0), units=("nanometer", "nanometer")
    )
    assert store.level_space(0).napari_kwargs()["units"] == ("nanometer", "nanometer")


# -- certification and the Compare panel ---------------------------------------------------------


def test_model_info_shows_the_conversions_self_check(make_napari_viewer, model_file) -> None:
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((40, 40), np.float32), name="grey")
    widget = DenseInferenceWidget(viewer)
    widget.load_model(model_file)
    verified = widget.plan().verified
    assert verified is not None and verified.passed and verified.positions > 0
    info = widget._model_info.native
    assert (
        f"checked: max |Δ| {verified.max_abs_diff:.1g} at {verified.positions} positions"
        in info.text()
    )
    assert verified.summary() in info.toolTip()


def _softmax(scores: np.ndarray) -> np.ndarray:
    exp = np.exp(scores - scores.max(0))
    return exp / exp.sum(0)


def test_compare_modes_differences_are_in_probabilities_with_the_activation() -> None:
    from napari_dense.evaluate.compare import compare_modes
    from napari_dense.run.predict import predict

    torch.manual_seed(0)
    model = fdfe15(num_classes=3).eval()
    image = np.random.default_rng(2).random((32, 40), np.float32)
    kwargs = {"modes": ("simple",), "device": "cpu", "oracle_pixels": 20}
    scores = compare_modes(image, model, 15, **kwargs)
    probabilities = compare_modes(image, model, 15, activation="softmax", **kwargs)
    simple = predict(image, model, 15, mode="simple", device="cpu")
    advanced = predict(image, model, 15, device="cpu")
    expected_scores = np.abs(simple - advanced).max()
    expected_p = np.abs(_softmax(simple) - _softmax(advanced)).max()
    assert scores.activation is None and scores.delta_unit == "scores"
    assert probabilities.activation == "softmax" and probabilities.delta_unit == "probabilities"
    np.testing.assert_allclose(scores.results[0].max_abs_diff, expected_scores, rtol=1e-5)
    np.testing.assert_allclose(probabilities.results[0].max_abs_diff, expected_p, rtol=1e-5)
    assert expected_p != pytest.approx(expected_scores, rel=1e-3)  # the two really differ
    assert "(probabilities)" in probabilities.to_markdown()
    assert "(scores)" in scores.to_markdown()
    assert probabilities.verified is not None
    assert probabilities.verified.summary() in probabilities.to_markdown()


def test_compare_modes_refuses_an_unknown_activation_before_running() -> None:
    from napari_dense.errors import InputError
    from napari_dense.evaluate.compare import compare_modes

    with pytest.raises(InputError, match="activation must be 'softmax', 'sigmoid' or None"):
        compare_modes(np.zeros((20, 20), np.float32), torch.nn.Identity(), 15, activation="relu")


def test_heap_peak_counts_numpy_and_torch_allocations_freed_inside() -> None:
    import time

    from napari_dense.evaluate.compare import HeapPeak

    with HeapPeak() as heap:
        kept = torch.ones(4 * 2**20 // 4)  # 4 MiB from torch's CPU allocator, alive at exit
    assert heap.bytes >= 4 * 2**20
    del kept
    with HeapPeak() as heap:
        block = torch.ones(4 * 2**20 // 4)  # freed inside, after living past a few samples
        time.sleep(0.02)
        del block
    assert heap.bytes >= 4 * 2**20
    with HeapPeak() as heap:
        array = np.ones(2**20 // 8)  # 1 MiB from numpy, freed at once: tracemalloc's peak
        del array
    assert heap.bytes >= 2**20


def test_compare_panel_shows_probabilities_memory_and_the_certificate(
    qtbot, make_napari_viewer, model_file
) -> None:
    from napari_dense._napari.compare_widget import CompareModesWidget
    from napari_dense._napari.table import column_names, table_text

    viewer = make_napari_viewer()
    image = np.random.default_rng(3).random((48, 48), np.float32)
    viewer.add_image(image, name="grey", scale=(0.5, 0.5), translate=(3, 4), units="µm")
    dense = DenseInferenceWidget(viewer)
    dense.load_model(model_file)
    viewer.window.add_dock_widget(dense)  # the panel finds the Dense inference widget
    panel = CompareModesWidget(viewer)
    panel._region.value = "whole image"
    assert panel.run() is not None
    qtbot.waitUntil(lambda: panel.comparison is not None, timeout=120_000)
    comparison = panel.comparison
    assert comparison.activation == "softmax"  # the model file's
    columns = column_names(panel._table)
    # Probabilities, host memory, no GPU column on CPU; every number shown as given (3 digits).
    assert columns == ["mode", "stride", "time s", "Mpx/s", "host MiB", "max |Δp|", "mean |Δp|"]
    shown = table_text(panel._table)
    assert [row[0] for row in shown] == [r.mode for r in comparison.results]
    assert all("e" not in cell and len(cell.replace(".", "").lstrip("0")) <= 3
               for row in shown for cell in row[2:]), shown  # fmt: skip
    assert all(r.peak_host_bytes > 0 for r in comparison.results)
    assert all(0 <= r.max_abs_diff <= 1 for r in comparison.results)
    assert comparison.verified is not None
    assert comparison.verified.summary() in panel._exactness.value
    difference = viewer.layers["|simple − advanced| (napari-dense)"]
    assert _layer_space(difference) == ((0.5, 0.5), (3.0, 4.0), MICRONS)
