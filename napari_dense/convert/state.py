"""The dense graph builder's state per node (lattice, receptive field, costs) and helpers."""

from __future__ import annotations

import collections
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import fx, nn
from torch._ops import OpOverload

from napari_dense.convert.geometry import Lattice, Pair, pair
from napari_dense.convert.optable import (
    _LAYER_MODULES,
    _PHASES,
    _SIGNATURES,
    _SUPPORTED,
    _aten_equivalent,
)
from napari_dense.convert.patchnet import _shape, _Traced
from napari_dense.convert.plan import SAMPLINGS, Sampling, StridingLayer
from napari_dense.errors import UnsupportedLayerError

SamplingSpec = str | Mapping[str, str]


@dataclass
class _Costs:
    macs_per_pixel: float = 0.0
    macs_per_patch: float = 0.0
    bytes_per_pixel: dict[fx.Node, float] = field(default_factory=dict)
    peak_bytes_per_pixel: float = 0.0


class _BuilderState:
    """The builder's state and the helpers every op family uses."""

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
        self.tuples: set[fx.Node] = set()  # nodes holding a tuple of maps (chunk, split)
        # Total stride of each striding layer's input (which of its phases a pixel falls in).
        self.layer_input_stride: dict[str, Pair] = {}
        self.inexact: list[str] = []
        self.costs = _Costs()
        self.spatial_size_reads: list[fx.Node] = []
        # Striding layers upstream of each dense tensor, and layers that must share a sampling
        # because their branches are joined (their lattices must match).
        self.upstream: dict[fx.Node, frozenset[str]] = {}
        self.ties: dict[str, set[str]] = {}
        self.owners = _layer_owners(traced.module.graph)

    # -- the walk ------------------------------------------------------------------------------

    def _emitted_dilation(self, lattice: Lattice) -> Pair:
        """Dilation of the emitted kernels: none in phase-batch form (each phase is compact)."""
        return lattice.dilation if self.phases == "dilated" else (1, 1)

    def _alias(self, node: fx.Node, x: fx.Node) -> None:
        self.env[node] = self.env[x]
        self._same_lattice(node, x)

    # -- helpers -------------------------------------------------------------------------------

    def _join(self, node: fx.Node, branches: list[fx.Node]) -> tuple[Lattice, dict[fx.Node, Any]]:
        """The common lattice of joined branches and each branch's dense tensor on it.

        One vector per patch on lattices of different steps (pooled heads of several depths,
        one below a layer kept strided) meet on the coarsest: the finer ones are subsampled.
        """
        env = {b: self.env[b] for b in branches}
        lattices = [self.lattice[b] for b in branches]
        coarse = _max_pair(lat.step for lat in lattices)
        if (
            len(set(lattices)) > 1
            and all(_is_point(b) for b in branches)
            and len({(lat.checkered, lat.phases) for lat in lattices}) == 1
            and all(coarse[a] % lat.step[a] == 0 for lat in lattices for a in (0, 1))
        ):
            for b, lat in zip(branches, lattices, strict=True):
                if lat.step != coarse:
                    ky, kx = coarse[0] // lat.step[0], coarse[1] // lat.step[1]
                    every = (slice(None), slice(None), slice(None, None, ky), slice(None, None, kx))
                    env[b] = self.graph.call_function(operator.getitem, (env[b], every))
            lattices = [replace(lat, step=coarse) for lat in lattices]
        saved = {b: self.lattice[b] for b in branches}
        self.lattice.update(zip(branches, lattices, strict=True))
        try:
            return self._joined_lattice(node, branches), env
        finally:
            self.lattice.update(saved)

    def _joined_lattice(self, node: fx.Node, branches: list[fx.Node]) -> Lattice:
        """The common lattice of joined branches (they must be sampled alike).

        Branches that are one vector per patch (1×1 in the patch network: pooled heads of
        several depths) meet whatever their dilation: no later kernel reads a neighbour.
        """
        lattices = {self.lattice[b] for b in branches}
        if len(lattices) > 1 and all(_is_point(b) for b in branches):
            lattices = {replace(lat, dilation=(1, 1)) for lat in lattices}
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
        if lattice.channels_last:
            raise self._unsupported(
                node, "it slides a window over a channels-last map. Hint: permute it back."
            )
        return lattice

    def _get_attr(self, target: str) -> fx.Node:
        self.attrs[target] = _fetch_attr(self.traced.module, target)
        return self.graph.get_attr(target)

    def _normalized(self, node: fx.Node) -> dict[str, Any]:
        """The node's arguments by name (functionals whose schema fx finds ambiguous, such as
        ``F.conv2d``, are bound by their documented Python signature)."""
        names = _SIGNATURES.get(node.target) if node.op == "call_function" else None
        if names is not None and len(node.args) <= len(names):
            return {**dict(zip(names, node.args, strict=False)), **node.kwargs}
        try:
            normalized = node.normalized_arguments(
                self.traced.module, normalize_to_only_use_kwargs=True
            )
        except Exception:
            normalized = None
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
    padding: Any, kernel: Pair, dilation: Pair, node: fx.Node, builder: _BuilderState
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


def _is_point(node: fx.Node) -> bool:
    """Whether the patch network holds one vector per patch here ((N, F) or (N, C, 1, 1))."""
    shape = _shape(node)
    return shape is not None and (len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1)))


def _is_vector(node: fx.Node) -> bool:
    shape = _shape(node)
    return shape is not None and len(shape) == 2


def _max_pair(pairs: Iterable[Pair]) -> Pair:
    items = list(pairs)
    return (max(p[0] for p in items), max(p[1] for p in items))
