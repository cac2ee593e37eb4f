"""Convert a patch classifier into a dense network by rewriting its torch.fx graph.

:func:`densify` works in four steps, each a function below:

1. ``_trace``: copy the model (the caller's model is never touched), switch the copy to eval
   mode and trace it with torch.fx. A :func:`torch.export.export` program (or ``ep.module()``,
   or an :class:`ExportedModule`) is already a graph, of aten operators: its graph is copied,
   with private copies of its parameters, and the builder maps each aten operator onto the
   handler of the ``torch.nn.functional`` call it implements (``_ATEN_EQUIVALENTS``).
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

import collections
import copy
import operator
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._ops import OpOverload, OpOverloadPacket
from torch.export import ExportedProgram
from torch.fx.passes.shape_prop import ShapeProp

from . import _ops
from .dense import DenseClassifier
from .errors import InputError, PatchSizeError, UnsupportedLayerError
from .geometry import Lattice, Pair, checkered_phases, pair, sample_grid
from .plan import SAMPLINGS, DensePlan, Sampling, SamplingCost, StridingLayer

__all__ = [
    "Classifier",
    "ExportedModule",
    "SamplingSpec",
    "accepted_patch_sizes",
    "densify",
    "explain",
]

SamplingSpec = str | Mapping[str, str]
#: What densify/explain accept: a module (traced with torch.fx) or a torch.export program.
Classifier = nn.Module | ExportedProgram
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


def _aten_ops(*names: str) -> list[OpOverload | OpOverloadPacket]:
    """aten operators by name (``"relu"`` for every overload, ``"mean.dim"`` for one).

    Names this torch build lacks are left out (the table spans torch versions).
    """
    found: list[OpOverload | OpOverloadPacket] = []
    for name in names:
        packet, _, overload = name.partition(".")
        try:
            op = getattr(torch.ops.aten, packet)
            found.append(getattr(op, overload) if overload else op)
        except (AttributeError, RuntimeError):
            continue
    return found


_ATEN_ELEMENTWISE = (
    "relu", "relu_", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish",
    "sigmoid", "tanh", "hardtanh", "hardswish", "hardsigmoid", "softplus", "prelu",
    "_prelu_kernel", "log_sigmoid", "threshold", "exp", "log", "abs", "neg", "sqrt", "rsqrt",
    "square", "pow", "reciprocal", "erf", "clamp", "clamp_min", "clamp_max", "add", "sub", "rsub",
    "mul", "div", "maximum", "minimum", "to", "_to_copy", "log1p", "expm1", "sign", "floor",
    "ceil", "round", "trunc", "fmod", "remainder", "sin", "cos", "where", "gt", "ge", "lt", "le",
    "eq", "ne", "logical_and", "logical_or", "logical_not", "zeros_like", "ones_like", "full_like",
    "empty_like",
)  # fmt: skip
_ATEN_CHECKS = (
    "_assert_tensor_metadata", "_assert_scalar", "_assert_async", "_functional_assert_scalar",
    "sym_constrain_range", "sym_constrain_range_for_size",
)  # fmt: skip
_ATEN_DROPOUTS = (
    "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "native_dropout",
)  # fmt: skip
# The Linear of a decomposed graph multiplies by its weight transposed by one of these.
_ATEN_TRANSPOSES = set(_aten_ops("t.default", "numpy_T.default", "transpose.int"))
_ATEN_PERMUTE = set(_aten_ops("permute.default"))

# torch.export graphs call aten operators. Each one is handled as the torch function it implements
# (the same handler as the fx path), or as a kind of node: "elementwise", "reshape" (a view that
# flattens or unflattens), "alias", "dropout" (an alias in eval mode), "matmul" (addmm / mm: a
# Linear after run_decompositions), "size" (reads a dimension), "check" (a shape assertion of the
# patch network, meaningless for the dense one) or "mutation" (writes a buffer: training mode).
# Overloads are looked up before their packet: ``mean.dim`` reduces given dims, ``mean.default``
# everything (unsupported).
_ATEN_EQUIVALENTS: dict[OpOverload | OpOverloadPacket, Callable[..., Any] | str] = {
    **dict.fromkeys(_aten_ops("conv2d", "convolution.default"), F.conv2d),
    **dict.fromkeys(_aten_ops("max_pool2d", "max_pool2d_with_indices.default"), F.max_pool2d),
    **dict.fromkeys(_aten_ops("avg_pool2d"), F.avg_pool2d),
    **dict.fromkeys(
        _aten_ops("adaptive_avg_pool2d", "_adaptive_avg_pool2d.default"), F.adaptive_avg_pool2d
    ),
    **dict.fromkeys(_aten_ops("adaptive_max_pool2d"), F.adaptive_max_pool2d),
    **dict.fromkeys(_aten_ops("linear"), F.linear),
    **dict.fromkeys(
        _aten_ops(
            "batch_norm", "_native_batch_norm_legit_no_training.default", "native_batch_norm"
        ),
        F.batch_norm,
    ),
    **dict.fromkeys(_aten_ops("softmax.int", "_softmax.default"), F.softmax),
    **dict.fromkeys(_aten_ops("log_softmax.int", "_log_softmax.default"), F.log_softmax),
    **dict.fromkeys(_aten_ops("mean.dim"), torch.mean),
    **dict.fromkeys(_aten_ops("amax.default"), torch.amax),
    **dict.fromkeys(_aten_ops("sum.dim_IntList"), torch.sum),
    **dict.fromkeys(_aten_ops("cat", "concat", "concatenate"), torch.cat),
    **dict.fromkeys(
        _aten_ops("flatten", "view", "reshape", "_unsafe_view", "squeeze", "unsqueeze"), "reshape"
    ),
    **dict.fromkeys(_aten_ops("addmm.default", "mm.default"), "matmul"),
    **dict.fromkeys(_aten_ops("clone", "alias", "detach", "contiguous"), "alias"),
    **dict.fromkeys(_aten_ops(*_ATEN_DROPOUTS), "dropout"),
    **dict.fromkeys(_aten_ops("sym_size.int"), "size"),
    **dict.fromkeys(_aten_ops(*_ATEN_CHECKS), "check"),
    **dict.fromkeys(_aten_ops("copy_"), "mutation"),
    **dict.fromkeys(_aten_ops(*_ATEN_ELEMENTWISE), "elementwise"),
}
_TRAINING_MODE_HINT = (
    "the program was exported in training mode. Hint: export the model in eval mode, "
    "torch.export.export(model.eval(), (example,))."
)
# aten operators that return a tuple whose element 0 is the result (then read by getitem).
_ATEN_MULTI_OUTPUT = set(
    _aten_ops(
        "max_pool2d_with_indices.default", "adaptive_max_pool2d.default", "native_dropout.default",
        "_native_batch_norm_legit_no_training.default", "native_batch_norm.default",
    )
)  # fmt: skip
_SUPPORTED_ATEN = (
    "Supported aten operators: conv2d/convolution, max/avg_pool2d, adaptive pools, mean/amax/sum "
    "over (2, 3), linear/addmm, batch_norm, elementwise ops, cat, flatten/view/reshape, "
    "softmax/log_softmax, dropout in eval mode."
)
# Modules whose calls torch.export records (in nn_module_stack) around the aten operator they
# become: the layer keeps its module's name, as in the fx path.
_LAYER_MODULES: dict[Callable[..., Any], type[nn.Module]] = {
    F.conv2d: nn.Conv2d,
    F.max_pool2d: nn.MaxPool2d,
    F.avg_pool2d: nn.AvgPool2d,
    F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
    F.adaptive_max_pool2d: nn.AdaptiveMaxPool2d,
}


def _aten_equivalent(target: Any) -> Callable[..., Any] | str | None:
    if not isinstance(target, OpOverload):
        return None
    found = _ATEN_EQUIVALENTS.get(target)
    return found if found is not None else _ATEN_EQUIVALENTS.get(target.overloadpacket)


# --------------------------------------------------------------------------------------------
# Step 1 and 2: trace the copy and learn every tensor's shape in the patch network.
# --------------------------------------------------------------------------------------------


@dataclass
class _Traced:
    module: fx.GraphModule
    patch_size: Pair
    in_channels: int
    num_classes: int


@dataclass
class _Graph:
    """Step 1's result: a graph the caller does not own, and how it was made."""

    module: fx.GraphModule
    # The input shape a torch.export program was exported with (ints, or the names of dynamic
    # dimensions); None for modules traced here.
    exported_shape: tuple[int | str, ...] | None = None

    @property
    def example_batch(self) -> int:
        """A batch size the graph accepts: exported programs may have a fixed one."""
        batch = self.exported_shape[0] if self.exported_shape else 1
        return batch if isinstance(batch, int) else 1


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


