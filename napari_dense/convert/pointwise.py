"""Ops that act per position: elementwise, per-channel, joins and reshapes."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch.nn.functional as F
from torch import fx, nn

from napari_dense.convert import _ops
from napari_dense.convert.geometry import Lattice
from napari_dense.convert.patchnet import _shape
from napari_dense.convert.state import _BuilderState, _env_or_none, _is_vector, _max_pair


class _PointwiseOps(_BuilderState):
    """Emit the dense form of ops that act on every position (or every channel) alike."""

    def _elementwise(self, node: fx.Node) -> None:
        dense_args = [a for a in node.all_input_nodes if a in self.lattice]
        self._check_local(node, dense_args)
        lattice, joined = self._join(node, dense_args)
        env = dict(self.env)
        if len(dense_args) > 1:
            aligned = self.graph.call_function(
                _ops.align_spatial, tuple(joined[a] for a in dense_args)
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

    def _check_local(self, node: fx.Node, dense_args: list[fx.Node]) -> None:
        """The locality rule of pointwise ops: every operand that depends on the image has the
        output's shape in the patch network. A per-patch global value (a pooled vector)
        broadcast over a map is not local: each dense position belongs to many patches."""
        out = _shape(node)
        for arg in dense_args:
            shape = _shape(arg)
            if out is None or shape is None or len(shape) != len(out) or shape[2:] != out[2:]:
                raise self._unsupported(
                    node,
                    f"it broadcasts '{arg.name}' {tuple(shape or ())} of the patch network over "
                    f"{tuple(out or ())}: a per-patch global value (a pooled vector, as in "
                    "squeeze-and-excitation) feeding back into a spatial map has no dense "
                    "equivalent. Hint: apply it after the global pooling, or use a local op.",
                )

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
        if "prelu" in str(getattr(node.target, "__name__", node.target)):
            return self.env[arg]  # prelu's weight is per channel (dim 1), whatever its rank
        spatial = slice(-3, -1) if lattice.channels_last else slice(-2, None)
        if (1, 1, 1, *shape)[spatial] != (1, 1):  # right-aligned against the map's shape
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
            if source.get("training"):
                raise self._unsupported(
                    node,
                    "batch_norm(training=True) normalises with the statistics of the batch, "
                    "which differ per patch. Hint: pass training=self.training, and convert "
                    "in eval mode.",
                )
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
        channel = 3 if self.lattice[x].channels_last else 1
        if dim is None or shape is None or dim % len(shape) != channel:
            raise self._unsupported(node, "softmax must run over the class dimension (dim=1).")
        if self.lattice[x].flattened is not None:
            raise self._unsupported(
                node,
                "it takes the softmax over a flattened feature map (over positions and "
                "channels); its dense form would run over channels only. Hint: apply the "
                "softmax to the class scores.",
            )
        # The class dimension is 1 in the dense tensor (N, K, H, W), whatever it was in (N, K).
        self.env[node] = self.graph.call_function(function, (self.env[x],), {"dim": channel})
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
        lattice, joined = self._join(node, dense)
        if lattice.flattened is not None:
            raise self._unsupported(node, "it concatenates flattened feature maps.")
        self.env[node] = self.graph.call_function(_ops.crop_cat, ([joined[t] for t in dense], 1))
        self.lattice[node] = lattice
        self.receptive[node] = _max_pair(self.receptive[t] for t in dense)

    def _reshape_like(self, node: fx.Node, x: fx.Node) -> None:
        """flatten / view / reshape / squeeze: only those that turn a map into a vector or back."""
        before, after = _shape(x), _shape(node)
        lattice = self.lattice[x]
        if before is None or after is None:
            raise self._unsupported(node)
        if lattice.channels_last and before != after:
            raise self._unsupported(
                node, "it reshapes a channels-last map. Hint: permute it back (0, 3, 1, 2) first."
            )
        if len(after) < 2 or len(before) < 2 or after[0] != before[0]:
            raise self._unsupported(
                node,
                f"it reshapes {tuple(before)} to {tuple(after)}, changing the batch dimension. "
                "Hint: keep it, e.g. torch.flatten(x, 1) or x.view(x.size(0), -1).",
            )
        if len(before) == 4 and len(after) == 2 and after[1] == before[1] * before[2] * before[3]:
            flattened = before[1:] if before[2:] != (1, 1) else None
            self.lattice[node] = replace(lattice, flattened=flattened)
        elif before[1] == after[1] and set(before[2:]) <= {1} and set(after[2:]) <= {1}:
            self.lattice[node] = lattice  # (N, K) <-> (N, K, 1, 1): same dense tensor
        else:
            raise self._unsupported(
                node,
                f"it reshapes {tuple(before)} to {tuple(after)}; only flattening a map to "
                "(N, features) or a vector to (N, K, 1, 1) is supported.",
            )
        self.env[node] = self.env[x]
        self.receptive[node] = self.receptive[x]
