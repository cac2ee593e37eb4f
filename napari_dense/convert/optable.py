"""The table of op semantics: how each module, function, method and aten operator densifies."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._ops import OpOverload, OpOverloadPacket

# How the s × s phases of a densified layer are carried: "dilated" keeps them interleaved in the
# map and dilates every later kernel (à trous); "batch" moves them into the batch dimension
# (FDFE's multi-pooling, space-to-batch) and unwarps them at the end.
_PHASES = ("dilated", "batch")

_SUPPORTED = (
    "Supported: pointwise ops (activations, arithmetic, BatchNorm), ops over the channels of "
    "each pixel, Conv2d and pools, global reductions, flatten/view + Linear, constant crops, "
    "add/mul/cat of branches (README 'What converts')."
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
_ELEMENTWISE_FUNCTIONS |= {
    torch.where, torch.erf, torch.special.erf, torch.clone, torch.rsqrt, torch.reciprocal,
    torch.sign, torch.gt, torch.ge, torch.lt, torch.le, torch.eq, torch.ne, torch.logical_not,
    torch.logical_and, torch.logical_or, torch.pow, operator.gt, operator.ge, operator.lt,
    operator.le, operator.eq, operator.ne, operator.and_, operator.or_, operator.invert,
    torch.erfc, torch.log1p, torch.expm1, torch.floor, torch.ceil, torch.round, F.elu,
}  # fmt: skip
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
    "float", "add_", "mul_", "relu_", "sigmoid_", "clamp_", "__add__", "__mul__", "clone",
    "to", "type_as", "detach", "erf", "gt", "ge", "lt", "le", "eq", "ne", "where", "rsqrt",
    "reciprocal", "sign", "masked_fill", "logical_not", "__and__", "__or__", "sub_", "div_",
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
    "empty_like", "add_", "sub_", "mul_", "div_", "relu_", "clamp_", "clamp_min_", "sigmoid_",
    "tanh_", "hardtanh_", "leaky_relu_", "elu_", "silu_", "hardswish_",
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
        "native_layer_norm.default",
    )
)  # fmt: skip
_SUPPORTED_ATEN = (
    "Supported aten operators: conv2d/convolution, max/avg_pool2d, adaptive pools, mean/amax/sum "
    "over (2, 3) or dim 1, linear/addmm, batch_norm, layer_norm, elementwise ops, cat, slice, "
    "split/chunk, permute to channels last, flatten/view/reshape, softmax/log_softmax, dropout "
    "in eval mode."
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


def _flat(values: Iterable[Any]) -> list[Any]:
    """``(1, 0)`` from ``([1, 0],)`` (permute) or ``(1, 0)`` (transpose)."""
    return [v for item in values for v in (item if isinstance(item, list | tuple) else [item])]


def _is_multi_output(node: Any) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and (node.target in _ATEN_MULTI_OUTPUT)
    )


# Python signatures of functionals whose aten schema fx cannot match unambiguously
# (F.conv2d: padding is an int list or a string).
_SIGNATURES: dict[Any, tuple[str, ...]] = {
    F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.max_pool2d: (
        "input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices",
    ),
    F.avg_pool2d: (
        "input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
        "divisor_override",
    ),
    F.linear: ("input", "weight", "bias"),
    F.batch_norm: (
        "input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps",
    ),
    F.adaptive_avg_pool2d: ("input", "output_size"),
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    F.lp_pool2d: ("input", "norm_type", "kernel_size", "stride", "ceil_mode"),
    F.adaptive_max_pool2d: ("input", "output_size", "return_indices"),
}  # fmt: skip


# Per pixel over channels: module types (the channel dim read from the module, or always 1)
# and functions / methods with where their ``dim`` argument sits (position, name, default).
_PER_PIXEL_MODULES: dict[type[nn.Module], str | None] = {
    nn.LocalResponseNorm: None, nn.Softmax2d: None, nn.ChannelShuffle: None, nn.GLU: "dim",
}  # fmt: skip
_PER_PIXEL_FUNCTIONS: dict[Any, tuple[int, str, int | None]] = {
    F.normalize: (2, "dim", 1),
    F.local_response_norm: (99, "dim", 1),
    F.glu: (1, "dim", -1),
    torch.chunk: (2, "dim", 0),
    torch.split: (2, "dim", 0),
    torch.logsumexp: (1, "dim", None),
}
_PER_PIXEL_METHODS: dict[str, tuple[int, str, int | None]] = {
    "chunk": (2, "dim", 0),
    "split": (2, "dim", 0),
    "logsumexp": (1, "dim", None),
    "amin": (1, "dim", None),
    "norm": (2, "dim", None),
}
_PER_PIXEL_ATEN = (
    dict.fromkeys(
        _aten_ops("split.Tensor", "chunk.default", "split_with_sizes.default"), (2, "dim", 0)
    )
    | dict.fromkeys(_aten_ops("glu.default"), (1, "dim", -1))
    | dict.fromkeys(
        _aten_ops("linalg_vector_norm.default", "logsumexp.default", "amin.default"),
        (2, "dim", None),
    )
    | dict.fromkeys(
        _aten_ops("channel_shuffle.default", "native_channel_shuffle.default"), (99, "dim", 1)
    )
)
_ATEN_SLICE = set(_aten_ops("slice.Tensor"))

_LAYER_NORMS = {F.layer_norm, *_aten_ops("layer_norm.default", "native_layer_norm.default")}
_PERMUTES = {torch.permute, *_aten_ops("permute.default")}
_EXPANDS = set(_aten_ops("expand_as.default", "expand.default"))
_EXPAND_METHODS = {"expand_as", "expand"}