def _graph_of(model: Classifier) -> _Graph:
    """Step 1: the model's graph, on private copies of its parameters."""
    if isinstance(model, ExportedModule):
        model = model.exported_program
    if isinstance(model, ExportedProgram) or _is_exported_module(model):
        return _exported_graph(model)
    if not isinstance(model, nn.Module):
        raise TypeError(
            "model must be a torch.nn.Module or a torch.export.ExportedProgram, got "
            f"{type(model).__name__}"
        )
    # Never touch the caller's model: trace a copy, in eval mode (BatchNorm statistics, no dropout).
    model = copy.deepcopy(model).eval()
    try:
        return _Graph(fx.symbolic_trace(model))
    except Exception as err:
        raise UnsupportedLayerError(
            f"torch.fx cannot trace {type(model).__name__}: {err}. Hint: remove Python control "
            "flow that depends on tensor values from forward(), or mark the offending submodule "
            "as a leaf."
        ) from err


def _is_exported_module(model: object) -> bool:
    """Whether ``model`` is ``ep.module()`` of a torch.export program (a graph of aten ops)."""
    return isinstance(model, fx.GraphModule) and any(
        isinstance(node.target, OpOverload) or _is_guard(node) for node in model.graph.nodes
    )


def _is_guard(node: fx.Node) -> bool:
    """The shape guard that ``ep.module()`` calls on its input (checks the patch network only)."""
    return node.op == "call_module" and str(node.target).startswith("_guards_fn")


