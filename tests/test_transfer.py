"""Tiles to the device and back (napari_dense.run._transfer), on CPU with a fake stream backend.

The CUDA backend itself runs in tests/test_cuda.py (skipped without a GPU).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import napari_dense as nd
from napari_dense.evaluate.models import fdfe15
from napari_dense.io.store import _to_stored
from napari_dense.run._transfer import (
    StagingPool,
    TransferPipeline,
    as_tensor,
    check_output_dtype,
    pipelined,
    to_float32,
    to_output,
    transfer_dtype,
)
from napari_dense.run.device import (
    clear_compiled,
    compiled_network,
    cuda_settings,
    is_warm,
    mark_warm,
    resolve_precision,
)
from napari_dense.run.engine import iter_predict, make_predictor


class FakeEvent:
    def __init__(self, log: list, number: int):
        self.log, self.number, self.stream = log, number, None

    def record(self, stream=None) -> None:
        self.stream = stream
        self.log.append(("record", stream, self.number))

    def synchronize(self) -> None:
        self.log.append(("synchronize", self.number))

    def elapsed_time(self, end: FakeEvent) -> float:
        return 1000.0 * (end.number - self.number)  # milliseconds


class FakeBackend:
    """Streams are names; every operation is logged in order."""

    def __init__(self):
        self.log: list = []
        self.current = None
        self._numbers = itertools.count()
        self._streams = iter(["in", "compute", "out"])

    def stream(self) -> str:
        return next(self._streams)

    @contextmanager
    def use(self, stream: str):
        self.current = stream
        self.log.append(("use", stream))
        yield
        self.current = None

    def event(self, timing: bool = False) -> FakeEvent:
        return FakeEvent(self.log, next(self._numbers))

    def wait(self, stream: str, event: FakeEvent) -> None:
        self.log.append(("wait", stream, event.number))

    def keep_alive(self, tensor: torch.Tensor, stream: str) -> None:
        self.log.append(("keep_alive", stream))


# ---------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    ("stored", "travels"),
    [("uint8", "uint8"), ("uint16", "uint16"), ("int16", "int16"), ("float16", "float16"),
     ("float32", "float32"), ("bool", "bool"), ("float64", "float32"), ("int32", "float32"),
     ("uint32", "float32"), ("int64", "float32")],
)  # fmt: skip
def test_windows_travel_as_stored_only_where_exact(stored: str, travels: str) -> None:
    assert transfer_dtype(stored) == np.dtype(travels)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int8", "float16", "bool"])
def test_float32_on_the_device_equals_the_host_conversion(dtype: str) -> None:
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    if info is not None:
        values = np.array([info.min, info.min + 1, -1 if info.min else 1, 0, 32767 % info.max,
                           info.max - 1, info.max], dtype=dtype)  # fmt: skip
    elif dtype == "bool":
        values = np.array([True, False, True])
    else:
        values = np.array([-65504, -1.5, 0, 6e-8, 0.333, 65504], dtype=dtype)
    out = to_float32(as_tensor(values), values.dtype)
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), values.astype(np.float32))


def test_results_in_the_store_dtype_equal_the_store_conversion() -> None:
    # Exact halves (k + 0.5) / 255 are where rounding modes differ; also outside 0..1.
    halves = (np.arange(256, dtype=np.float32) + 0.5) / 255
    rng = np.random.default_rng(0)
    values = np.concatenate([halves, rng.random(1000, dtype=np.float32), [-0.1, 1.2, 0, 1]])
    values = values.astype(np.float32).reshape(1, 1, -1)
    for dtype in ("uint8", "float16"):
        out = to_output(torch.from_numpy(values), dtype).numpy()
        assert out.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(out, _to_stored(values, np.dtype(dtype)))
    assert to_output(torch.from_numpy(values), "float32").numpy() is not None
    with pytest.raises(nd.InputError, match="output_dtype must be one of"):
        check_output_dtype("int8")


# ---------------------------------------------------------------------- buffers and streams


def test_the_pool_reuses_its_buffers_round_robin_and_refuses_a_held_slot() -> None:
    pool = StagingPool(2, (1, 4, 5), torch.uint8, torch.device("cpu"))
    first, second = pool.acquire(), pool.acquire()
    assert (first.index, second.index) == (0, 1)
    pointers = [s.host_in.data_ptr() for s in (first, second)]
    with pytest.raises(RuntimeError, match="staging slot 0 reused while a tile still holds it"):
        pool.acquire()
    pool.release(first)
    again = pool.acquire()
    assert again is first and again.host_in.data_ptr() == pointers[0]
    assert not pool.pin  # pinned only for CUDA


def test_the_pipeline_orders_copies_and_compute_by_events() -> None:
    backend = FakeBackend()
    pool = StagingPool(2, (1, 3, 3), torch.uint8, torch.device("cpu"))
    pipeline = TransferPipeline(pool, backend)
    windows = [np.full((1, 3, 3), k, dtype=np.uint8) for k in range(3)]

    def step(x: torch.Tensor) -> torch.Tensor:
        backend.log.append(("step", backend.current, int(x[0, 0, 0])))
        return x.to(torch.float32) * 2

    results = list(pipelined(windows, lambda w: pipeline.launch(w, step), pipeline.finish))
    for k, (result, seconds) in enumerate(results):
        np.testing.assert_array_equal(result, 2 * windows[k].astype(np.float32))
        assert seconds > 0  # from the timing events
    log = backend.log
    steps = [i for i, entry in enumerate(log) if entry[0] == "step"]
    assert [log[i][1:] for i in steps] == [("compute", 0), ("compute", 1), ("compute", 2)]
    # Double buffering: tile 1 is launched (its step queued) before tile 0's result is awaited.
    first_wait_for_a_result = next(i for i, e in enumerate(log) if e[0] == "synchronize")
    assert steps[1] < first_wait_for_a_result < steps[2]
    # Tile 2 reuses slot 0: its copy-in waits for tile 0's compute to have read the buffer.
    records = [e for e in log if e[0] == "record"]
    computed_0 = [e for e in records if e[1] == "compute"][2][2]  # started, ended, computed
    assert ("wait", "in", computed_0) in log
    # Every compute waits for its copy-in, every copy-out for its compute.
    copied_in = [e[2] for e in records if e[1] == "in"]
    assert all(("wait", "compute", number) in log for number in copied_in)
    assert log.count(("keep_alive", "out")) == 3


def test_pipelined_depth_one_finishes_each_item_before_the_next() -> None:
    order: list[str] = []

    def launch(item: int) -> int:
        order.append(f"launch {item}")
        return item

    def finish(item: int) -> int:
        order.append(f"finish {item}")
        return item

    assert list(pipelined(range(3), launch, finish, depth=1)) == [0, 1, 2]
    assert order == ["launch 0", "finish 0", "launch 1", "finish 1", "launch 2", "finish 2"]
    order.clear()
    assert list(pipelined(range(3), launch, finish, depth=2)) == [0, 1, 2]
    assert order == ["launch 0", "launch 1", "finish 0", "launch 2", "finish 1", "finish 2"]


def test_a_failing_step_releases_its_slot() -> None:
    pipeline = TransferPipeline(
        StagingPool(2, (1, 2, 2), torch.uint8, torch.device("cpu")), FakeBackend()
    )

    def out_of_memory(x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(torch.OutOfMemoryError):
        pipeline.launch(np.zeros((1, 2, 2), np.uint8), out_of_memory)
    assert not any(slot.busy for slot in pipeline.pool.slots)


# ---------------------------------------------------------------------- precision, compile cache


def test_precision_auto_is_float32_off_cuda_and_strict_float32_turns_tf32_off() -> None:
    assert resolve_precision("auto", torch.device("cpu")) == "float32"
    assert resolve_precision("bfloat16", torch.device("cpu")) == "bfloat16"
    with pytest.raises(nd.InputError, match="precision must be one of"):
        resolve_precision("fp8", torch.device("cpu"))
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark)
    matmul.allow_tf32 = cudnn.allow_tf32 = True
    try:
        with cuda_settings(torch.device("cuda"), "float32"):  # flags only: no GPU needed
            assert (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark) == (False, False, True)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, True)
        with cuda_settings(torch.device("cuda"), "bfloat16"):
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, True)
        with cuda_settings(torch.device("cpu"), "float32"):
            assert matmul.allow_tf32  # nothing changes off CUDA
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = before


def test_a_network_compiles_once_per_content_precision_and_device() -> None:
    clear_compiled()
    torch.manual_seed(0)
    model = fdfe15(num_classes=2).eval()
    cpu = torch.device("cpu")
    first, key = compiled_network(nd.densify(model, 15), cpu, "float32")
    again, same = compiled_network(nd.densify(model, 15), cpu, "float32")  # a new conversion
    assert again is first and same == key
    assert compiled_network(nd.densify(model, 15), cpu, "bfloat16")[0] is not first
    assert compiled_network(nd.densify(model, 15), cpu, "float32", "default")[0] is not first
    torch.manual_seed(1)
    other = nd.densify(fdfe15(num_classes=2).eval(), 15)
    assert compiled_network(other, cpu, "float32")[0] is not first
    assert mark_warm(key, (1, 30, 30)) and not mark_warm(key, (1, 30, 30))
    assert is_warm(key, (1, 30, 30)) and not is_warm(key, (1, 40, 40))
    clear_compiled()


# ---------------------------------------------------------------------- the engine on CPU


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(3)
    return fdfe15(num_classes=3).eval()


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_integer_windows_travel_as_stored_with_bit_identical_results(model, dtype) -> None:
    top = 255 if dtype == "uint8" else 65535
    image = np.random.default_rng(0).integers(0, top + 1, (37, 41)).astype(dtype)
    norm = {"scale": 1 / top, "mean": [0.5], "std": [0.25]}
    predictor = make_predictor(image, model, 15, normalisation=norm, tile=16, device="cpu")
    tile = next(iter(predictor.plan.tiles()))
    assert predictor.read((), tile).dtype == np.dtype(dtype)
    as_float = image.astype(np.float32)  # what the engine read before: float32 windows
    for ours, before in zip(
        iter_predict(image, model, 15, normalisation=norm, tile=16, device="cpu"),
        iter_predict(as_float, model, 15, normalisation=norm, tile=16, device="cpu"),
        strict=True,
    ):
        assert ours.probabilities.dtype == np.float32
        np.testing.assert_array_equal(ours.probabilities, before.probabilities)


def test_output_dtype_and_precision_auto_on_cpu(model) -> None:
    image = np.random.default_rng(1).random((30, 30), dtype=np.float32)
    options = {"activation": "softmax", "tile": 16, "device": "cpu"}
    exact = [r.probabilities for r in iter_predict(image, model, 15, **options)]
    auto = make_predictor(image, model, 15, precision="auto", **options)
    assert auto.precision == "float32" and auto.warm_up() == 0.0
    for dtype in ("float16", "uint8"):
        predictor = make_predictor(image, model, 15, output_dtype=dtype, **options)
        results = [r.probabilities for r in predictor.run(predictor.tasks())]
        for got, want in zip(results, exact, strict=True):
            assert got.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(got, _to_stored(want, np.dtype(dtype)))
    with pytest.raises(nd.InputError, match="output_dtype must be one of"):
        make_predictor(image, model, 15, output_dtype="int32", **options)


def test_float16_windows_are_still_checked_for_nan(model) -> None:
    image = np.zeros((30, 30), dtype=np.float16)
    image[20, 3] = np.nan
    with pytest.raises(nd.InputError, match="NaN/infinite"):
        list(iter_predict(image, model, 15, tile=16, device="cpu"))
    zeroed = list(iter_predict(image, model, 15, tile=16, device="cpu", non_finite="zero"))
    assert all(np.isfinite(r.probabilities).all() for r in zeroed)


def test_the_engine_through_the_pipeline_equals_its_compute(model) -> None:
    # The CUDA path's order (copy in, compute, copy out, two tiles in flight) with CPU tensors.
    image = np.random.default_rng(2).integers(0, 256, (40, 37)).astype(np.uint8)
    norm = {"scale": 1 / 255, "mean": [0.5], "std": [0.25]}
    predictor = make_predictor(image, model, 15, normalisation=norm, activation="softmax",
                               tile=16, device="cpu", output_dtype="uint8")  # fmt: skip
    shape = (1, *predictor.plan.input_shape)
    backend = FakeBackend()
    pipeline = TransferPipeline(StagingPool(2, shape, torch.uint8, torch.device("cpu")), backend)

    def launch(task):
        return predictor._launch(pipeline, predictor.read(*task), task[1], task)

    results = list(pipelined(predictor.tasks(), launch, lambda f: (f.context, pipeline.finish(f))))
    assert len(results) == 9 and backend.log.count(("keep_alive", "out")) == 9
    for (leading, tile), (got, _) in results:
        assert got.dtype == np.uint8 and got.shape == (3, *tile.shape)
        np.testing.assert_array_equal(got, predictor.compute(predictor.read(leading, tile), tile))
