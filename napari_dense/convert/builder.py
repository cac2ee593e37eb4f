"""The dense graph builder: one pass over the patch graph, dispatching each node to its rule."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._ops import OpOverload

from napari_dense.convert import _ops
from napari_dense.convert.acquire import _is_guard
from napari_dense.convert.geometry import Lattice, sample_grid
from napari_dense.convert.local import _LocalOps
from napari_dense.convert.optable import (
    _ATEN_SLICE,
    _ELEMENTWISE_FUNCTIONS,
    _ELEMENTWISE_METHODS,
    _ELEMENTWISE_MODULES,
    _EXPAND_METHODS,
    _EXPANDS,
    _IDENTITY_FUNCTIONS,
    _IDENTITY_METHODS,
    _IDENTITY_MODULES,
    _LAYER_NORMS,
    _PER_PIXEL_METHODS,
    _PER_PIXEL_MODULES,
    _PERMUTES,
    _REDUCE_FUNCTIONS,
    _REDUCE_METHODS,
    _RESHAPE_METHODS,
    _SOFTMAX_FUNCTIONS,
    _SOFTMAX_METHODS,
    _SOFTMAX_MODULES,
    _SUPPORTED_ATEN,
    _TRAINING_MODE_HINT,
    _aten_equivalent,
    _flat,
    _is_multi_output,
    _per_pixel_spec,
)
from napari_dense.convert.patchnet import _graph_output, _shape
from napari_dense.convert.pointwise import _PointwiseOps
from napari_dense.convert.reduce import _ReduceOps
from napari_dense.convert.state import _env_or_none, _fetch_attr
from napari_dense.errors import PatchSizeError, UnsupportedLayerError


class _DenseGraphBuilder(_ReduceOps, _PointwiseOps, _LocalOps):
    """One pass over the traced graph, emitting the dense network's graph."""

    def build(self) -> fx.Graph:
        for node in self.traced.module.graph.nodes:
            layers_before = len(self.layers)
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "output":
                self._output(node)
            elif _is_guard(node) or _is_check(node):
                # Shape guards and assertions of an exported program hold for the patch network,
                # not the dense one; they compute nothing, so they are left out.
                if node.users:
                    raise self._unsupported(node, "a later operation reads this assertion.")
                continue
            elif not any(arg in self.lattice for arg in node.all_input_nodes):
                self._copy(node)  # does not touch the image: same in both networks
            elif node.op == "call_module":
                self._call_module(node, self.modules[node.target])
            elif node.op == "call_function":
                self._call_function(node)
            elif node.op == "call_method":
                self._call_method(node)
            else:  # pragma: no cover - fx has no other kinds of nodes
                raise self._unsupported(node)
            self._account_memory(node)
            added = self.layers[-1].name if len(self.layers) > layers_before else None
            self._track_upstream(node, added)
        unknown = set(self.requested) - {layer.name for layer in self.layers}
        if unknown:
            names = ", ".join(layer.name for layer in self.layers) or "none"
            raise ValueError(
                f"sampling names unknown layer(s) {sorted(unknown)}; striding layers: {names}"
            )
        return self.graph

    def check_live(self, graph: fx.Graph) -> None:
        """After dead-code elimination: no surviving node may read a spatial size."""
        live = set(graph.nodes)
        for node in self.spatial_size_reads:
            if self.env[node] in live:
                raise self._unsupported(
                    node,
                    "it reads the spatial size of a feature map, which differs in the dense "
                    "network. Hint: use flatten(x, 1) or x.view(x.size(0), -1).",
                )

    def _placeholder(self, node: fx.Node) -> None:
        if self.lattice:
            raise UnsupportedLayerError(
                f"forward() takes more than one input ({node.name}); a patch classifier takes "
                "one image batch. Hint: wrap the model so forward(x) has a single argument."
            )
        self.env[node] = self.graph.placeholder("x")
        self.lattice[node] = Lattice()
        self.receptive[node] = (1, 1)
        self.costs.bytes_per_pixel[node] = 4.0 * self.traced.in_channels

    def _output(self, node: fx.Node) -> None:
        result = _graph_output(self.traced.module.graph)
        if not isinstance(result, fx.Node) or result not in self.lattice:
            raise UnsupportedLayerError(
                "the model must return one tensor of class scores computed from its input"
            )
        if self.lattice[result].channels_last:
            raise UnsupportedLayerError(
                "the model returns a channels-last map: permute it back (0, 3, 1, 2)"
            )
        flattened = self.lattice[result].flattened
        if flattened is not None and flattened[1:] != (1, 1):
            raise PatchSizeError(
                f"the model returns a flattened {flattened[0]}x{flattened[1]}x{flattened[2]} "
                "feature map, not one vector per patch: add a Linear head or pick the patch "
                "size at which the map is 1x1"
            )
        out = self.env[result]
        lattice = self.lattice[result]
        if lattice.phases:  # phase-batch form: interleave the phases back
            out = self.graph.call_function(_ops.batch_to_space, (out, lattice.phases))
        if lattice.checkered:  # checkered phases: onto the grid of the sample pattern
            grid, pattern = sample_grid(lattice)
            offsets = tuple((oy // grid[0], ox // grid[1]) for oy, ox in lattice.sample_offsets())
            period = (len(pattern), len(pattern[0]))
            out = self.graph.call_function(_ops.scatter_phases, (out, offsets, period))
        self.graph.output(out)

    def _copy(self, node: fx.Node) -> None:
        if node.op == "get_attr":
            self.attrs[node.target] = _fetch_attr(self.traced.module, node.target)
        elif node.op == "call_module":
            self.attrs[node.target] = self.modules[node.target]
        self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])

    # -- dispatch ------------------------------------------------------------------------------

    def _call_module(self, node: fx.Node, module: nn.Module) -> None:
        x = node.args[0]
        if isinstance(module, nn.Conv2d):
            self._conv(
                node,
                x,
                f"{node.target}.weight",
                module.bias is not None and f"{node.target}.bias",
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                module.padding_mode,
                op="Conv2d",
                name=node.target,
            )
        elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
            is_max = isinstance(module, nn.MaxPool2d)
            self._pool(
                node,
                x,
                "max" if is_max else "avg",
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation if is_max else 1,
                module.ceil_mode,
                None if is_max else module.divisor_override,
                op=type(module).__name__,
                name=node.target,
            )
        elif isinstance(module, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
            kind = "max" if isinstance(module, nn.AdaptiveMaxPool2d) else "avg"
            self._adaptive_pool(node, x, kind, module.output_size, name=node.target)
        elif isinstance(module, nn.Linear):
            bias = module.bias is not None and f"{node.target}.bias"
            self._linear(
                node,
                x,
                self._get_attr(f"{node.target}.weight"),
                self._get_attr(bias) if bias else None,
            )
        elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            self._batch_norm(node, x, module)
        elif isinstance(module, nn.Flatten):
            self._reshape_like(node, x)
        elif isinstance(module, _IDENTITY_MODULES):
            self._alias(node, x)
        elif isinstance(module, nn.Softmax | nn.LogSoftmax | nn.Softmin):
            self._softmax(node, x, module.dim, _SOFTMAX_MODULES[type(module)])
        elif isinstance(module, _ELEMENTWISE_MODULES):
            self._elementwise(node)
        elif isinstance(module, nn.LayerNorm):
            affine = [
                self._get_attr(f"{node.target}.{key}") if getattr(module, key) is not None else None
                for key in ("weight", "bias")
            ]
            self._layer_norm(node, x, module.normalized_shape, affine[0], affine[1], module.eps)
        elif type(module) in _PER_PIXEL_MODULES:
            attr = _PER_PIXEL_MODULES[type(module)]
            self._per_pixel(node, x, getattr(module, attr) if attr else 1)
        else:
            raise self._unsupported(node)

    def _call_function(self, node: fx.Node) -> None:
        target = node.target
        equivalent = _aten_equivalent(target)
        if target in _LAYER_NORMS:
            kw = self._normalized(node)
            self._layer_norm(
                node,
                kw["input"],
                kw["normalized_shape"],
                _env_or_none(self.env, kw.get("weight")),
                _env_or_none(self.env, kw.get("bias")),
                kw.get("eps", 1e-5),
            )
        elif target in _PERMUTES:
            dims = node.args[1:] if len(node.args) > 2 else node.args[1]
            self._permute(node, node.args[0], _flat([dims]))
        elif target in _EXPANDS:
            self._expand(node, node.args[0])
        elif (per_pixel := _per_pixel_spec(target)) is not None:
            self._per_pixel(node, node.args[0], _dim_of(node, *per_pixel))
        elif target in _ATEN_SLICE:
            self._aten_slice(node, node.args[0], self._normalized(node))
        elif equivalent is not None:
            self._call_aten(node, equivalent)
        elif isinstance(target, OpOverload):
            raise self._unsupported(
                node,
                "it has no exact dense equivalent. Hint: replace it in the model and export "
                f"again. {_SUPPORTED_ATEN}",
            )
        elif target is operator.getitem and _is_multi_output(node.args[0]):
            self._multi_output_item(node, node.args[0], node.args[1])
        elif target is operator.getitem and node.args[0] in self.tuples:
            self._tuple_item(node, node.args[0])
        elif target is operator.getitem:
            self._getitem(node, node.args[0], node.args[1])
        elif target is F.lp_pool2d:
            self._lp_pool(node, self._normalized(node))
        elif target in _ELEMENTWISE_FUNCTIONS:
            self._elementwise(node)
        elif target in _IDENTITY_FUNCTIONS:
            self._alias(node, node.args[0])
        elif target is getattr and node.args[1] in ("shape",):
            self._copy(node)
            self.spatial_size_reads.append(node)
        elif target in (torch.cat, torch.concat):
            self._cat(node)
        elif target is torch.flatten:
            self._reshape_like(node, node.args[0])
        elif (
            target in _SOFTMAX_FUNCTIONS
            or target in _REDUCE_FUNCTIONS
            or target
            in (
                F.conv2d,
                F.max_pool2d,
                F.avg_pool2d,
                F.adaptive_avg_pool2d,
                F.adaptive_max_pool2d,
                F.linear,
                F.batch_norm,
            )
        ):
            self._functional(node, self._normalized(node), target)
        else:
            raise self._unsupported(node)

    def _call_aten(self, node: fx.Node, equivalent: Callable[..., Any] | str) -> None:
        """An aten operator of an exported graph, handled as the call it implements."""
        x = node.args[0] if node.args else None
        if equivalent == "elementwise":
            self._elementwise(node)
        elif equivalent == "reshape":
            self._reshape_like(node, x)
        elif equivalent == "alias":
            self._alias(node, x)
        elif equivalent == "dropout":
            if self._normalized(node).get("train"):
                raise self._unsupported(node, _TRAINING_MODE_HINT)
            self._alias(node, x)
        elif equivalent == "size":
            self._copy(node)
            if self._normalized(node).get("dim") not in (0, -4):
                self.spatial_size_reads.append(node)
        elif equivalent == "matmul":
            self._matmul(node, self._normalized(node))
        elif equivalent == "mutation":
            raise self._unsupported(node, f"it writes a buffer or an input: {_TRAINING_MODE_HINT}")
        elif equivalent is torch.cat:
            self._cat(node)
        elif equivalent is torch.flatten:
            self._reshape_like(node, x)
        elif callable(equivalent):
            kw = self._normalized(node)
            if kw.get("training"):
                raise self._unsupported(node, _TRAINING_MODE_HINT)
            if equivalent is F.conv2d and (kw.get("transposed") or len(_shape(x) or ()) != 4):
                raise self._unsupported(node, "only 2D convolutions (not transposed) densify.")
            self._functional(node, kw, equivalent)
        else:  # pragma: no cover - every kind of the table is handled above
            raise self._unsupported(node)

    def _multi_output_item(self, node: fx.Node, source: fx.Node, index: Any) -> None:
        """``getitem`` of an aten operator returning (result, indices or statistics)."""
        if index == 0:
            self._alias(node, source)
        elif node.users:
            raise self._unsupported(
                node, f"it uses output {index} of {source.target} (indices or statistics)."
            )
        # else: unused indices or statistics; nothing to emit.

    def _functional(
        self, node: fx.Node, kw: dict[str, Any], target: Callable[..., Any] | None = None
    ) -> None:
        """A functional call (or the aten operator implementing ``target``) with named args."""
        if target is None:
            target = node.target  # type: ignore[assignment]
        x, name = kw.get("input"), self._layer_name(node)
        if target is F.conv2d:
            self._conv(
                node,
                x,
                kw["weight"],
                kw.get("bias"),
                kw.get("stride", 1),
                kw.get("padding", 0),
                kw.get("dilation", 1),
                kw.get("groups", 1),
                "zeros",
                op=self._layer_op(node, "conv2d"),
                name=name,
            )
        elif target in (F.max_pool2d, F.avg_pool2d):
            is_max = target is F.max_pool2d
            if is_max and kw.get("return_indices"):
                raise self._unsupported(node, "return_indices=True is not supported.")
            self._pool(
                node,
                x,
                "max" if is_max else "avg",
                kw["kernel_size"],
                kw.get("stride") or kw["kernel_size"],
                kw.get("padding", 0),
                kw.get("dilation", 1) if is_max else 1,
                kw.get("ceil_mode", False),
                None if is_max else kw.get("divisor_override"),
                op=self._layer_op(node, "max_pool2d" if is_max else "avg_pool2d"),
                name=name,
            )
        elif target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            kind = "avg" if target is F.adaptive_avg_pool2d else "max"
            self._adaptive_pool(node, x, kind, kw["output_size"], name=name)
        elif target is F.linear:
            self._linear(node, x, self.env[kw["weight"]], _env_or_none(self.env, kw.get("bias")))
        elif target is F.batch_norm:
            self._batch_norm(node, x, kw)
        elif target in _SOFTMAX_FUNCTIONS:
            self._softmax(node, x, kw.get("dim"), target)
        else:
            self._reduce(
                node, x, _REDUCE_FUNCTIONS[target], kw.get("dim"), kw.get("keepdim", False)
            )

    def _call_method(self, node: fx.Node) -> None:
        method, x = node.target, node.args[0]
        if method in _IDENTITY_METHODS:
            self._alias(node, x)
        elif method in _ELEMENTWISE_METHODS:
            self._elementwise(node)
        elif method in _RESHAPE_METHODS:
            self._reshape_like(node, x)
        elif method == "size":
            self._copy(node)
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dim not in (0, -4):
                self.spatial_size_reads.append(node)
        elif method in _SOFTMAX_METHODS:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            self._softmax(node, x, dim, _SOFTMAX_METHODS[method])
        elif method in _EXPAND_METHODS:
            self._expand(node, x)
        elif method == "permute":
            self._permute(node, x, _flat(node.args[1:] or [node.kwargs.get("dims")]))
        elif method in _PER_PIXEL_METHODS:
            self._per_pixel(node, x, _dim_of(node, *_PER_PIXEL_METHODS[method]))
        elif method in _REDUCE_METHODS:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            self._reduce(node, x, _REDUCE_METHODS[method], dim, node.kwargs.get("keepdim", False))
        else:
            raise self._unsupported(node)

    # -- layers that move over space ---------------------------------------------------------


def _dim_of(node: fx.Node, position: int, name: str, default: int | None) -> Any:
    """The ``dim`` argument of a call (by position or name), or its default."""
    dim = node.args[position] if len(node.args) > position else node.kwargs.get(name, default)
    if isinstance(dim, list | tuple) and len(dim) == 1:
        return dim[0]
    return dim


def _is_check(node: fx.Node) -> bool:
    """A shape assertion (``torch._assert``, aten checks): true of the patch network only."""
    return node.target is torch._assert or _aten_equivalent(node.target) == "check"