def _exported_graph(model: ExportedProgram | fx.GraphModule) -> _Graph:
    if isinstance(model, ExportedProgram):
        signature = model.graph_signature
        if signature.buffers_to_mutate or signature.user_inputs_to_mutate:
            raise UnsupportedLayerError(
                "the exported program updates its buffers or inputs (BatchNorm statistics: it was "
                "exported in training mode). Hint: export the model in eval mode, "
                "torch.export.export(model.eval(), (example,))."
            )
        model = model.module()
    # A new GraphModule over a copy of the graph (plain code generation, no pytree wrapping of
    # the input) with private copies of the parameters, which ep.module() shares with the
    # caller's program and often with the original model.
    graph = fx.Graph()
    graph.output(graph.graph_copy(model.graph, {}))
    module = fx.GraphModule(model, graph, class_name="ExportedClassifier")
    for node in graph.nodes:  # called submodules (the guard) are shared, not copied: copy them
        if node.op == "call_module":
            parent, _, name = str(node.target).rpartition(".")
            owner = module.get_submodule(parent) if parent else module
            setattr(owner, name, copy.deepcopy(module.get_submodule(str(node.target))))
    for submodule in module.modules():
        for name, param in submodule._parameters.items():
            if param is not None:
                submodule._parameters[name] = nn.Parameter(
                    param.detach().clone(), requires_grad=param.requires_grad
                )
        for name, buffer in submodule._buffers.items():
            if buffer is not None:
                submodule._buffers[name] = buffer.detach().clone()
    inputs = [n for n in graph.nodes if n.op == "placeholder" and "val" in n.meta]
    shape = None
    if inputs and isinstance(inputs[0].meta["val"], torch.Tensor):
        shape = tuple(d if isinstance(d, int) else str(d) for d in inputs[0].meta["val"].shape)
    return _Graph(module, shape)


