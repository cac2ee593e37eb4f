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

# Pointwise ops, each declared ONCE by name. Every front end resolves the same name: the module
# whose class name it is (``leaky_relu`` -> nn.LeakyReLU), the functions torch.<name>,
# F.<name> and torch.special.<name>, the tensor methods <name> and <name>_ (in place), the
# aten operators <name> and <name>_ of torch.export graphs, and the Python operators below.
# "a/b": the name differs between front ends (F.logsigmoid, aten.log_sigmoid).
_POINTWISE_NAMES = """
relu relu6 leaky_relu elu selu celu gelu silu mish sigmoid tanh hardtanh hardswish hardsigmoid
softplus softsign prelu _prelu_kernel logsigmoid/log_sigmoid threshold tanhshrink exp log abs neg
sqrt rsqrt square pow reciprocal erf erfc clamp clamp_min clamp_max add sub rsub mul div maximum
minimum log1p expm1 sign floor ceil round trunc fmod remainder sin cos where masked_fill gt ge
lt le eq ne logical_and logical_or logical_not float to _to_copy type_as zeros_like ones_like
full_like empty_like
""".split()
# Identities of the dense network (eval mode): declared once in the same way. aten's dropouts
# are checked for training mode first (``_ATEN_DROPOUTS``).
_IDENTITY_NAMES = """
identity clone detach contiguous alias dropout dropout1d dropout2d alpha_dropout
feature_alpha_dropout
""".split()
_ATEN_DROPOUTS = (
    "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "native_dropout",
)  # fmt: skip
# Python operators (``x + y``, ``x > 0``): the pointwise name each one is.
_OPERATORS: dict[Callable[..., Any], str] = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", operator.imul: "mul", operator.truediv: "div", operator.itruediv: "div",
    operator.neg: "neg", operator.pow: "pow", operator.gt: "gt", operator.ge: "ge",
    operator.lt: "lt", operator.le: "le", operator.eq: "eq", operator.ne: "ne",
    operator.and_: "logical_and", operator.or_: "logical_or", operator.invert: "logical_not",
}  # fmt: skip


def _spellings(names: Iterable[str]) -> list[str]:
    return [spelling for name in names for spelling in name.split("/")]


def _modules_named(names: Iterable[str]) -> tuple[type[nn.Module], ...]:
    wanted = {name.replace("_", "") for name in _spellings(names)}
    return tuple(
        cls
        for cls in vars(nn).values()
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__name__.lower() in wanted
    )


def _functions_named(names: Iterable[str]) -> set[Callable[..., Any]]:
    found = set()
    for name in _spellings(names):
        for namespace in (torch, F, torch.special):
            function = getattr(namespace, name, None)
            if callable(function) and not isinstance(function, type):
                found.add(function)
    return found


def _methods_named(names: Iterable[str], in_place: bool = True) -> set[str]:
    suffixes = ("", "_") if in_place else ("",)
    return {spelling + suffix for spelling in _spellings(names) for suffix in suffixes}


def _aten_named(names: Iterable[str], in_place: bool = True) -> list[OpOverload | OpOverloadPacket]:
    suffixes = ("", "_") if in_place else ("",)
    return _aten_ops(*(s + suffix for s in _spellings(names) for suffix in suffixes))


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
_REDUCE_FUNCTIONS: dict[Callable[..., Any], str] = {
    torch.mean: "avg",
    torch.amax: "max",
    torch.sum: "sum",
}
# The tensor methods of the same names (x.mean(...)), and of the softmaxes (x.softmax(dim)).
_REDUCE_METHODS = {function.__name__: kind for function, kind in _REDUCE_FUNCTIONS.items()}
_SOFTMAX_METHODS = {f.__name__: f for f in _SOFTMAX_FUNCTIONS if f.__module__ == F.__name__}


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


# The pointwise and identity tables as each front end looks them up.
_ELEMENTWISE_MODULES = _modules_named(_POINTWISE_NAMES)
_IDENTITY_MODULES = _modules_named(_IDENTITY_NAMES)
_ELEMENTWISE_FUNCTIONS = _functions_named(_POINTWISE_NAMES) | set(_OPERATORS)
_IDENTITY_FUNCTIONS = _functions_named(_IDENTITY_NAMES)
_ELEMENTWISE_METHODS = _methods_named(_POINTWISE_NAMES) | {
    f"__{op.__name__.strip('_')}__" for op in _OPERATORS
}
_IDENTITY_METHODS = _methods_named(_IDENTITY_NAMES)

_ATEN_CHECKS = (
    "_assert_tensor_metadata", "_assert_scalar", "_assert_async", "_functional_assert_scalar",
    "sym_constrain_range", "sym_constrain_range_for_size",
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
    **dict.fromkeys(_aten_named(_IDENTITY_NAMES, in_place=False), "alias"),
    **dict.fromkeys(_aten_ops(*_ATEN_DROPOUTS), "dropout"),
    **dict.fromkeys(_aten_ops("sym_size.int"), "size"),
    **dict.fromkeys(_aten_ops(*_ATEN_CHECKS), "check"),
    **dict.fromkeys(_aten_ops("copy_"), "mutation"),
    **dict.fromkeys(_aten_named(_POINTWISE_NAMES), "elementwise"),
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
# Calls per pixel over channels, declared once by name with where their ``dim`` sits among
# the call's arguments (the same position for torch.<name>, F.<name>, the method <name> and
# aten.<name>: self or input first) and its default. "a/b": spellings of other front ends.
_PER_PIXEL_NAMES: dict[str, tuple[int, int | None]] = {
    "normalize": (2, 1), "local_response_norm": (99, 1), "glu": (1, -1), "chunk": (2, 0),
    "split/split_with_sizes": (2, 0), "logsumexp": (1, None), "amin": (1, None),
    "norm/linalg_vector_norm": (2, None), "channel_shuffle/native_channel_shuffle": (99, 1),
}  # fmt: skip
_PER_PIXEL_CALLS: dict[Any, tuple[int, str, int | None]] = {}
_PER_PIXEL_METHODS: dict[str, tuple[int, str, int | None]] = {}
for _names, (_position, _default) in _PER_PIXEL_NAMES.items():
    _spec = (_position, "dim", _default)
    _PER_PIXEL_CALLS |= dict.fromkeys(_functions_named([_names]), _spec)
    _PER_PIXEL_CALLS |= dict.fromkeys(_aten_named([_names], in_place=False), _spec)
    _PER_PIXEL_METHODS |= dict.fromkeys(_methods_named([_names], in_place=False), _spec)


def _per_pixel_spec(target: Any) -> tuple[int, str, int | None] | None:
    """Where the ``dim`` of a per-pixel call sits, for functions and aten overloads alike."""
    if isinstance(target, OpOverload):
        return _PER_PIXEL_CALLS.get(target, _PER_PIXEL_CALLS.get(target.overloadpacket))
    try:
        return _PER_PIXEL_CALLS.get(target)
    except TypeError:  # unhashable targets are no per-pixel op
        return None


_ATEN_SLICE = set(_aten_ops("slice.Tensor"))

_LAYER_NORMS = {F.layer_norm, *_aten_ops("layer_norm.default", "native_layer_norm.default")}
_PERMUTES = {torch.permute, *_aten_ops("permute.default")}
_EXPANDS = set(_aten_ops("expand_as.default", "expand.default"))
_EXPAND_METHODS = {"expand_as", "expand"}
