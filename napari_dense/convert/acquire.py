"""Graph acquisition: a private torch.fx graph of the model (fx, or a torch.export program)."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch._ops import OpOverload
from torch.export import ExportedProgram

from napari_dense.convert.geometry import Pair
from napari_dense.errors import InputError, PatchSizeError, UnsupportedLayerError

#: What densify/explain accept: a module (traced with torch.fx) or a torch.export program.
Classifier = nn.Module | ExportedProgram


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
        "give them: densify/explain(in_channels=...), or in_channels in the model's sidecar"
    )


def _check_dtype(model: nn.Module | ExportedProgram) -> None:
    """Dense networks run float32 (reduced precision is an inference option, not a model's)."""
    tensors = (
        list(model.state_dict.values())
        if isinstance(model, ExportedProgram)
        else [*model.parameters(), *model.buffers()]
    )
    dtypes = {t.dtype for t in tensors if t.is_floating_point() and t.dtype != torch.float32}
    if dtypes:
        raise InputError(
            f"the model's weights are {', '.join(sorted(str(d) for d in dtypes))}, not float32: "
            "convert model.float() (run in reduced precision with precision='bfloat16' or "
            "'float16' at inference)"
        )


def _needs_export(model: nn.Module) -> str | None:
    """Why torch.fx would not trace ``model`` faithfully (hooks it drops), or None."""
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"module '{name or type(model).__name__}' has forward hooks"
    return None


def _graph_of(
    model: Classifier, patch: Pair | None = None, in_channels: int | None = None
) -> _Graph:
    """Step 1: the model's graph, on private copies of its parameters.

    Modules are traced with torch.fx (milliseconds). Those fx cannot trace faithfully (forward
    hooks and pre-hooks, parametrisations that cannot be copied, shape assertions and other
    Python that fx cannot follow) are exported with torch.export instead when the patch size is
    known (``patch``): it records hooks, functional calls and assertions as they run.
    """
    if isinstance(model, ExportedModule):
        model = model.exported_program
    if isinstance(model, ExportedProgram):
        _check_dtype(model)
    if isinstance(model, ExportedProgram) or _is_exported_module(model):
        return _exported_graph(model)
    if not isinstance(model, nn.Module):
        raise TypeError(
            "model must be a torch.nn.Module or a torch.export.ExportedProgram, got "
            f"{type(model).__name__}"
        )
    _check_dtype(model)
    reason = _needs_export(model)
    error: Exception | None = None
    if reason is None:
        try:
            # Never touch the caller's model: trace a copy, in eval mode (BatchNorm statistics,
            # no dropout).
            return _Graph(_trace_fx(copy.deepcopy(model).eval()))
        except Exception as err:
            reason, error = f"torch.fx cannot trace it ({_first_line(err)})", err
    if patch is None:
        raise UnsupportedLayerError(
            f"{type(model).__name__}: {reason}; give the patch size to convert it with torch.export"
        ) from error
    channels = in_channels if in_channels is not None else _infer_in_channels(model)
    return _export(model, patch, channels, reason)


class _Tracer(fx.Tracer):
    """fx's tracer, stepping into modules whose forward is one functional call the builder
    densifies (``LPPool2d`` -> ``F.lp_pool2d``)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.LPPool2d):
            return False
        return super().is_leaf_module(m, module_qualified_name)


def _trace_fx(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def _export(model: nn.Module, patch: Pair, channels: int, reason: str) -> _Graph:
    """``model`` exported with torch.export in eval mode (its modes are restored)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        example = torch.zeros(2, channels, *patch, device=_device_of(model))
        with warnings.catch_warnings():  # torch.export's own notes (attributes it lifts)
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (example,))
    except Exception as err:
        raise UnsupportedLayerError(
            f"cannot convert {type(model).__name__}: {reason}, and torch.export fails too "
            f"({_first_line(err)}). Hint: remove Python control flow that depends on tensor "
            "values from forward()"
        ) from err
    finally:
        for module, mode in modes:
            module.training = mode
    return _exported_graph(program)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


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
    return _Graph(module, _input_shape(graph))


def _input_shape(graph: fx.Graph) -> tuple[int | str, ...] | None:
    """The input shape an exported graph was exported with (ints, or dynamic dims' names)."""
    inputs = [n for n in graph.nodes if n.op == "placeholder" and "val" in n.meta]
    if inputs and isinstance(inputs[0].meta["val"], torch.Tensor):
        return tuple(d if isinstance(d, int) else str(d) for d in inputs[0].meta["val"].shape)
    return None


class ExportedModule(nn.Module):
    """A torch.export program as a module, callable on patch batches like the original classifier.

    :func:`densify` and :func:`explain` convert its ``exported_program``. Calling it runs the
    program's graph on private copies of the parameters. Unlike ``ep.module()``, ``train()`` and
    ``eval()`` work (they only set the flag: the mode was fixed at export), and a program exported
    with a fixed batch size takes any batch (split into batches of that size), so per-patch code
    such as :func:`napari_dense.evaluate.reference.patchwise` can use it.

    Parameters
    ----------
    program
        A program exported from a patch classifier (``torch.export.export`` or ``load``).
    """

    def __init__(self, program: ExportedProgram):
        super().__init__()
        if not isinstance(program, ExportedProgram):
            raise TypeError(f"expected a torch.export.ExportedProgram, got {type(program)}")
        self._adopt(program, _exported_graph(program))

    @classmethod
    def over(cls, program: ExportedProgram, network: fx.GraphModule) -> ExportedModule:
        """``program`` running the graph of ``network``, a private copy of it made already.

        Its parameters may have been laid out channels-last since (a dense network shares
        them); the program's views need them contiguous, so those are copied.
        """
        network = fx.GraphModule(network, network.graph, class_name="ExportedClassifier")
        for submodule in network.modules():
            for name, param in submodule._parameters.items():
                if param is not None and not param.is_contiguous():
                    submodule._parameters[name] = nn.Parameter(param.detach().contiguous(), False)
            for name, buffer in submodule._buffers.items():
                if buffer is not None and not buffer.is_contiguous():
                    submodule._buffers[name] = buffer.detach().contiguous()
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._adopt(program, _Graph(network, _input_shape(network.graph)))
        return module

    def _adopt(self, program: ExportedProgram, graph: _Graph) -> None:
        self.network = graph.module
        self.exported_program = program
        batch = graph.exported_shape[0] if graph.exported_shape else None
        self.fixed_batch = batch if isinstance(batch, int) else None

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode  # the program's own mode was fixed when it was exported
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            count = x.shape[0]
            if count % self.fixed_batch:  # pad the last batch (patches are independent)
                fill = x.new_zeros((self.fixed_batch - count % self.fixed_batch, *x.shape[1:]))
                x = torch.cat([x, fill])
            return torch.cat([self(chunk) for chunk in x.split(self.fixed_batch)])[:count]
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