class ExportedModule(nn.Module):
    """A torch.export program as a module, callable on patch batches like the original classifier.

    :func:`densify` and :func:`explain` convert its ``exported_program``. Calling it runs the
    program's graph on private copies of the parameters. Unlike ``ep.module()``, ``train()`` and
    ``eval()`` work (they only set the flag: the mode was fixed at export), and a program exported
    with a fixed batch size takes any batch (split into batches of that size), so per-patch code
    such as :func:`napari_dense.reference.patchwise` can use it.

    Parameters
    ----------
    program
        A program exported from a patch classifier (``torch.export.export`` or ``load``).
    """

    def __init__(self, program: ExportedProgram):
        super().__init__()
        if not isinstance(program, ExportedProgram):
            raise TypeError(f"expected a torch.export.ExportedProgram, got {type(program)}")
        graph = _exported_graph(program)
        self.network = graph.module
        self.exported_program = program
        batch = graph.exported_shape[0] if graph.exported_shape else None
        self.fixed_batch = batch if isinstance(batch, int) else None

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode  # the program's own mode was fixed when it was exported
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            if x.shape[0] % self.fixed_batch:
                raise InputError(
                    f"the program was exported for batches of {self.fixed_batch}, got "
                    f"{x.shape[0]}; export it with a dynamic batch (torch.export.Dim)"
                )
            return torch.cat([self(chunk) for chunk in x.split(self.fixed_batch)])
        out = self.network(x)
        return out[0] if isinstance(out, tuple | list) and len(out) == 1 else out

    def extra_repr(self) -> str:
        return f"fixed_batch={self.fixed_batch}"


def _check_exported_shape(graph: _Graph, patch: Pair, channels: int) -> None:
    """A program exported with a static input shape accepts only that patch (its guard says so)."""
    shape = graph.exported_shape
    if shape is None or len(shape) != 4:
        return
    height, width = shape[2:]
    if isinstance(height, int) and isinstance(width, int) and (height, width) != patch:
        raise PatchSizeError(
            f"the exported program was exported for a {height}x{width} patch (input shape "
            f"{_format_shape(shape)}), not {patch[0]}x{patch[1]}: pass patch_size=({height}, "
            f"{width}), or export with dynamic spatial dimensions (torch.export.Dim) to accept "
            "other patch sizes"
        )
    if isinstance(shape[1], int) and shape[1] != channels:
        raise PatchSizeError(
            f"the exported program takes {shape[1]} channel(s) (input shape "
            f"{_format_shape(shape)}), not {channels}: drop in_channels or pass {shape[1]}"
        )


