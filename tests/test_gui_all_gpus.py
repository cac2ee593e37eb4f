"""The device list's "all GPUs": the GUI's live run over one dask worker per GPU.

On a CPU machine two "GPUs" are faked (``cuda_devices`` gives two empty
``CUDA_VISIBLE_DEVICES``): the widget then takes the code path of ``--scheduler local-cuda``
with CPU workers. Real viewers under Xvfb (pytest-xvfb). No timings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
pytest.importorskip("distributed")

from conftest import saved_model_file

from napari_dense._napari.live_run import ALL_GPUS, run_device, run_scheduler
from napari_dense._napari.widget import DenseInferenceWidget, device_choices
from napari_dense.evaluate.models import fdfe15
from napari_dense.io.store import ProbabilityStore
from napari_dense.run import distributed
from napari_dense.run.engine import TileResult

CLASSES = ["nucleus", "background"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    return saved_model_file(
        tmp_path_factory, lambda: fdfe15(num_classes=2), 15, 1, CLASSES, name="fdfe"
    )


@pytest.fixture
def two_gpus(monkeypatch, tmp_path) -> list:
    """Two faked GPUs (CPU workers); the clients the run connects are recorded."""
    monkeypatch.setattr(distributed, "cuda_devices", lambda: ["", ""])
    monkeypatch.setattr("napari_dense._napari.output_dialog._SESSION", [tmp_path / "cache"])
    (tmp_path / "cache").mkdir()
    clients: list = []
    connect = distributed.connect

    def recording(scheduler: str, **kwargs: object) -> object:
        clients.append(connect(scheduler, **kwargs))
        return clients[-1]

    monkeypatch.setattr(distributed, "connect", recording)
    return clients


def _widget(viewer, model_file, image: np.ndarray, output: Path) -> DenseInferenceWidget:
    viewer.add_image(image, name="grey")
    widget = DenseInferenceWidget(viewer)
    widget.load_model(model_file[1])
    widget._device.value = ALL_GPUS
    widget._output.value = output
    return widget


def test_all_gpus_is_offered_with_two_or_more_gpus(monkeypatch) -> None:
    monkeypatch.setattr(distributed, "cuda_devices", lambda: ["0"])
    assert ALL_GPUS not in device_choices()
    monkeypatch.setattr(distributed, "cuda_devices", lambda: ["0", "1"])
    assert ALL_GPUS in device_choices() and device_choices()[-1] == "cpu"
    assert (run_device(ALL_GPUS), run_scheduler(ALL_GPUS)) == ("auto", "local-cuda")
    assert (run_device("cuda:1"), run_scheduler("cuda:1")) == ("cuda:1", None)


def test_all_gpus_run_equals_a_single_process_run(
    qtbot, make_napari_viewer, model_file, two_gpus, tmp_path
) -> None:
    image = np.random.default_rng(0).random((300, 1100), np.float32)
    widget = _widget(make_napari_viewer(), model_file, image, tmp_path / "gpus.zarr")
    widget._tile.value = 128
    landed: list[TileResult] = []
    worker = widget.run()
    worker.yielded.connect(lambda item: isinstance(item, TileResult) and landed.append(item))
    qtbot.waitUntil(lambda: widget._worker is None, timeout=180_000)
    gpus = widget._store
    assert gpus.is_complete() and not gpus.holds_lock and widget._status.value.startswith("done")
    (client,) = two_gpus
    assert client.status == "closed" and client.cluster.status.name == "closed"
    # The same widget, run in this process.
    widget._device.value, widget._output.value = "cpu", tmp_path / "local.zarr"
    widget.run()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=180_000)
    local = widget._store
    assert local.is_complete() and len(two_gpus) == 1
    assert gpus.pyramid_levels == local.pyramid_levels == 2  # levels added as tiles landed
    for level in range(3):
        np.testing.assert_array_equal(gpus.read(level), local.read(level))
    tiles = len(local.completed_tiles())
    assert sorted(r.index for r in landed) == list(range(tiles)) and tiles > 2 * 2
    # Computed and written by the workers: no probabilities came back to this process.
    assert {r.total for r in landed} == {tiles} and all(r.probabilities is None for r in landed)


def test_cancelling_all_gpus_cancels_the_pending_tiles_and_closes_the_cluster(
    qtbot, make_napari_viewer, model_file, two_gpus, tmp_path
) -> None:
    image = np.random.default_rng(1).random((256, 256), np.float32)
    widget = _widget(make_napari_viewer(), model_file, image, tmp_path / "gpus.zarr")
    widget._tile.value = 16  # 256 tiles, one task each
    worker = widget.run()
    cancelled: list[bool] = []

    def cancel(item: object) -> None:
        if isinstance(item, TileResult) and not cancelled:
            cancelled.append(True)
            widget.cancel()

    worker.yielded.connect(cancel)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=180_000)
    assert cancelled and worker.abort_requested
    (client,) = two_gpus
    # Closed in the background (the GUI thread does not wait for the workers to stop).
    qtbot.waitUntil(lambda: client.cluster.status.name == "closed", timeout=30_000)
    assert client.status == "closed"
    # The workers are gone: what the store holds is final. Only the tiles yielded and the
    # few submitted ahead (two per worker) were computed; the rest were cancelled.
    store = ProbabilityStore.open(widget._store.path)
    kept = len(store.completed_tiles())
    assert not store.is_complete() and not store.lock_owner()
    assert 1 <= widget._tiles_done <= kept <= widget._tiles_done + 2 * 2 < 256


def test_all_gpus_plans_estimates_and_compares_in_process_with_auto(
    qtbot, make_napari_viewer, model_file, two_gpus, tmp_path
) -> None:
    from napari_dense._napari.compare_widget import CompareModesWidget

    viewer = make_napari_viewer()
    widget = _widget(viewer, model_file, np.zeros((40, 40), np.float32), tmp_path / "o.zarr")
    viewer.window.add_dock_widget(widget)  # the Compare panel finds it
    assert widget.device() == "auto"  # what the estimate, Compare and Frontier use here
    panel = CompareModesWidget(viewer)
    panel._region.value = "whole image"
    assert panel.run() is not None
    qtbot.waitUntil(lambda: panel.comparison is not None, timeout=120_000)
    assert panel.comparison.device == "cpu" and not two_gpus  # no cluster for a comparison
