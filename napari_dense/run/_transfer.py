"""Moving tiles to the device and back: stored dtypes, reused pinned buffers, CUDA streams.

Pure plumbing, no knowledge of networks (the engine passes the compute step in):

- :func:`transfer_dtype` / :func:`to_float32`: a window travels as its stored dtype (uint8 is a
  quarter of float32's bytes) and becomes float32 on the device, exactly (every uint8/uint16/
  int16/float16 value is a float32).
- :func:`to_output`: the result comes back in the store's dtype (float16, or uint8 as
  ``round(p * 255)``, exactly as :mod:`napari_dense.io.store` converts on the host).
- :class:`StagingPool`: ``count`` slots, each a (pinned on CUDA) host input buffer, a device input
  buffer and a host output buffer, allocated once per run and reused tile after tile.
- :class:`TransferPipeline`: per tile, the host-to-device copy on one stream, the compute on a
  second, the device-to-host copy on a third, ordered by events; :func:`pipelined` keeps two
  tiles in flight (double buffering), so the copies of one tile overlap the compute of the other.

The stream backend is injectable (:class:`CudaBackend` on GPUs; the tests pass a recording fake
with CPU tensors), so the order of operations is tested without a GPU.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from napari_dense.errors import InputError

__all__ = [
    "OUTPUT_DTYPES",
    "CudaBackend",
    "InFlight",
    "StagingPool",
    "TransferPipeline",
    "check_output_dtype",
    "pipelined",
    "to_float32",
    "to_output",
    "transfer_dtype",
]

#: What the engine can return: float32 (default), or the store's reduced types.
OUTPUT_DTYPES = ("float32", "float16", "uint8")
#: Stored types that travel as they are (every value exact in float32); others become float32
#: on the host, as before.
_TRAVELS_AS_STORED = frozenset("u1 i1 u2 i2 f2 f4 b1".split())

T = TypeVar("T")
H = TypeVar("H")


def transfer_dtype(stored: np.dtype[Any] | str) -> np.dtype[Any]:
    """The dtype a window is read and copied to the device in: the stored one when exact."""
    stored = np.dtype(stored)
    code = f"{stored.kind}{stored.itemsize}"
    return stored if code in _TRAVELS_AS_STORED else np.dtype(np.float32)


def as_tensor(window: np.ndarray) -> torch.Tensor:
    """A host tensor sharing ``window``'s memory; uint16 travels as its int16 bit pattern."""
    if window.dtype == np.uint16:
        window = window.view(np.int16)
    elif window.dtype == np.bool_:
        window = window.view(np.uint8)
    return torch.from_numpy(window)


def to_float32(x: torch.Tensor, stored: np.dtype[Any] | str) -> torch.Tensor:
    """``x`` (from :func:`as_tensor`) as float32 values equal to the stored ones, on its device."""
    if np.dtype(stored) == np.uint16:  # int16 bits -> 0..65535
        return (x.to(torch.int32) & 0xFFFF).to(torch.float32)
    return x.to(torch.float32)