def _format_shape(shape: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _trace(
    model: Classifier, patch_size: int | tuple[int, int], in_channels: int | None
) -> _Traced:
    patch = pair(patch_size, "patch_size")
    if min(patch) < 1:
        raise PatchSizeError(f"patch_size must be positive, got {patch_size!r}")
    graph = _graph_of(model)
    traced = graph.module
    channels = in_channels if in_channels is not None else _graph_in_channels(graph)
    _check_exported_shape(graph, patch, channels)
    example = torch.zeros(graph.example_batch, channels, *patch)
    try:
        with torch.no_grad():
            traced(example)  # first plainly: ShapeProp prints a traceback when the patch fails
            ShapeProp(traced).propagate(example)
    except Exception as err:
        cause = _root_cause(err)
        raise PatchSizeError(
            f"the model does not accept a {patch[0]}x{patch[1]} patch with {channels} channel(s) "
            f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}). "
            f"{_accepted_patch_sizes_hint(graph, channels)}"
        ) from err
    result = _graph_output(traced.graph)
    shape = _shape(result) if isinstance(result, fx.Node) else None
    if shape is None or not (len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1))):
        raise PatchSizeError(
            f"the head must reduce the {patch[0]}x{patch[1]} patch to one vector of class scores "
            f"(N, K) or (N, K, 1, 1), but the model returns {shape if shape else type(result)}. "
            f"{_accepted_patch_sizes_hint(graph, channels)}"
        )
    return _Traced(traced, patch, channels, shape[1])


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
        self.owners = _layer_owners(traced.module.graph)

    # -- the walk ------------------------------------------------------------------------------

    def build(self) -> fx.Graph:
        for node in self.traced.module.graph.nodes:
            layers_before = len(self.layers)
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "output":
                self._output(node)
            elif _is_guard(node) or _aten_equivalent(node.target) == "check":
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
        else:
            raise self._unsupported(node)

    def _call_function(self, node: fx.Node) -> None:
        target = node.target
        equivalent = _aten_equivalent(target)
        if equivalent is not None:
            self._call_aten(node, equivalent)
        elif isinstance(target, OpOverload):
            raise self._unsupported(
                node,
                "it has no exact dense equivalent. Hint: replace it in the model and export "
                f"again. {_SUPPORTED_ATEN}",
            )
        elif target is operator.getitem and _is_multi_output(node.args[0]):
            self._multi_output_item(node, node.args[0], node.args[1])
        elif target in _ELEMENTWISE_FUNCTIONS:
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
            self._softmax(node, x, dim, F.softmax if method == "softmax" else F.log_softmax)
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
            pad_with=("constant", float("-inf") if kind == "max" else 0.0),
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
        self.costs.macs_per_pixel += macs * lattice.density
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

    def _softmax(self, node: fx.Node, x: fx.Node, dim: Any, function: Callable[..., Any]) -> None:
        """``function`` (softmax, log_softmax, softmin) over the class dimension."""
        shape = _shape(x)
        if dim is None or shape is None or dim % len(shape) != 1:
            raise self._unsupported(node, "softmax must run over the class dimension (dim=1).")
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

    def _track_upstream(self, node: fx.Node, new_layer: str | None) -> None:
        if node not in self.lattice:
            return
        branches = [self.upstream[a] for a in node.all_input_nodes if a in self.upstream]
        upstream = frozenset().union(*branches)
        if len(branches) > 1:
            tied = upstream - frozenset.intersection(*branches)
            group = set(tied).union(*(self.ties.get(name, set()) for name in tied))
            for name in group:
                self.ties[name] = group
        if new_layer is not None:
            upstream |= {new_layer}
        self.upstream[node] = upstream

    def _account_memory(self, node: fx.Node) -> None:
        if node not in self.lattice or node in self.costs.bytes_per_pixel:
            return
        shape = _shape(node)
        lattice = self.lattice[node]
        channels = lattice.flattened[0] if lattice.flattened else (shape[1] if shape else 0)
        per_pixel = 4.0 * channels * lattice.density
        self.costs.bytes_per_pixel[node] = per_pixel
        inputs = sum(self.costs.bytes_per_pixel.get(a, 0.0) for a in node.all_input_nodes)
        self.costs.peak_bytes_per_pixel = max(self.costs.peak_bytes_per_pixel, inputs + per_pixel)

    def _layer_name(self, node: fx.Node) -> str:
        """The name of a striding layer in the plan (what ``sampling`` mappings refer to).

        A module's qualified name (``features.2``); for an aten operator, the name of the module
        torch.export recorded around it, as the fx path names it; else the node's name.
        """
        if node.op == "call_module":
            return str(node.target)
        owner = self.owners.get(node)
        return owner[0] if owner else node.name

    def _layer_op(self, node: fx.Node, functional: str) -> str:
        """The layer's type for the plan: its module's class name, else the functional's name."""
        owner = self.owners.get(node)
        return owner[1].__name__ if owner else functional

    def _unsupported(self, node: fx.Node, why: str | None = None) -> UnsupportedLayerError:
        stack = node.meta.get("nn_module_stack") or {}
        paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v and v[0]]
        where = f" in module '{paths[-1]}'" if paths else ""
        if node.op == "call_module":
            what = f"{type(self.modules[node.target]).__name__} module '{node.target}'"
        elif node.op == "call_method":
            what = f"method .{node.target}()"
        elif isinstance(node.target, OpOverload):
            what = f"operator {node.target}"
        else:
            what = f"function {getattr(node.target, '__name__', node.target)}()"
        reason = why or f"it has no exact dense equivalent. {_SUPPORTED}"
        return UnsupportedLayerError(f"cannot densify node '{node.name}' ({what}{where}): {reason}")


