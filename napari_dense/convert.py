"""Convert a patch classifier into a dense network by rewriting its torch.fx graph.

:func:`densify` works in four steps, each a function below:

1. ``_trace``: copy the model (the caller's model is never touched), switch the copy to eval
   mode and trace it with torch.fx.
2. ``_trace`` also runs one patch through the traced graph to learn every tensor's shape in
   the patch network, and checks that the head reduces the patch to 1×1.
3. ``_DenseGraphBuilder`` walks the graph once, in order, and emits the dense form of every node
   into a new graph: a layer of stride ``s`` is either *densified* (run at stride 1, every later
   layer dilated by ``s``: all ``s × s`` phases, as FDFE's multi-pooling, kept "à trous") or kept
   strided. Each dense tensor carries a :class:`~napari_dense.geometry.Lattice`.
4. The new graph and its :class:`~napari_dense.plan.DensePlan` become a
   :class:`~napari_dense.dense.DenseClassifier`.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from . import _ops
from .dense import DenseClassifier
from .errors import PatchSizeError, UnsupportedLayerError
from .geometry import Lattice, Pair, pair
from .plan import DensePlan, Sampling, StridingLayer

__all__ = ["SamplingSpec", "densify", "explain"]

SamplingSpec = str | Mapping[str, str]
_SAMPLINGS = ("all", "none")
# How the s × s phases of a densified layer are carried: "dilated" keeps them interleaved in the
# map and dilates every later kernel (à trous); "batch" moves them into the batch dimension
# (FDFE's multi-pooling, space-to-batch) and unwarps them at the end.
_PHASES = ("dilated", "batch")

_SUPPORTED = (
    "Supported: Conv2d, Max/AvgPool2d, AdaptiveAvg/MaxPool2d, BatchNorm, activations and other "
    "elementwise ops, add/mul/cat of branches, flatten/view + Linear, Softmax/LogSoftmax."
)

# Modules and functions that act on every value (or every channel) independently: they run on
# dense tensors unchanged.
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.PReLU, nn.Threshold, nn.LogSigmoid, nn.Tanhshrink,
)  # fmt: skip
_IDENTITY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS: set[Callable[..., Any]] = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.pow,
    operator.iadd,
    operator.imul,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.log,
    torch.abs,
    torch.clamp,
    torch.sqrt,
    torch.square,
    torch.neg,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.sigmoid,
    F.tanh,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.softplus,
    F.softsign,
    F.prelu,
    F.logsigmoid,
    F.threshold,
}
_IDENTITY_FUNCTIONS: set[Callable[..., Any]] = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "neg", "pow", "relu", "sigmoid", "tanh", "exp", "log", "abs",
    "clamp", "clamp_min", "clamp_max", "sqrt", "square", "maximum", "minimum", "contiguous",
    "float", "add_", "mul_", "relu_", "sigmoid_", "clamp_", "__add__", "__mul__",
}  # fmt: skip
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}
_SOFTMAX_FUNCTIONS: set[Callable[..., Any]] = {
    F.softmax,
    F.log_softmax,
    F.softmin,
    torch.softmax,
    torch.log_softmax,
}
_SOFTMAX_MODULES: dict[type[nn.Module], Callable[..., Any]] = {
    nn.Softmax: F.softmax,
    nn.LogSoftmax: F.log_softmax,
    nn.Softmin: F.softmin,
}
_REDUCE_METHODS = {"mean": "avg", "amax": "max", "sum": "sum"}
_REDUCE_FUNCTIONS: dict[Callable[..., Any], str] = {
    torch.mean: "avg",
    torch.amax: "max",
    torch.sum: "sum",
}


# --------------------------------------------------------------------------------------------
# Step 1 and 2: trace the copy and learn every tensor's shape in the patch network.
# --------------------------------------------------------------------------------------------


@dataclass
class _Traced:
    module: fx.GraphModule
    patch_size: Pair
    in_channels: int
    num_classes: int


def _infer_in_channels(module: nn.Module) -> int:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.LazyConv2d) and not isinstance(
            layer.weight, nn.parameter.UninitializedParameter
        ):
            return int(layer.in_channels)
    raise UnsupportedLayerError(
        f"cannot tell how many input channels {type(module).__name__} expects (no Conv2d found); "
        "pass in_channels=..."
    )


def _trace(model: nn.Module, patch_size: int | tuple[int, int], in_channels: int | None) -> _Traced:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    patch = pair(patch_size, "patch_size")
    if min(patch) < 1:
        raise PatchSizeError(f"patch_size must be positive, got {patch_size!r}")
    # Never touch the caller's model: trace a copy, in eval mode (BatchNorm statistics, no dropout).
    model = copy.deepcopy(model).eval()
    try:
        traced = fx.symbolic_trace(model)
    except Exception as err:
        raise UnsupportedLayerError(
            f"torch.fx cannot trace {type(model).__name__}: {err}. Hint: remove Python control "
            "flow that depends on tensor values from forward(), or mark the offending submodule "
            "as a leaf."
        ) from err
    channels = in_channels if in_channels is not None else _infer_in_channels(model)
    example = torch.zeros(1, channels, *patch)
    try:
        with torch.no_grad():
            ShapeProp(traced).propagate(example)
    except Exception as err:
        raise PatchSizeError(
            f"the model does not accept a {patch[0]}x{patch[1]} patch with {channels} channel(s) "
            f"({type(err).__name__}: {str(err).splitlines()[0]}). "
            f"{_accepted_patch_sizes_hint(traced, channels)}"
        ) from err
    output = next(n for n in traced.graph.nodes if n.op == "output")
    result = output.args[0]
    shape = _shape(result) if isinstance(result, fx.Node) else None
    if shape is None or not (len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1))):
        raise PatchSizeError(
            f"the head must reduce the {patch[0]}x{patch[1]} patch to one vector of class scores "
            f"(N, K) or (N, K, 1, 1), but the model returns {shape if shape else type(result)}. "
            f"{_accepted_patch_sizes_hint(traced, channels)}"
        )
    return _Traced(traced, patch, channels, shape[1])


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _accepted_patch_sizes_hint(traced: fx.GraphModule, channels: int, largest: int = 160) -> str:
    """Which square patch sizes the model accepts (tried cheaply on the meta device)."""
    try:
        meta_model = copy.deepcopy(traced).to("meta")
    except Exception:  # pragma: no cover - exotic modules that cannot move to meta
        return "Check patch_size."
    accepted = []
    for size in range(1, largest + 1):
        try:
            out = meta_model(torch.empty(1, channels, size, size, device="meta"))
        except Exception:
            continue
        if isinstance(out, torch.Tensor) and (out.ndim == 2 or tuple(out.shape[2:]) == (1, 1)):
            accepted.append(size)
    if not accepted:
        return f"No square patch size up to {largest} works: check the model's head."
    return f"This model accepts square patches of size {_ranges(accepted)}."


def _ranges(values: list[int]) -> str:
    parts, start = [], values[0]
    for prev, cur in zip(values, [*values[1:], None], strict=True):
        if cur != prev + 1 if cur is not None else True:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur if cur is not None else start
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Step 3: emit the dense form of every node.
# --------------------------------------------------------------------------------------------


@dataclass
class _Costs:
    macs_per_pixel: float = 0.0
    macs_per_patch: float = 0.0
    bytes_per_pixel: dict[fx.Node, float] = field(default_factory=dict)
    peak_bytes_per_pixel: float = 0.0


class _DenseGraphBuilder:
    """One pass over the traced graph, emitting the dense network's graph."""

    def __init__(self, traced: _Traced, sampling: SamplingSpec, phases: str = "dilated"):
        if phases not in _PHASES:
            raise ValueError(f"phases must be 'dilated' or 'batch', got {phases!r}")
        self.phases = phases
        self.traced = traced
        self.modules = dict(traced.module.named_modules())
        self.default, self.requested = _parse_sampling(sampling)
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}  # traced node -> dense graph node (or constant)
        self.lattice: dict[fx.Node, Lattice] = {}  # traced nodes that hold dense tensors
        self.receptive: dict[fx.Node, Pair] = {}
        self.attrs: dict[str, Any] = {}  # attributes the dense graph reads (shared, not copied)
        self.layers: list[StridingLayer] = []
        self.inexact: list[str] = []
        self.costs = _Costs()
        self.spatial_size_reads: list[fx.Node] = []
        # Striding layers upstream of each dense tensor, and layers that must share a sampling
        # because their branches are joined (their lattices must match).
        self.upstream: dict[fx.Node, frozenset[str]] = {}
        self.ties: dict[str, set[str]] = {}

    # -- the walk ------------------------------------------------------------------------------

    def build(self) -> fx.Graph:
        for node in self.traced.module.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "output":
                self._output(node)
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
            self._track_upstream(node)
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
        result = node.args[0]
        if not isinstance(result, fx.Node) or result not in self.lattice:
            raise UnsupportedLayerError(
                "the model must return one tensor of class scores computed from its input"
            )
        flattened = self.lattice[result].flattened
        if flattened is not None and flattened[1:] != (1, 1):
            raise PatchSizeError(
                f"the model returns a flattened {flattened[0]}x{flattened[1]}x{flattened[2]} "
                "feature map, not one vector per patch: add a Linear head or pick the patch "
                "size at which the map is 1x1"
            )
        out = self.env[result]
        if self.lattice[result].phases:  # phase-batch form: interleave the phases back
            out = self.graph.call_function(_ops.batch_to_space, (out, self.lattice[result].phases))
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
            self._softmax(node, x, module.dim)
        elif isinstance(module, _ELEMENTWISE_MODULES):
            self._elementwise(node)
        else:
            raise self._unsupported(node)

    def _call_function(self, node: fx.Node) -> None:
        target = node.target
        if target in _ELEMENTWISE_FUNCTIONS:
            self._elementwise(node)
        elif target in _IDENTITY_FUNCTIONS:
            self._alias(node, node.args[0])
        elif target is getattr and node.args[1] in ("shape",):
            self._copy(node)
            self.spatial_size_reads.append(node)
        elif target is operator.getitem:
            raise self._unsupported(node, "indexing or slicing a feature map is not supported.")
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
            self._functional(node, self._normalized(node))
        else:
            raise self._unsupported(node)

    def _functional(self, node: fx.Node, kw: dict[str, Any]) -> None:
        target, x = node.target, kw.get("input")
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
                op="conv2d",
                name=node.name,
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
                op=target.__name__ if not is_max else "max_pool2d",
                name=node.name,
            )
        elif target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            kind = "avg" if target is F.adaptive_avg_pool2d else "max"
            self._adaptive_pool(node, x, kind, kw["output_size"], name=node.name)
        elif target is F.linear:
            self._linear(node, x, self.env[kw["weight"]], _env_or_none(self.env, kw.get("bias")))
        elif target is F.batch_norm:
            self._batch_norm(node, x, kw)
        elif target in _SOFTMAX_FUNCTIONS:
            self._softmax(node, x, kw.get("dim"))
        else:
            self._reduce(
                node, x, _REDUCE_FUNCTIONS[target], kw.get("dim"), kw.get("keepdim", False)
            )

    def _call_method(self, node: fx.Node) -> None:
        method, x = node.target, node.args[0]
        if method in _ELEMENTWISE_METHODS:
            self._elementwise(node)
        elif method in _RESHAPE_METHODS:
            self._reshape_like(node, x)
        elif method == "size":
            self._copy(node)
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dim not in (0, -4):
                self.spatial_size_reads.append(node)
        elif method in ("softmax", "log_softmax"):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            self._softmax(node, x, dim)
        elif method in _REDUCE_METHODS:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            self._reduce(node, x, _REDUCE_METHODS[method], dim, node.kwargs.get("keepdim", False))
        else:
            raise self._unsupported(node)

    # -- layers that move over space ---------------------------------------------------------

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
        kernel, dilation = pair(kernel), pair(dilation)
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
            emit=lambda x_new, st, dil, pd: self.graph.call_function(
                _ops.dense_pool2d, (x_new, kind, kernel, dil, st, pd, count)
            ),
        )

    def _adaptive_pool(
        self, node: fx.Node, x: fx.Node, kind: str, output_size: Any, name: str
    ) -> None:
        in_shape, out_shape = _shape(x), _shape(node)
        assert in_shape is not None and out_shape is not None
        size_in, size_out = in_shape[2:], out_shape[2:]
        if any(i % o for i, o in zip(size_in, size_out, strict=True)):
            raise self._unsupported(
                node,
                f"adaptive pooling of a {size_in} map to {size_out} has uneven windows. "
                "Hint: choose a patch size at which the map divides evenly, or pool to 1x1.",
            )
        window = (size_in[0] // size_out[0], size_in[1] // size_out[1])
        self._pool(
            node,
            x,
            kind,
            window,
            window,
            0,
            1,
            False,
            None,
            op=f"Adaptive{kind.capitalize()}Pool2d",
            name=name,
        )

    def _reduce(self, node: fx.Node, x: fx.Node, kind: str, dim: Any, keepdim: bool) -> None:
        """mean / amax / sum over both spatial axes: a global pooling head."""
        in_shape = _shape(x)
        dims = dim if isinstance(dim, list | tuple) else [dim]
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
        emit: Callable[..., fx.Node],
    ) -> None:
        """Emit a layer that slides a window: conv or pooling."""
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
        dense_stride: Pair = (1, 1) if sampling == "all" else stride
        out_lattice = lattice.densified(stride) if sampling == "all" else lattice.strided(stride)
        d = self._emitted_dilation(lattice)
        dilation = (own_dilation[0] * d[0], own_dilation[1] * d[1])
        left, right, top, bottom = padding
        dense_padding = (left * d[1], right * d[1], top * d[0], bottom * d[0])
        self.env[node] = emit(self.env[x], dense_stride, dilation, dense_padding)
        if self.phases == "batch" and stride != (1, 1):
            out_lattice = self._to_phase_batch(node, name, lattice, out_lattice, sampling, stride)
        self.lattice[node] = out_lattice
        total = lattice.total_stride
        rf = self.receptive[x]
        self.receptive[node] = tuple(  # type: ignore[assignment]
            rf[a] + (kernel[a] - 1) * own_dilation[a] * total[a] for a in (0, 1)
        )
        step = out_lattice.step
        self.costs.macs_per_pixel += macs_per_position / (step[0] * step[1])
        self.costs.macs_per_patch += macs_per_position * out_size[0] * out_size[1]

    def _emitted_dilation(self, lattice: Lattice) -> Pair:
        """Dilation of the emitted kernels: none in phase-batch form (each phase is compact)."""
        return lattice.dilation if self.phases == "dilated" else (1, 1)

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
        self.costs.macs_per_pixel += macs / (lattice.step[0] * lattice.step[1])
        self.costs.macs_per_patch += macs

    # -- layers that act per position ---------------------------------------------------------

    def _elementwise(self, node: fx.Node) -> None:
        dense_args = [a for a in node.all_input_nodes if a in self.lattice]
        lattice = self._joined_lattice(node, dense_args)
        env = dict(self.env)
        if len(dense_args) > 1:
            aligned = self.graph.call_function(
                _ops.align_spatial, tuple(self.env[a] for a in dense_args)
            )
            for i, arg in enumerate(dense_args):
                env[arg] = self.graph.call_function(operator.getitem, (aligned, i))
        for arg in node.all_input_nodes:
            if arg not in self.lattice and _shape(arg):
                env[arg] = self._broadcastable(
                    node, arg, vector=_is_vector(dense_args[0]), lattice=lattice
                )
        if node.op == "call_module":
            self.attrs[node.target] = self.modules[node.target]
        self.env[node] = self.graph.node_copy(node, lambda n: env[n])
        self.lattice[node] = lattice
        self.receptive[node] = _max_pair(self.receptive[a] for a in dense_args)

    def _broadcastable(self, node: fx.Node, arg: fx.Node, *, vector: bool, lattice: Lattice) -> Any:
        """A constant operand of an elementwise op, made to broadcast over dense tensors.

        Over a map (N, C, h, w), per-channel constants (C, 1, 1) broadcast unchanged. Over a
        vector (N, F) the constant's last axis is the channel axis, which the dense tensor
        (N, F, H, W) has two axes earlier: append two unit axes.
        """
        shape = _shape(arg)
        assert shape is not None
        if lattice.flattened is not None and any(s > 1 for s in shape):
            raise self._unsupported(node, "it combines a flattened feature map with a tensor.")
        if vector:
            return self.graph.call_method("reshape", (self.env[arg], (*shape, 1, 1)))
        if len(shape) >= 2 and shape[-2:] != (1, 1):
            raise self._unsupported(
                node,
                f"it combines a feature map with a constant of spatial shape {shape[-2:]}, "
                "which has no dense equivalent.",
            )
        return self.env[arg]

    def _batch_norm(self, node: fx.Node, x: fx.Node, source: nn.Module | dict[str, Any]) -> None:
        if self.lattice[x].flattened is not None:
            raise self._unsupported(
                node, "BatchNorm1d of a flattened feature map is not supported."
            )
        keys = ("running_mean", "running_var", "weight", "bias")
        if isinstance(source, nn.Module):
            tensors = [getattr(source, key) for key in keys]
            args = [
                None if t is None else self._get_attr(f"{node.target}.{key}")
                for key, t in zip(keys, tensors, strict=True)
            ]
            eps = source.eps
        else:
            args = [_env_or_none(self.env, source.get(key)) for key in keys]
            eps = source.get("eps", 1e-5)
        if args[0] is None or args[1] is None:
            raise self._unsupported(
                node,
                "batch norm without running statistics normalises over the whole map. "
                "Hint: keep track_running_stats=True.",
            )
        # F.batch_norm normalises dim 1 of (N, C, *): right for maps and for channel vectors.
        self.env[node] = self.graph.call_function(
            F.batch_norm, (self.env[x], *args), {"training": False, "eps": eps}
        )
        self._same_lattice(node, x)

    def _softmax(self, node: fx.Node, x: fx.Node, dim: Any) -> None:
        shape = _shape(x)
        if dim is None or shape is None or dim % len(shape) != 1:
            raise self._unsupported(node, "softmax must run over the class dimension (dim=1).")
        if node.op == "call_module":
            function = _SOFTMAX_MODULES[type(self.modules[node.target])]
        elif node.op == "call_method":
            function = F.softmax if node.target == "softmax" else F.log_softmax
        else:
            function = node.target  # type: ignore[assignment]
        # The class dimension is 1 in the dense tensor (N, K, H, W), whatever it was in (N, K).
        self.env[node] = self.graph.call_function(function, (self.env[x],), {"dim": 1})
        self._same_lattice(node, x)

    def _cat(self, node: fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = _shape(node)
        if shape is None or dim % len(shape) != 1:
            raise self._unsupported(node, "concatenation must join channels (dim=1).")
        dense = [t for t in tensors if t in self.lattice]
        if len(dense) != len(tensors):
            raise self._unsupported(node, "it concatenates a feature map with a constant.")
        lattice = self._joined_lattice(node, dense)
        if lattice.flattened is not None:
            raise self._unsupported(node, "it concatenates flattened feature maps.")
        self.env[node] = self.graph.call_function(_ops.crop_cat, ([self.env[t] for t in dense], 1))
        self.lattice[node] = lattice
        self.receptive[node] = _max_pair(self.receptive[t] for t in dense)

    def _reshape_like(self, node: fx.Node, x: fx.Node) -> None:
        """flatten / view / reshape / squeeze: only those that turn a map into a vector or back."""
        before, after = _shape(x), _shape(node)
        lattice = self.lattice[x]
        if before is None or after is None:
            raise self._unsupported(node)
        if len(before) == 4 and len(after) == 2 and after[1] == before[1] * before[2] * before[3]:
            flattened = before[1:] if before[2:] != (1, 1) else None
            self.lattice[node] = replace(lattice, flattened=flattened)
        elif before[1:] in ((after[1],), (after[1], 1, 1)) and after[2:] in ((), (1, 1)):
            self.lattice[node] = lattice  # (N, K) <-> (N, K, 1, 1): same dense tensor
        else:
            raise self._unsupported(
                node,
                f"it reshapes {tuple(before)} to {tuple(after)}; only flattening a map to "
                "(N, features) or a vector to (N, K, 1, 1) is supported.",
            )
        self.env[node] = self.env[x]
        self.receptive[node] = self.receptive[x]

    def _alias(self, node: fx.Node, x: fx.Node) -> None:
        self.env[node] = self.env[x]
        self._same_lattice(node, x)

    # -- helpers -------------------------------------------------------------------------------

    def _joined_lattice(self, node: fx.Node, branches: list[fx.Node]) -> Lattice:
        """The common lattice of joined branches (they must be sampled alike)."""
        lattices = {self.lattice[b] for b in branches}
        if len(lattices) > 1:
            sampled = {layer.name: layer.sampling for layer in self.layers}
            described = "; ".join(
                f"{b.name} after "
                + (
                    ", ".join(f"{n}={sampled[n]}" for n in sorted(self.upstream[b]))
                    or "no striding layer"
                )
                for b in branches
            )
            raise self._unsupported(
                node,
                f"it joins branches sampled differently ({described}). Hint: densify the "
                "striding layers of all joined branches alike.",
            )
        return lattices.pop()

    def _same_lattice(self, node: fx.Node, x: fx.Node) -> None:
        self.lattice[node] = self.lattice[x]
        self.receptive[node] = self.receptive[x]

    def _spatial_lattice(self, node: fx.Node, x: fx.Node) -> Lattice:
        lattice = self.lattice[x]
        shape = _shape(x)
        if lattice.flattened is not None or shape is None or len(shape) != 4:
            raise self._unsupported(node, "it slides a window over a tensor that is not a map.")
        return lattice

    def _get_attr(self, target: str) -> fx.Node:
        self.attrs[target] = _fetch_attr(self.traced.module, target)
        return self.graph.get_attr(target)

    def _normalized(self, node: fx.Node) -> dict[str, Any]:
        normalized = node.normalized_arguments(
            self.traced.module, normalize_to_only_use_kwargs=True
        )
        if normalized is None:
            raise self._unsupported(node, "its arguments could not be read; pass them by name.")
        return dict(normalized.kwargs)

    def _mark_inexact(self, reason: str) -> None:
        self.inexact.append(reason)

    def _track_upstream(self, node: fx.Node) -> None:
        if node not in self.lattice:
            return
        branches = [self.upstream[a] for a in node.all_input_nodes if a in self.upstream]
        upstream = frozenset().union(*branches)
        if len(branches) > 1:
            tied = upstream - frozenset.intersection(*branches)
            group = set(tied).union(*(self.ties.get(name, set()) for name in tied))
            for name in group:
                self.ties[name] = group
        if self.layers and self.layers[-1].name == _layer_name(node):
            upstream |= {self.layers[-1].name}
        self.upstream[node] = upstream

    def _account_memory(self, node: fx.Node) -> None:
        if node not in self.lattice or node in self.costs.bytes_per_pixel:
            return
        shape = _shape(node)
        lattice = self.lattice[node]
        channels = lattice.flattened[0] if lattice.flattened else (shape[1] if shape else 0)
        per_pixel = 4.0 * channels / (lattice.step[0] * lattice.step[1])
        self.costs.bytes_per_pixel[node] = per_pixel
        inputs = sum(self.costs.bytes_per_pixel.get(a, 0.0) for a in node.all_input_nodes)
        self.costs.peak_bytes_per_pixel = max(self.costs.peak_bytes_per_pixel, inputs + per_pixel)

    def _unsupported(self, node: fx.Node, why: str | None = None) -> UnsupportedLayerError:
        stack = node.meta.get("nn_module_stack") or {}
        where = f" in module '{list(stack)[-1]}'" if stack else ""
        if node.op == "call_module":
            what = f"{type(self.modules[node.target]).__name__} module '{node.target}'"
        elif node.op == "call_method":
            what = f"method .{node.target}()"
        else:
            what = f"function {getattr(node.target, '__name__', node.target)}()"
        reason = why or f"it has no exact dense equivalent. {_SUPPORTED}"
        return UnsupportedLayerError(f"cannot densify node '{node.name}' ({what}{where}): {reason}")


def _parse_sampling(sampling: SamplingSpec) -> tuple[Sampling, dict[str, Sampling]]:
    if isinstance(sampling, str):
        if sampling not in _SAMPLINGS:
            raise ValueError(f"sampling must be 'all', 'none' or a mapping, got {sampling!r}")
        return sampling, {}  # type: ignore[return-value]
    if not isinstance(sampling, Mapping):
        raise TypeError(f"sampling must be 'all', 'none' or a mapping, got {type(sampling)}")
    for name, value in sampling.items():
        if value not in _SAMPLINGS:
            raise ValueError(f"sampling of layer {name!r} must be 'all' or 'none', got {value!r}")
    return "none", dict(sampling)


def _padding4(
    padding: Any, kernel: Pair, dilation: Pair, node: fx.Node, builder: _DenseGraphBuilder
) -> tuple[int, int, int, int]:
    """Padding as (left, right, top, bottom) in patch-network units; marks padding inexact."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        total = [dilation[a] * (kernel[a] - 1) for a in (0, 1)]
        pad = (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
    else:
        py, px = pair(padding)
        pad = (px, px, py, py)
    if any(pad):
        builder._mark_inexact(
            f"{node.target if node.op == 'call_module' else node.name}: padding {pad[2]},{pad[0]}"
            " inside the network (per-patch results depend on the patch border)"
        )
    return pad


def _layer_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _fetch_attr(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _env_or_none(env: dict[fx.Node, Any], value: Any) -> Any:
    return env[value] if isinstance(value, fx.Node) else value


def _is_vector(node: fx.Node) -> bool:
    shape = _shape(node)
    return shape is not None and len(shape) == 2


def _max_pair(pairs: Iterable[Pair]) -> Pair:
    items = list(pairs)
    return (max(p[0] for p in items), max(p[1] for p in items))


# --------------------------------------------------------------------------------------------
# Step 4: the public functions.
# --------------------------------------------------------------------------------------------


def _build(
    traced: _Traced, sampling: SamplingSpec, phases: str = "dilated"
) -> tuple[fx.GraphModule, DensePlan]:
    builder = _DenseGraphBuilder(traced, sampling, phases)
    network = fx.GraphModule(builder.attrs, builder.build(), class_name="DenseNetwork")
    network.graph.eliminate_dead_code()
    builder.check_live(network.graph)
    _relu_in_place(network)
    network.graph.lint()
    network.recompile()
    output = next(n for n in traced.module.graph.nodes if n.op == "output").args[0]
    layers = tuple(
        replace(layer, tied_with=tuple(sorted(builder.ties.get(layer.name, set()) - {layer.name})))
        for layer in builder.layers
    )
    plan = DensePlan(
        patch_size=traced.patch_size,
        in_channels=traced.in_channels,
        num_classes=traced.num_classes,
        layers=layers,
        output_stride=builder.lattice[output].step,
        receptive_field=builder.receptive[output],
        exact=not builder.inexact,
        macs_per_pixel=builder.costs.macs_per_pixel,
        macs_per_patch=builder.costs.macs_per_patch,
        bytes_per_megapixel=builder.costs.peak_bytes_per_pixel * 1e6,
        inexact_reasons=tuple(builder.inexact),
    )
    return network, plan


_FRESH_OUTPUTS = {_ops.dense_conv2d, _ops.linear_as_conv2d, F.batch_norm, _ops.crop_cat}


def _relu_in_place(network: fx.GraphModule) -> None:
    """Apply ReLUs in place where their input is a fresh tensor nobody else reads.

    Dense maps are large: on CPU, an extra full-size allocation per ReLU costs ~15% of the time.
    """
    modules = dict(network.named_modules())
    for node in list(network.graph.nodes):
        is_relu = (
            (node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU)
            or (node.op == "call_function" and node.target in (F.relu, torch.relu))
            or (node.op == "call_method" and node.target == "relu")
        )
        source = node.args[0] if node.args else None
        if (
            is_relu
            and isinstance(source, fx.Node)
            and source.op == "call_function"
            and source.target in _FRESH_OUTPUTS
            and len(source.users) == 1
        ):
            with network.graph.inserting_after(node):
                in_place = network.graph.call_function(torch.relu_, (source,))
            node.replace_all_uses_with(in_place)
            network.graph.erase_node(node)


def _plan_with_costs(traced: _Traced, plan: DensePlan) -> DensePlan:
    """Fill in what densifying each striding layer adds, the others sampled as in ``plan``.

    Layers tied by a join (their branches must share a lattice) are flipped together.
    """
    layers = []
    for layer in plan.layers:
        group = (layer.name, *layer.tied_with)
        variants = {
            choice: _build(traced, {**plan.sampling, **dict.fromkeys(group, choice)})[1]
            for choice in _SAMPLINGS
        }
        layers.append(
            replace(
                layer,
                added_macs_per_pixel=variants["all"].macs_per_pixel
                - variants["none"].macs_per_pixel,
                added_bytes_per_megapixel=(
                    variants["all"].bytes_per_megapixel - variants["none"].bytes_per_megapixel
                ),
            )
        )
    return replace(plan, layers=tuple(layers))


def explain(
    model: nn.Module,
    patch_size: int | tuple[int, int],
    *,
    sampling: SamplingSpec = "all",
    in_channels: int | None = None,
) -> DensePlan:
    """Describe the dense network of ``model`` before building it.

    Parameters
    ----------
    model, patch_size, sampling, in_channels
        As in :func:`densify`.

    Returns
    -------
    DensePlan
        Every striding layer with its kernel, stride, sampling and the cost that densifying it
        adds; totals for the whole network. ``str(plan)`` is a markdown table.
    """
    traced = _trace(model, patch_size, in_channels)
    _, plan = _build(traced, sampling)
    return _plan_with_costs(traced, plan)


def densify(
    model: nn.Module,
    patch_size: int | tuple[int, int],
    *,
    sampling: SamplingSpec = "all",
    phases: str = "dilated",
    in_channels: int | None = None,
) -> DenseClassifier:
    """Convert a patch classifier into a network that evaluates it at every pixel in one pass.

    Parameters
    ----------
    model
        A module mapping ``(N, C, Ph, Pw)`` to class scores ``(N, K)`` or ``(N, K, 1, 1)``. It is
        copied, never modified.
    patch_size
        ``Ph`` or ``(Ph, Pw)``: the patch the classifier was trained on.
    sampling
        ``"all"`` (advanced: every pooling/strided layer evaluated at all phases, exact at every
        pixel), ``"none"`` (simple: fully convolutional, one output per ``output_stride``
        pixels), or a mapping ``{layer name: "all" | "none"}`` (custom; layers not named are
        ``"none"``). Names are those of :func:`explain`.
    phases
        How the phases of densified layers are carried, same result either way:
        ``"dilated"`` (default; later kernels dilated, "à trous") or ``"batch"`` (FDFE's
        space-to-batch: phases moved into the batch dimension and unwarped at the end; no layer
        may stay strided after a densified one). See README "Performance" for measurements.
    in_channels
        Input channels, when the model has no ``Conv2d`` to read them from.

    Returns
    -------
    DenseClassifier
        ``forward(x)`` maps ``(N, C, H, W)`` to ``(N, K, H', W')`` where output ``[i, j]`` is the
        classifier's output for the patch with top-left corner ``(i * sy, j * sx)``,
        ``(sy, sx) = output_stride``, and ``H' = (H - Ph) // sy + 1``.

    Warns
    -----
    UserWarning
        Once, when padding inside the network makes the dense output differ from per-patch
        evaluation (``exact`` is then False).
    """
    traced = _trace(model, patch_size, in_channels)
    network, plan = _build(traced, sampling, phases)
    plan = _plan_with_costs(traced, plan)
    if not plan.exact:
        warnings.warn(
            "the dense network is not exact: "
            + "; ".join(plan.inexact_reasons)
            + ". Use napari_dense.compare / reference.patchwise to measure the deviation.",
            stacklevel=2,
        )
    return DenseClassifier(network, plan)
