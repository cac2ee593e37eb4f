"""``--scheduler local-cuda``: one worker per GPU, tested on CPU through the same code path."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import napari_dense as nd
from napari_dense.evaluate.models import fdfe15
from napari_dense.run import distributed
from napari_dense.run.to_zarr import predict_to_zarr

pytest.importorskip("distributed")

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without a GPU")


@no_gpu
def test_local_cuda_without_a_gpu_is_one_line_naming_local_n(tmp_path) -> None:
    assert distributed.cuda_devices() == []
    with pytest.raises(nd.InputError, match=r"no CUDA GPU is visible; use --scheduler local:N"):
        distributed.check_scheduler("local-cuda")
    image = tmp_path / "grey.npy"
    np.save(image, np.zeros((40, 40), np.float32))
    out = tmp_path / "m.zarr"
    result = subprocess.run(
        [sys.executable, "-m", "napari_dense.cli", "predict", "15x15", str(image), "-o",
         str(out), "--scheduler", "local-cuda"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "use --scheduler local:N" in result.stderr
    assert not out.exists()


def test_cuda_devices_follow_cuda_visible_devices(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5,7")
    assert distributed.cuda_devices() == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert distributed.cuda_devices() == ["0", "1"]
    assert distributed.check_scheduler("local-cuda") == "local-cuda"


def test_each_worker_is_pinned_to_its_own_device() -> None:
    client = distributed.connect("local-cuda", _devices=["0", "1"])
    try:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "1"]
        assert all(w["nthreads"] == 1 for w in client.scheduler_info()["workers"].values())
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def test_local_cuda_run_equals_single_process(tmp_path, monkeypatch) -> None:
    # Two "GPUs" on a CPU machine: the code path of local-cuda with device="cpu" workers.
    monkeypatch.setattr(distributed, "cuda_devices", lambda: ["", ""])
    torch.manual_seed(0)
    model = fdfe15(num_classes=2).eval()
    image = np.random.default_rng(0).random((48, 40), dtype=np.float32)
    local = predict_to_zarr(image, model, tmp_path / "local.zarr", patch_size=15, tile=16)
    ticks: list[int] = []
    cluster = predict_to_zarr(
        image, model, tmp_path / "cluster.zarr", patch_size=15, tile=16, device="cpu",
        scheduler="local-cuda", on_tile=lambda r: ticks.append(r.index),
    )  # fmt: skip
    assert cluster.is_complete() and sorted(ticks) == list(range(9))
    np.testing.assert_array_equal(cluster.read(), local.read())


@pytest.fixture(scope="module")
def threads_cluster():
    """One in-process cluster of two single-threaded workers, reached by its address."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


def test_iter_distributed_follows_a_lazy_order_and_closing_cancels_the_rest(
    tmp_path, threads_cluster
) -> None:
    from napari_dense.run.to_zarr import prepare_run

    torch.manual_seed(0)
    image = np.random.default_rng(1).random((96, 96), dtype=np.float32)
    predictor, store = prepare_run(
        image, fdfe15(num_classes=2).eval(), tmp_path / "m.zarr", patch_size=15, tile=16,
        device="cpu",
    )  # fmt: skip
    tasks = list(predictor.tasks())
    consumed: list = []

    def order():  # chosen as it is consumed, like the GUI's nearest-to-the-view queue
        for task in tasks:
            consumed.append(task)
            yield task

    tiles = distributed.iter_distributed(
        predictor, store, order(), threads_cluster, total=40, first_index=4, tiles_per_task=1
    )
    first = next(tiles)
    ahead = distributed.IN_FLIGHT_PER_WORKER * 2
    assert len(consumed) == ahead + 1  # submitted ahead, then one more as the first landed
    assert (first.index, first.total, first.probabilities) == (4, 40, None)
    assert (first.leading, first.tile) in consumed[:ahead]
    tiles.close()
    assert len(consumed) == ahead + 1 < len(tasks)  # nothing more was submitted
    done = store.completed_tiles()  # written by the workers before the tile was yielded
    assert (first.leading, first.tile.box) in done
    assert done <= {(leading, tile.box) for leading, tile in consumed}