def _parse_sampling(sampling: SamplingSpec) -> tuple[Sampling, dict[str, Sampling]]:
    if isinstance(sampling, str):
        if sampling not in SAMPLINGS:
            raise ValueError(
                f"sampling must be 'all', 'checkered', 'none' or a mapping, got {sampling!r}"
            )
        return sampling, {}
    if not isinstance(sampling, Mapping):
        raise TypeError(
            f"sampling must be 'all', 'checkered', 'none' or a mapping, got {type(sampling)}"
        )
    for name, value in sampling.items():
        if value not in SAMPLINGS:
            raise ValueError(
                f"sampling of layer {name!r} must be 'all', 'checkered' or 'none', got {value!r}"
            )
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
            f"{builder._layer_name(node)}: padding {pad[2]},{pad[0]}"
            " inside the network (per-patch results depend on the patch border)"
        )
    return pad


def _flat(values: Iterable[Any]) -> list[Any]:
    """``(1, 0)`` from ``([1, 0],)`` (permute) or ``(1, 0)`` (transpose)."""
    return [v for item in values for v in (item if isinstance(item, list | tuple) else [item])]


def _is_multi_output(node: Any) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and (node.target in _ATEN_MULTI_OUTPUT)
    )


def _layer_owners(graph: fx.Graph) -> dict[fx.Node, tuple[str, type[nn.Module]]]:
    """For aten operators of exported graphs: the layer module each implements (path, class).

    torch.export records the module calls around every operator (``nn_module_stack``); the
    innermost one names the layer when it is the module of that operator (a Conv2d around
    conv2d) and owns no other such operator.
    """
    candidates: dict[fx.Node, tuple[str, type[nn.Module]]] = {}
    for node in graph.nodes:
        equivalent = _aten_equivalent(node.target) if node.op == "call_function" else None
        layer_type = _LAYER_MODULES.get(equivalent) if callable(equivalent) else None
        stack = node.meta.get("nn_module_stack") or {}
        if layer_type is None or not stack:
            continue
        entry = list(stack.values())[-1]
        if not (isinstance(entry, tuple) and len(entry) == 2 and entry[0]):
            continue
        path, module_type = entry
        qualified = f"{layer_type.__module__}.{layer_type.__qualname__}"
        if module_type is layer_type or module_type == qualified:
            candidates[node] = (str(path), layer_type)
    uses = collections.Counter(path for path, _ in candidates.values())
    return {node: owner for node, owner in candidates.items() if uses[owner[0]] == 1}


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
    return network, _plan_of(builder)


def _plan_of(builder: _DenseGraphBuilder) -> DensePlan:
    """The plan of a built graph (costs are counted while building, before any compiling)."""
    traced = builder.traced
    output = _graph_output(traced.module.graph)
    layers = tuple(
        replace(layer, tied_with=tuple(sorted(builder.ties.get(layer.name, set()) - {layer.name})))
        for layer in builder.layers
    )
    lattice = builder.lattice[output]
    grid, pattern = sample_grid(lattice)
    return DensePlan(
        patch_size=traced.patch_size,
        in_channels=traced.in_channels,
        num_classes=traced.num_classes,
        layers=layers,
        output_stride=grid,
        receptive_field=builder.receptive[output],
        exact=not builder.inexact,
        macs_per_pixel=builder.costs.macs_per_pixel,
        macs_per_patch=builder.costs.macs_per_patch,
        bytes_per_megapixel=builder.costs.peak_bytes_per_pixel * 1e6,
        inexact_reasons=tuple(builder.inexact),
        density=lattice.density,
        sample_pattern=pattern if lattice.checkered else None,
    )


