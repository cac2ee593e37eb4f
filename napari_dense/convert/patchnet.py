"""The patch network: every tensor's shape for one patch, the head check, accepted patch sizes."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from napari_dense.convert.acquire import (
    Classifier,
    _check_exported_shape,
    _device_of,
    _Graph,
    _graph_of,
    _infer_in_channels,
)
from napari_dense.convert.geometry import Pair, pair
from napari_dense.convert.optable import _ATEN_MULTI_OUTPUT
from napari_dense.errors import PatchSizeError, UnsupportedLayerError


@dataclass
class _Traced:
    module: fx.GraphModule
    patch_size: Pair
    in_channels: int
    num_classes: int


def _trace(
    model: Classifier, patch_size: int | tuple[int, int], in_channels: int | None
) -> _Traced:
    patch = pair(patch_size, "patch_size")
    if min(patch) < 1:
        raise PatchSizeError(f"patch_size must be positive, got {patch_size!r}")
    graph = _graph_of(model, patch, in_channels)
    traced = graph.module
    guess, no_guess = in_channels, None
    if guess is None:
        try:
            guess = _graph_in_channels(graph)
        except UnsupportedLayerError as err:
            no_guess = err
    if guess is not None:
        _check_exported_shape(graph, patch, guess)
    # One pass over the graph records every shape and size. Two patches where the graph allows
    # it: what mixes the batch (squeeze(), view(-1, F)) is then seen per patch.
    batches = (graph.example_batch,) if graph.exported_shape else (2, 1)
    error = _propagate(traced, patch, guess, batches) if guess is not None else no_guess
    channels = guess
    if error is not None and in_channels is None:
        # The input's channels, when not the first Conv2d's (a model that adds coordinate
        # channels, or has no convolution): the fewest the graph accepts.
        for candidate in range(1, 65):
            if candidate != guess and _propagate(traced, patch, candidate, batches) is None:
                channels, error = candidate, None
                break
    if error is not None:
        if channels is None:
            raise error
        cause = _root_cause(error)
        raise PatchSizeError(
            f"the model does not accept a {patch[0]}x{patch[1]} patch with {channels} channel(s) "
            f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}). "
            f"{_accepted_patch_sizes_hint(graph, channels)}"
        ) from error
    assert channels is not None
    result = _graph_output(traced.graph)
    shape = _shape(result) if isinstance(result, fx.Node) else None
    if shape is None or not (len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1))):
        raise PatchSizeError(
            f"the head must reduce the {patch[0]}x{patch[1]} patch to one vector of class scores "
            "(N, K) or (N, K, 1, 1), but the model returns "
            f"{_batched(shape) if shape else type(result)}. "
            f"{_accepted_patch_sizes_hint(graph, channels)}"
        )
    return _Traced(traced, patch, channels, shape[1])


def _propagate(
    module: fx.GraphModule, patch: Pair, channels: int, batches: tuple[int, ...]
) -> Exception | None:
    """Run zeros through the graph, recording shapes and sizes; the error if every batch fails."""
    error: Exception | None = None
    for batch in batches:
        try:
            with torch.no_grad():
                _PatchProp(module).run(
                    torch.zeros(batch, channels, *patch, device=_device_of(module))
                )
            return None
        except Exception as err:
            error = error or err
    return error


class _PatchProp(fx.Interpreter):
    """Records what every node holds for a patch: ``tensor_meta`` (shapes) as ShapeProp does,
    and ``patch_value`` for non-tensor values (sizes read), quietly (ShapeProp prints)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        found = False

        def meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        tensor_meta = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = tensor_meta
        if not isinstance(result, torch.Tensor):
            n.meta["patch_value"] = result
        return result


def _graph_in_channels(graph: _Graph) -> int:
    if graph.exported_shape is not None and len(graph.exported_shape) == 4:
        if isinstance(graph.exported_shape[1], int):
            return graph.exported_shape[1]
    return _infer_in_channels(graph.module)


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception (ShapeProp wraps the real error in a RuntimeError)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _graph_output(graph: fx.Graph) -> Any:
    """What the graph returns; exported graphs return a one-element tuple."""
    result = next(n for n in graph.nodes if n.op == "output").args[0]
    if isinstance(result, tuple | list) and len(result) == 1:
        return result[0]
    return result


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    if node.op == "call_function" and node.target in _ATEN_MULTI_OUTPUT and meta:
        meta = meta[0]  # (result, indices or statistics): the result is the tensor we densify
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _accepted_sizes(graph: _Graph, channels: int, largest: int) -> list[int]:
    """Square patch sizes at which the head reduces the patch to one vector (on meta tensors)."""
    try:
        meta_model = copy.deepcopy(graph.module).to("meta")
    except Exception:  # pragma: no cover - exotic modules that cannot move to meta
        return []
    accepted = []
    for size in range(1, largest + 1):
        try:
            out = meta_model(torch.empty(graph.example_batch, channels, size, size, device="meta"))
        except Exception:
            continue
        if isinstance(out, tuple | list) and len(out) == 1:
            out = out[0]
        if isinstance(out, torch.Tensor) and (out.ndim == 2 or tuple(out.shape[2:]) == (1, 1)):
            accepted.append(size)
    return accepted


def _accepted_patch_sizes_hint(graph: _Graph, channels: int, largest: int = 160) -> str:
    """Which square patch sizes the model accepts (tried cheaply on the meta device)."""
    accepted = _accepted_sizes(graph, channels, largest)
    if not accepted:
        return f"No square patch size up to {largest} works: check the model's head."
    return f"This model accepts square patches of size {_ranges(accepted)}."


def accepted_patch_sizes(
    model: Classifier, *, in_channels: int | None = None, largest: int = 160
) -> list[int]:
    """The square patch sizes ``model`` accepts: those its head reduces to one vector.

    Parameters
    ----------
    model
        A patch classifier, as for :func:`densify` (copied, never modified).
    in_channels
        Input channels, when the model has no ``Conv2d`` to read them from.
    largest
        Largest size tried.

    Returns
    -------
    list[int]
        Sizes ``P`` (ascending) for which ``model`` maps ``(1, C, P, P)`` to ``(1, K)`` or
        ``(1, K, 1, 1)``. Pooling that drops odd rows makes several sizes work; a program
        exported with a static input shape accepts only that one.
    """
    graph = _graph_of(model)
    channels = in_channels if in_channels is not None else _graph_in_channels(graph)
    return _accepted_sizes(graph, channels, largest)


def _ranges(values: list[int]) -> str:
    parts, start = [], values[0]
    for prev, cur in zip(values, [*values[1:], None], strict=True):
        if cur != prev + 1 if cur is not None else True:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur if cur is not None else start
    return ", ".join(parts)


def _batched(shape: tuple[int, ...]) -> str:
    """``(N, 113, 2, 2)``: a patch-network shape with its batch dimension named."""
    return "(" + ", ".join(["N", *(str(d) for d in shape[1:])]) + ")"