def check_output_dtype(dtype: str | np.dtype[Any]) -> str:
    """Return the name of ``dtype`` if it is one of :data:`OUTPUT_DTYPES`; raise otherwise."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in OUTPUT_DTYPES:
        raise InputError(f"output_dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}")
    return name


def to_output(probabilities: torch.Tensor, dtype: str) -> torch.Tensor:
    """float32 probabilities as ``dtype``: cast, or ``round(p * 255)`` clipped for uint8.

    Rounds half to even like ``numpy.rint``, so the bytes equal the store's host conversion.
    """
    if dtype == "float32":
        return probabilities
    if dtype == "float16":
        return probabilities.to(torch.float16)
    return torch.round(probabilities.float() * 255).clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------- buffers and streams


class Event(Protocol):
    """What the pipeline needs of a ``torch.cuda.Event``."""

    def record(self, stream: Any = None) -> None: ...
    def synchronize(self) -> None: ...
    def elapsed_time(self, end: Any) -> float: ...


class Backend(Protocol):
    """Streams and events: :class:`CudaBackend`, or a fake in the tests."""

    def stream(self) -> Any: ...
    def use(self, stream: Any) -> AbstractContextManager[Any]: ...
    def event(self, timing: bool = False) -> Event: ...
    def wait(self, stream: Any, event: Event) -> None: ...
    def keep_alive(self, tensor: torch.Tensor, stream: Any) -> None: ...


class CudaBackend:
    """CUDA streams and events on ``device``."""

    def __init__(self, device: torch.device):
        self.device = device

    def stream(self) -> Any:
        return torch.cuda.Stream(self.device)

    def use(self, stream: Any) -> AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def event(self, timing: bool = False) -> Event:
        return torch.cuda.Event(enable_timing=timing)

    def wait(self, stream: Any, event: Event) -> None:
        stream.wait_event(event)

    def keep_alive(self, tensor: torch.Tensor, stream: Any) -> None:
        # Allocated on the compute stream, read on the copy stream: the caching allocator must
        # not hand its memory out again before that copy is done.
        tensor.record_stream(stream)


@dataclass
class Slot:
    """One set of buffers, ``busy`` from :meth:`StagingPool.acquire` to ``release``."""

    index: int
    host_in: torch.Tensor
    device_in: torch.Tensor
    host_out: torch.Tensor | None = None
    copied_in: Event | None = None  # host_in may be overwritten once this is done
    computed: Event | None = None  # device_in may be overwritten once this is done
    busy: bool = False


class StagingPool:
    """``count`` slots of buffers for windows of one shape and dtype, reused round-robin.

    Parameters
    ----------
    count
        Slots (2: double buffering).
    shape, dtype
        Of every input window (the plan gives every tile the same window shape).
    device
        Where the device buffers live; host buffers are pinned when it is CUDA (``pin``).
    """

    def __init__(
        self, count: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
        pin: bool | None = None,
    ):  # fmt: skip
        pin = device.type == "cuda" if pin is None else pin
        self.pin = pin
        self.slots = [
            Slot(i, torch.empty(shape, dtype=dtype, pin_memory=pin),
                 torch.empty(shape, dtype=dtype, device=device))
            for i in range(count)
        ]  # fmt: skip
        self._next = 0

    def acquire(self) -> Slot:
        """The next slot, once its host input buffer is free (its last copy-in is done)."""
        slot = self.slots[self._next]
        if slot.busy:
            raise RuntimeError(f"staging slot {slot.index} reused while a tile still holds it")
        if slot.copied_in is not None:
            slot.copied_in.synchronize()
        self._next = (self._next + 1) % len(self.slots)
        slot.busy = True
        return slot

    def release(self, slot: Slot) -> None:
        """Give ``slot`` back (its result was copied out of its host output buffer)."""
        slot.busy = False

    def host_output(self, slot: Slot, like: torch.Tensor) -> torch.Tensor:
        """The slot's host output buffer for ``like``'s shape and dtype (reused when they match)."""
        out = slot.host_out
        if out is None or out.dtype != like.dtype or out.numel() < like.numel():
            out = slot.host_out = torch.empty(like.numel(), dtype=like.dtype, pin_memory=self.pin)
        return out[: like.numel()].view(like.shape)


@dataclass
class InFlight:
    """A tile whose copies and compute are queued; :meth:`TransferPipeline.finish` waits for it."""

    slot: Slot
    host_out: torch.Tensor
    copied_out: Event
    started: Event
    ended: Event
    context: Any = None


class TransferPipeline:
    """Copy in, compute, copy out on three streams, ordered by events, with reused buffers.

    Parameters
    ----------
    pool
        The buffers (:class:`StagingPool`).
    backend
        Streams and events (:class:`CudaBackend`).
    """

    def __init__(self, pool: StagingPool, backend: Backend):
        self.pool = pool
        self.backend = backend
        self.copy_in = backend.stream()
        self.compute = backend.stream()
        self.copy_out = backend.stream()

    def launch(
        self, window: np.ndarray, step: Callable[[torch.Tensor], torch.Tensor], context: Any = None
    ) -> InFlight:
        """Queue ``window``'s copy to the device, ``step`` on it and the result's copy back.

        ``step`` runs on the compute stream with the device input buffer (a view of
        ``window``'s shape); it returns the result on the device. Returns at once (on CUDA the
        work is queued); errors of ``step`` (out of memory) come back here, the slot released.
        """
        b = self.backend
        slot = self.pool.acquire()
        try:
            host = slot.host_in[tuple(slice(0, n) for n in window.shape)]
            host.copy_(as_tensor(window))
            device_in = slot.device_in[tuple(slice(0, n) for n in window.shape)]
            with b.use(self.copy_in):
                if slot.computed is not None:  # the previous tile of this slot has read it
                    b.wait(self.copy_in, slot.computed)
                device_in.copy_(host, non_blocking=True)
                slot.copied_in = b.event()
                slot.copied_in.record(self.copy_in)
            with b.use(self.compute):
                b.wait(self.compute, slot.copied_in)
                started, ended = b.event(timing=True), b.event(timing=True)
                started.record(self.compute)
                result = step(device_in)
                ended.record(self.compute)
                slot.computed = b.event()
                slot.computed.record(self.compute)
            with b.use(self.copy_out):
                b.wait(self.copy_out, slot.computed)
                host_out = self.pool.host_output(slot, result)
                host_out.copy_(result, non_blocking=True)
                b.keep_alive(result, self.copy_out)
                copied_out = b.event()
                copied_out.record(self.copy_out)
        except BaseException:
            self.pool.release(slot)
            raise
        return InFlight(slot, host_out, copied_out, started, ended, context)

    def finish(self, flight: InFlight) -> tuple[np.ndarray, float]:
        """Wait for ``flight``'s result; returns a copy of it and the compute's device seconds."""
        flight.copied_out.synchronize()
        result = flight.host_out.numpy().copy()
        seconds = flight.started.elapsed_time(flight.ended) / 1000
        self.pool.release(flight.slot)
        return result, seconds


def pipelined(
    items: Iterable[T], launch: Callable[[T], H], finish: Callable[[H], Any], depth: int = 2
) -> Iterator[Any]:
    """``finish(launch(item))`` for every item, in order, with up to ``depth`` items launched.

    With ``depth=2`` item ``i + 1`` is launched (its copies and compute queued) before item
    ``i``'s result is awaited: double buffering. ``depth=1`` runs one item at a time. Closing
    the generator abandons launched items (their slots are not reused afterwards).
    """
    in_flight: deque[H] = deque()
    for item in items:
        in_flight.append(launch(item))
        if len(in_flight) >= depth:
            yield finish(in_flight.popleft())
    while in_flight:
        yield finish(in_flight.popleft())