_ATEN_RELU = torch.ops.aten.relu.default
_FRESH_OUTPUTS = {_ops.dense_conv2d, _ops.linear_as_conv2d, F.batch_norm, _ops.crop_cat}


def _relu_in_place(network: fx.GraphModule) -> None:
    """Apply ReLUs in place where their input is a fresh tensor nobody else reads.

    Dense maps are large: on CPU, an extra full-size allocation per ReLU costs ~15% of the time.
    """
    modules = dict(network.named_modules())
    for node in list(network.graph.nodes):
        is_relu = (
            (node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU)
            or (node.op == "call_function" and node.target in (F.relu, torch.relu, _ATEN_RELU))
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
    """Fill in each striding layer's costs for every sampling, the others sampled as in ``plan``.

    Layers tied by a join (their branches must share a lattice) are flipped together.
    """
    layers = []
    for layer in plan.layers:
        group = (layer.name, *layer.tied_with)
        variants = {}
        for choice in SAMPLINGS:
            # Only the costs are needed: the graph is built, never compiled into a module.
            builder = _DenseGraphBuilder(traced, {**plan.sampling, **dict.fromkeys(group, choice)})
            builder.build()
            variants[choice] = _plan_of(builder)
        costs = tuple(
            SamplingCost(choice, v.density, v.macs_per_pixel, v.bytes_per_megapixel)
            for choice, v in variants.items()  # SAMPLINGS order: cheapest first
        )
        layers.append(
            replace(
                layer,
                costs=costs,
                added_macs_per_pixel=variants["all"].macs_per_pixel
                - variants["none"].macs_per_pixel,
                added_bytes_per_megapixel=(
                    variants["all"].bytes_per_megapixel - variants["none"].bytes_per_megapixel
                ),
            )
        )
    return replace(plan, layers=tuple(layers))


def explain(
    model: Classifier,
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
    model: Classifier,
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
        A module mapping ``(N, C, Ph, Pw)`` to class scores ``(N, K)`` or ``(N, K, 1, 1)``
        (traced with torch.fx), or a :func:`torch.export.export` program of one (or its
        ``ep.module()``, or an :class:`ExportedModule`), exported in eval mode with a
        ``(N, C, Ph, Pw)`` example (or dynamic spatial dimensions). It is copied, never
        modified.
    patch_size
        ``Ph`` or ``(Ph, Pw)``: the patch the classifier was trained on (for an exported
        program, the patch it was exported with).
    sampling
        ``"all"`` (advanced: every pooling/strided layer evaluated at all phases, exact at every
        pixel), ``"none"`` (simple: fully convolutional, one output per ``output_stride``
        pixels), ``"checkered"`` (multisampling: every striding layer evaluated at half of its
        phases, :func:`~napari_dense.geometry.checkered_phases`; the computed samples form
        ``plan.sample_pattern``), or a mapping ``{layer name: "all" | "checkered" | "none"}``
        (custom; layers not named are ``"none"``). Names are those of :func:`explain`.
    phases
        How the phases of densified layers are carried, same result either way:
        ``"dilated"`` (default; later kernels dilated, "à trous") or ``"batch"`` (FDFE's
        space-to-batch: phases moved into the batch dimension and unwarped at the end; no layer
        may stay strided after a densified one, none may be checkered). See README
        "Performance" for measurements.
    in_channels
        Input channels, when the model has no ``Conv2d`` to read them from.

    Returns
    -------
    DenseClassifier
        ``forward(x)`` maps ``(N, C, H, W)`` to ``(N, K, H', W')`` where output ``[i, j]`` is the
        classifier's output for the patch with top-left corner ``(i * sy, j * sx)``,
        ``(sy, sx) = output_stride``, and ``H' = (H - Ph) // sy + 1``. With checkered layers
        only the points of ``sample_pattern`` (repeated) are computed, the others are zero.

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
