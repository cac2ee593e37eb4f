"""Ops that move over space: convolutions, pools, global reductions, Linear heads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from napari_dense.convert import _ops
from napari_dense.convert.geometry import Lattice, Pair, checkered_phases, pair
from napari_dense.convert.optable import _ATEN_PERMUTE, _ATEN_TRANSPOSES, _flat
from napari_dense.convert.patchnet import _shape
from napari_dense.convert.plan import StridingLayer
from napari_dense.convert.state import _BuilderState, _env_or_none, _fetch_attr, _padding4
from napari_dense.errors import UnsupportedLayerError


class _SpatialOps(_BuilderState):
    """Emit the dense form of windowed ops (the window dilated by the lattice)."""

    def _matmul(self, node: fx.Node, kw: dict[str, Any]) -> None:
        """``addmm(bias, x, weight.T)`` / ``mm(x, weight.T)``: a Linear after run_decompositions."""
        x, transposed = kw.get("mat1", kw.get("input")), kw["mat2"]
        bias = kw.get("input") if "mat1" in kw else None
        constants = [a for a in (transposed, bias) if isinstance(a, fx.Node)]
        if (
            x not in self.lattice
            or any(a in self.lattice for a in constants)
            or kw.get("beta", 1) != 1
            or kw.get("alpha", 1) != 1
            or (bias is not None and len(_shape(bias) or ()) != 1)
        ):
            raise self._unsupported(
                node, "only products of features with constant weights (a Linear) densify."
            )
        self._linear(node, x, self._untransposed(transposed), _env_or_none(self.env, bias))

    def _untransposed(self, transposed: fx.Node) -> fx.Node:
        """The (out, in) weight of ``x @ transposed``: the weight itself when it was transposed."""
        source = transposed.args[0] if transposed.args else None
        dims = [d % 2 for d in _flat(transposed.args[1:])]
        swaps_axes = (transposed.target in _ATEN_TRANSPOSES and dims in ([], [0, 1], [1, 0])) or (
            transposed.target in _ATEN_PERMUTE and dims == [1, 0]
        )
        if (
            transposed.op == "call_function"
            and swaps_axes
            and isinstance(source, fx.Node)
            and len(_shape(source) or ()) == 2
        ):
            return self.env[source]
        weight = self.graph.call_method("t", (self.env[transposed],))
        return self.graph.call_method("contiguous", (weight,))

    def _conv(
        self,
        node: fx.Node,
        x: fx.Node,
        weight: Any,
        bias: Any,
        stride: Any,
        padding: Any,
        dilation: Any,
        groups: int,
        padding_mode: str,
        *,
        op: str,
        name: str,
    ) -> None:
        weight_node = self._get_attr(weight) if isinstance(weight, str) else self.env[weight]
        bias_node = None
        if isinstance(bias, str):
            bias_node = self._get_attr(bias)
        elif isinstance(bias, fx.Node):
            bias_node = self.env[bias]
        weight_shape = (
            _shape(weight)
            if isinstance(weight, fx.Node)
            else tuple(_fetch_attr(self.traced.module, weight).shape)
        )
        assert weight_shape is not None
        kernel = (weight_shape[2], weight_shape[3])
        dilation = pair(dilation)
        pad = _padding4(padding, kernel, dilation, node, self)
        self._spatial(
            node,
            x,
            kernel=kernel,
            own_dilation=dilation,
            stride=pair(stride),
            padding=pad,
            op=op,
            name=name,
            macs_per_position=float(torch.Size(weight_shape).numel()),
            pad_with=(padding_mode, 0.0),
            emit=lambda x_new, st, dil, pd: self.graph.call_function(
                _ops.dense_conv2d,
                (x_new, weight_node, bias_node, st, dil, pd, padding_mode, groups),
            ),
        )

    def _pool(
        self,
        node: fx.Node,
        x: fx.Node,
        kind: str,
        kernel: Any,
        stride: Any,
        padding: Any,
        dilation: Any,
        ceil_mode: bool,
        divisor: int | None,
        *,
        op: str,
        name: str,
    ) -> None:
        kernel, stride, padding = _static(kernel), _static(stride), _static(padding)
        kernel, dilation = pair(kernel), pair(_static(dilation))
        stride = pair(stride if stride not in (None, (), []) else kernel)
        pad = _padding4(padding, kernel, dilation, node, self)
        if ceil_mode:
            in_shape, out_shape = _shape(x), _shape(node)
            assert in_shape is not None and out_shape is not None
            floor = [
                (
                    in_shape[2 + a]
                    + pad[2 - 2 * a]
                    + pad[3 - 2 * a]
                    - (kernel[a] - 1) * dilation[a]
                    - 1
                )
                // stride[a]
                + 1
                for a in (0, 1)
            ]
            if tuple(floor) != out_shape[2:]:
                self._mark_inexact(f"{name}: ceil_mode pooling reads a partial window")
                # The partial window reads past the map: pad its end so the dense map keeps one
                # output per patch ((K, H, W) stays whole; the border values are not exact).
                extra = [
                    (out_shape[2 + a] - 1) * stride[a]
                    + (kernel[a] - 1) * dilation[a]
                    + 1
                    - (in_shape[2 + a] + pad[2 - 2 * a] + pad[3 - 2 * a])
                    for a in (0, 1)
                ]
                pad = (pad[0], pad[1] + max(0, extra[1]), pad[2], pad[3] + max(0, extra[0]))
        count = None if divisor is None else float(divisor)
        self._spatial(
            node,
            x,
            kernel=kernel,
            own_dilation=dilation,
            stride=stride,
            padding=pad,
            op=op,
            name=name,
            macs_per_position=0.0,
            pad_with=("constant", float("-inf") if kind == "max" else 0.0),
            emit=lambda x_new, st, dil, pd: self.graph.call_function(
                _ops.dense_pool2d, (x_new, kind, kernel, dil, st, pd, count)
            ),
        )

    def _spatial(
        self,
        node: fx.Node,
        x: fx.Node,
        *,
        kernel: Pair,
        own_dilation: Pair,
        stride: Pair,
        padding: tuple[int, int, int, int],
        op: str,
        name: str,
        macs_per_position: float,
        pad_with: tuple[str, float],
        emit: Callable[..., fx.Node],
    ) -> None:
        """Emit a layer that slides a window: conv or pooling.

        ``emit(x, stride, dilation, padding)`` adds the layer to the graph; ``pad_with`` is the
        padding mode and value the layer pads with.
        """
        lattice = self._spatial_lattice(node, x)
        out_shape = _shape(node)
        assert out_shape is not None
        out_size = out_shape[2:] if len(out_shape) == 4 else (1, 1)
        # Along an axis where the patch network's output has one position, the stride never
        # applies (it is the head): compute it at stride 1, every output is then exact.
        stride = tuple(1 if out_size[a] == 1 else stride[a] for a in (0, 1))  # type: ignore[assignment]
        sampling = "all"
        if stride != (1, 1):
            sampling = self.requested.get(name, self.default)
            self.layers.append(StridingLayer(name, op, kernel, stride, sampling))
            self.layer_input_stride[name] = lattice.total_stride
        dense_stride: Pair = (1, 1) if sampling == "all" else stride
        d = self._emitted_dilation(lattice)
        dilation = (own_dilation[0] * d[0], own_dilation[1] * d[1])
        left, right, top, bottom = padding
        dense_padding = (left * d[1], right * d[1], top * d[0], bottom * d[0])
        if sampling == "checkered":
            if self.phases == "batch":
                raise self._unsupported(
                    node, "checkered sampling needs phases='dilated' (the default)."
                )
            # Multisampling: run the layer at its stride on each kept phase of its (padded)
            # input; the phases ride in the batch, later layers treat each as its own map.
            split = self.graph.call_function(
                _ops.phase_split,
                (self.env[x], stride, checkered_phases(stride), dense_padding, *pad_with),
            )
            self.env[node] = emit(split, dense_stride, dilation, (0, 0, 0, 0))
            out_lattice = lattice.checkered_by(stride)
        else:
            self.env[node] = emit(self.env[x], dense_stride, dilation, dense_padding)
            out_lattice = (
                lattice.densified(stride) if sampling == "all" else lattice.strided(stride)
            )
        if self.phases == "batch" and stride != (1, 1):
            out_lattice = self._to_phase_batch(node, name, lattice, out_lattice, sampling, stride)
        self.lattice[node] = out_lattice
        total = lattice.total_stride
        rf = self.receptive[x]
        self.receptive[node] = tuple(  # type: ignore[assignment]
            rf[a] + (kernel[a] - 1) * own_dilation[a] * total[a] for a in (0, 1)
        )
        self.costs.macs_per_pixel += macs_per_position * out_lattice.density
        self.costs.macs_per_patch += macs_per_position * out_size[0] * out_size[1]

    def _to_phase_batch(
        self, node: fx.Node, name: str, before: Lattice, after: Lattice, sampling: str, stride: Pair
    ) -> Lattice:
        """Phase-batch form: move the phases of a densified layer into the batch."""
        if sampling == "none":
            if before.phases:
                raise self._unsupported(
                    node,
                    f"with phases='batch', layer {name} cannot stay strided after a "
                    "densified layer (the samples would not form a lattice). Hint: use "
                    "phases='dilated' (the default).",
                )
            return after
        self.env[node] = self.graph.call_function(_ops.space_to_batch, (self.env[node], stride))
        return replace(after, phases=(*before.phases, stride))

    def _linear(self, node: fx.Node, x: fx.Node, weight: fx.Node, bias: fx.Node | None) -> None:
        lattice = self.lattice[x]
        in_shape = _shape(x)
        if lattice.channels_last and in_shape is not None and len(in_shape) == 4:
            # Over the channels of each pixel: the same call on the channels-last dense map.
            self.env[node] = self.graph.call_function(F.linear, (self.env[x], weight, bias))
            self._same_lattice(node, x)
            out_shape = _shape(node)
            assert out_shape is not None
            self.costs.macs_per_pixel += out_shape[-1] * in_shape[-1] * lattice.density
            self.costs.macs_per_patch += out_shape[-1] * in_shape[-1] * in_shape[1] * in_shape[2]
            return
        if lattice.flattened is not None:
            kernel: Pair = lattice.flattened[1:]
        elif in_shape is not None and len(in_shape) == 2:
            kernel = (1, 1)
        else:
            raise self._unsupported(
                node,
                "Linear acts on the last (spatial) axis of a feature map here. Hint: "
                "flatten the map first (torch.flatten(x, 1)), or use a 1x1 Conv2d.",
            )
        self.env[node] = self.graph.call_function(
            _ops.linear_as_conv2d,
            (self.env[x], weight, bias, kernel, self._emitted_dilation(lattice)),
        )
        self.lattice[node] = replace(lattice, flattened=None)
        rf, total = self.receptive[x], lattice.total_stride
        self.receptive[node] = tuple(  # type: ignore[assignment]
            rf[a] + (kernel[a] - 1) * total[a] for a in (0, 1)
        )
        out_shape = _shape(node)
        assert out_shape is not None
        macs = float(out_shape[1] * (in_shape[1] if in_shape else 0))
        self.costs.macs_per_pixel += macs * lattice.density
        self.costs.macs_per_patch += macs

    # -- layers that act per position ---------------------------------------------------------


def _static(value: Any) -> Any:
    """A layer argument as the patch network computed it (``x.size()[2:]`` -> ``(h, w)``)."""
    if isinstance(value, fx.Node):
        if "patch_value" not in value.meta:
            raise UnsupportedLayerError(
                f"cannot densify: argument '{value.name}' of a layer is a tensor, not a size"
            )
        return _static(value.meta["patch_value"])
    if isinstance(value, list | tuple | torch.Size):
        return (
            type(value)(_static(v) for v in value)
            if not isinstance(value, torch.Size)
            else (tuple(int(v) for v in value))
        )
    return value
