"""Peak memory of a block of code: host RSS and CUDA allocations."""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

import torch

__all__ = ["PeakMemory", "current_rss", "peak_rss", "reset_peak_rss"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def current_rss() -> int:
    """Resident set size of this process in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:  # pragma: no cover - not Linux
        return 0


def reset_peak_rss() -> bool:
    """Set this process's peak RSS (``VmHWM``) to its current RSS; False where unsupported.

    ``ru_maxrss`` cannot measure one block: it only grows, and a child process starts with its
    parent's value. Linux resets ``VmHWM`` on writing 5 to ``/proc/self/clear_refs``.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:  # pragma: no cover - not Linux, or not permitted
        return False


def peak_rss() -> int:
    """Peak RSS (``VmHWM``) of this process since start or :func:`reset_peak_rss`, in bytes."""
    return _status_bytes("VmHWM")


class PeakMemory:
    """Context manager measuring the peak memory a block adds.

    Host: ``VmHWM`` reset at entry (Linux); elsewhere RSS sampled by a thread every
    ``interval`` seconds. CUDA: ``torch.cuda.max_memory_allocated``.

    Attributes
    ----------
    host_bytes
        Peak RSS during the block minus RSS before it.
    device_bytes
        Peak CUDA memory allocated during the block (0 off CUDA).
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.host_bytes = 0
        self.device_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._baseline = 0
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, current_rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._baseline = self._peak = current_rss()
        if not reset_peak_rss():
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.device_bytes = int(torch.cuda.max_memory_allocated(self.device))
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, current_rss())
        else:
            self._peak = peak_rss()
        self.host_bytes = max(self._peak - self._baseline, 0)
