"""Pools defined by the map they reduce: adaptive pools, global and single-axis reductions,
LPPool (a sum pool between pointwise ops)."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise
from typing import Any

import torch
from torch import fx

from napari_dense.convert import _ops
from napari_dense.convert.geometry import Pair, pair
from napari_dense.convert.patchnet import _shape
from napari_dense.convert.spatial import _SpatialOps, _static


class _ReduceOps(_SpatialOps):
    """Emit reductions as pools whose window is the reduced extent of the patch map."""

    def _adaptive_pool(
        self, node: fx.Node, x: fx.Node, kind: str, output_size: Any, name: str
    ) -> None:
        in_shape, out_shape = _shape(x), _shape(node)
        assert in_shape is not None and out_shape is not None
        size_in, size_out = in_shape[2:], out_shape[2:]
        regular = [_regular_windows(i, o) for i, o in zip(size_in, size_out, strict=True)]
        if None in regular:
            raise self._unsupported(
                node,
                f"adaptive pooling of a {size_in} map to {size_out} has windows of different "
                "sizes. Hint: choose a patch size at which the windows are alike, or pool to 1x1.",
            )
        window = (regular[0][0], regular[1][0])
        step = (regular[0][1], regular[1][1])
        self._pool(
            node,
            x,
            kind,
            window,
            step,
            0,
            1,
            False,
            None,
            op=f"Adaptive{kind.capitalize()}Pool2d",
            name=name,
        )

    def _reduce(self, node: fx.Node, x: fx.Node, kind: str, dim: Any, keepdim: bool) -> None:
        """mean / amax / sum: over channels (per pixel), over one spatial axis then the other,
        or over both (a global pooling head)."""
        in_shape, lattice = _shape(x), self.lattice[x]
        dims = dim if isinstance(dim, list | tuple) else [dim]
        axes = {d % len(in_shape) for d in dims} if in_shape and None not in dims else set()
        channel = 3 if lattice.channels_last else 1
        if in_shape is not None and axes == {channel}:
            if len(in_shape) == 4 and not keepdim:
                raise self._unsupported(
                    node, "a reduction over channels drops dim 1. Hint: pass keepdim=True."
                )
            self._per_pixel(node, x, channel)  # type: ignore[attr-defined]
            return
        if in_shape is not None and lattice.channels_last:
            raise self._unsupported(
                node, "it reduces spatial axes of a channels-last map. Hint: permute it back."
            )
        if in_shape is not None and len(in_shape) == 4 and axes in ({2}, {3}):
            axis = axes.pop()
            self._axis_pool(node, x, kind, axis, in_shape[axis], keep=keepdim)
            return
        if in_shape is not None and len(in_shape) == 3 and lattice.reduced and axes == {2}:
            if keepdim:
                raise self._unsupported(node, "keepdim=True after a reduced axis. Hint: drop it.")
            self._axis_pool(node, x, kind, 5 - lattice.reduced, in_shape[2], keep=False)
            return
        if (
            in_shape is None
            or len(in_shape) != 4
            or None in dims
            or {d % 4 for d in dims} != {2, 3}
        ):
            raise self._unsupported(node, "only reductions over both spatial dims are supported.")
        window: Pair = (in_shape[2], in_shape[3])
        self._pool(
            node,
            x,
            "max" if kind == "max" else "avg",
            window,
            window,
            0,
            1,
            False,
            1 if kind == "sum" else None,
            op=f"{kind}(dim=(2, 3))",
            name=node.name,
        )

    def _lp_pool(self, node: fx.Node, kw: dict[str, Any]) -> None:
        """``LPPool2d``: ``(sum over the window of x^p)^(1/p)``, a sum pool between pointwise
        ops (as ``F.lp_pool2d`` computes it)."""
        x, p = kw["input"], kw["norm_type"]
        if not isinstance(p, int | float) or p in (float("inf"), -float("inf")):
            raise self._unsupported(node, "LPPool with an infinite norm. Hint: use MaxPool2d.")
        kernel = pair(_static(kw["kernel_size"]))
        stride = _static(kw.get("stride")) or kernel
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        name = self._layer_name(node)
        if stack and isinstance(stack[-1], tuple) and "LPPool2d" in str(stack[-1][1]):
            name = str(stack[-1][0])  # the module's path, as for any other layer module
        original = self.env[x]
        self.env[x] = self.graph.call_method("pow", (original, p))
        try:
            self._pool(
                node, x, "avg", kernel, stride, 0, 1, bool(kw.get("ceil_mode")), 1,
                op="LPPool2d", name=name,
            )  # fmt: skip
        finally:
            self.env[x] = original
        out = self.env[node]
        magnitude = self.graph.call_function(
            torch.mul,
            (self.graph.call_function(torch.sign, (out,)),
             self.graph.call_function(torch.relu, (self.graph.call_function(torch.abs, (out,)),))),
        )  # fmt: skip
        self.env[node] = self.graph.call_method("pow", (magnitude, 1.0 / p))

    def _axis_pool(
        self, node: fx.Node, x: fx.Node, kind: str, axis: int, extent: int, *, keep: bool
    ) -> None:
        """A reduction over the whole extent of one spatial axis (``axis`` of the dense map)."""
        lattice = self.lattice[x]
        kernel: Pair = (extent, 1) if axis == 2 else (1, extent)
        pool = "max" if kind == "max" else "avg"
        self.env[node] = self.graph.call_function(
            _ops.dense_pool2d,
            (self.env[x], pool, kernel, self._emitted_dilation(lattice), (1, 1), (0, 0, 0, 0),
             1.0 if kind == "sum" else None),
        )  # fmt: skip
        if keep:
            self.lattice[node] = lattice
        else:  # the first axis leaves a 3D patch tensor; the second, one vector per patch
            self.lattice[node] = replace(lattice, reduced=None if lattice.reduced else axis)
        rf, total = self.receptive[x], lattice.total_stride
        self.receptive[node] = tuple(  # type: ignore[assignment]
            rf[a] + (kernel[a] - 1) * total[a] for a in (0, 1)
        )


def _regular_windows(size_in: int, size_out: int) -> tuple[int, int] | None:
    """``(kernel, stride)`` when adaptive pooling of ``size_in`` to ``size_out`` is a regular
    pool (its windows ``[floor(i n / m), ceil((i + 1) n / m))`` alike and evenly spaced)."""
    starts = [(i * size_in) // size_out for i in range(size_out)]
    ends = [-(-((i + 1) * size_in) // size_out) for i in range(size_out)]
    sizes = {e - s for s, e in zip(starts, ends, strict=True)}
    steps = {b - a for a, b in pairwise(starts)} or {1}
    if len(sizes) != 1 or len(steps) != 1:
        return None
    return sizes.pop(), steps.pop()
