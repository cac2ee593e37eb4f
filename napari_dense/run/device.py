"""Choosing the torch device, the precision a run computes in, and compiled networks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from napari_dense.errors import InputError
from napari_dense.run.fingerprint import network_sha256

__all__ = [
    "DEFAULT_COMPILE_MODE",
    "PRECISION_CHOICES",
    "clear_compiled",
    "compiled_network",
    "cuda_settings",
    "resolve_device",
    "resolve_precision",
    "supports_bfloat16",
]

#: What ``precision=`` accepts; ``"auto"`` resolves through :func:`resolve_precision`.
PRECISION_CHOICES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA if available, then MPS, then CPU; otherwise ``torch.device(device)``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise InputError(
            f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:1'"
        ) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    return resolved


def supports_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA with bf16 support; never the CPU)."""
    if device.type != "cuda":
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.5: no emulation to exclude
        return bool(torch.cuda.is_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"``: bfloat16 on a CUDA GPU that supports it, float32 elsewhere; else unchanged.

    ``"float32"`` means strict IEEE float32 on CUDA too: :func:`cuda_settings` turns TF32 off.
    """
    if precision not in PRECISION_CHOICES:
        raise InputError(f"precision must be one of {PRECISION_CHOICES}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if supports_bfloat16(device) else "float32"
    return precision


@contextmanager
def cuda_settings(device: torch.device, precision: str) -> Iterator[None]:
    """While computing on CUDA: TF32 off for ``"float32"`` (strict IEEE), cuDNN autotuning on.

    The previous settings come back on exit; off CUDA nothing changes. A run keeps one input
    shape, so cuDNN's autotuning (``benchmark``) happens once, at its first tile.
    """
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark)
    if precision == "float32":
        matmul.allow_tf32 = False
        cudnn.allow_tf32 = False
    cudnn.benchmark = True
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = before


# ---------------------------------------------------------------------- compiled networks

#: ``torch.compile`` mode of ``compile=True``: autotuned kernels, no CUDA graphs (tiles vary).
DEFAULT_COMPILE_MODE = "max-autotune-no-cudagraphs"
CompiledKey = tuple[str, str, str, str]
#: ``torch.compile``d networks of this process, by (network content, device, precision, mode).
_COMPILED: dict[CompiledKey, Any] = {}
#: (network content, device, precision, mode, input shape) that have run once: compiled.
_WARM: set[tuple[str, str, str, str, tuple[int, ...]]] = set()


def compiled_network(
    module: torch.nn.Module, device: torch.device, precision: str,
    mode: str = DEFAULT_COMPILE_MODE,
) -> tuple[Any, CompiledKey]:  # fmt: skip
    """``torch.compile(module, mode=mode)``, once per (network content, device, precision, mode).

    A second run of the same network (a new predictor, the same weights) reuses the compiled
    module: it compiles (and autotunes) nothing again for a tile shape it has seen. Across
    processes, torch's own on-disk caches (Inductor's FX graph and autotuning caches, on by
    default) shorten the first compile. Returns the compiled module and its cache key.
    """
    key = (network_sha256(module), str(device), precision, mode)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(module, mode=mode, dynamic=False)
    return _COMPILED[key], key


def mark_warm(key: CompiledKey, shape: tuple[int, ...]) -> bool:
    """Record that ``key`` ran on ``shape``; True if it had not before (that call compiled)."""
    entry = (*key, tuple(shape))
    first = entry not in _WARM
    _WARM.add(entry)
    return first


def is_warm(key: CompiledKey, shape: tuple[int, ...]) -> bool:
    """Whether the compiled network ``key`` already ran on ``shape`` in this process."""
    return (*key, tuple(shape)) in _WARM


def clear_compiled() -> None:
    """Forget every compiled network of this process (frees what they hold)."""
    _COMPILED.clear()
    _WARM.clear()
