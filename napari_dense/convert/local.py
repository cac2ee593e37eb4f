"""Ops whose rule is local by construction: per-pixel channel ops and constant slices.

- *Per pixel over channels* (``LocalResponseNorm``, ``F.normalize``, sums, means and maxima over
  ``dim=1``, ``GLU``/``chunk``/``split`` of channels, ``Softmax2d``, channel slicing): each
  output position reads the channels of the same position only, so the op runs unchanged on
  dense tensors, where dim 1 is still the channel axis.
- *Channels last* (``x.permute(0, 2, 3, 1)`` then ``LayerNorm``/``Linear``/softmax over the
  last dim, then back): the dense tensor is permuted alike; ops over its last dim act per pixel.
- *Constant spatial slices* (``x[..., a:h - b, c:w - d]``: residual crops, centre crops): the
  patch feature ``(i, j)`` of the slice is feature ``(i + a, j + c)`` of the map, which the
  dense tensor holds ``a`` dilated rows further: the dense form drops the first ``a · dy``
  rows and ``c · dx`` columns; the end of the slice is where the patch ends, which the dense
  network's valid region already accounts for.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch.nn.functional as F
from torch import fx

from napari_dense.convert import _ops
from napari_dense.convert.patchnet import _shape
from napari_dense.convert.spatial import _static
from napari_dense.convert.state import _BuilderState

__all__: list[str] = []


class _LocalOps(_BuilderState):
    """Emit per-pixel channel ops and constant slices."""

    def _per_pixel(self, node: fx.Node, x: fx.Node, dim: int | None) -> None:
        """An op over the channels of each position (``dim`` 1 of a map or a vector)."""
        shape = _shape(x)
        lattice = self.lattice[x]
        channel = 3 if lattice.channels_last else 1
        if shape is None or dim is None or len(shape) not in (2, 4) or dim % len(shape) != channel:
            raise self._unsupported(
                node,
                f"it works along dim {dim} of {tuple(shape or ())}; only ops over the channel "
                "dim (1) of a map act per pixel. Hint: reduce spatial dims with a pooling.",
            )
        if lattice.flattened is not None:
            raise self._unsupported(
                node, "it acts over a flattened feature map (positions and channels mixed)."
            )
        out = _shape(node)
        if out is not None and len(out) != len(shape):
            raise self._unsupported(
                node, "it drops the channel dim of a map. Hint: pass keepdim=True."
            )
        others = [a for a in node.all_input_nodes if a is not x and a in self.lattice]
        if others:
            raise self._unsupported(node, "it mixes two feature maps along the channel dim.")
        if node.op == "call_module":
            self.attrs[node.target] = self.modules[node.target]
        self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])
        self.lattice[node] = lattice
        self.receptive[node] = self.receptive[x]
        if _shape(node) is None:  # chunk / split: a tuple of maps, read by getitem
            self.tuples.add(node)

    def _expand(self, node: fx.Node, x: fx.Node) -> None:
        """``expand``/``expand_as`` of the channel dim only: the later op broadcasts it."""
        before, after = _shape(x), _shape(node)
        if (
            x not in self.lattice
            or before is None
            or after is None
            or len(before) != len(after)
            or before[0] != after[0]
            or before[2:] != after[2:]
            or self.lattice[x].channels_last
        ):
            raise self._unsupported(
                node, f"it expands {tuple(before or ())} to {tuple(after or ())} over space."
            )
        self._alias(node, x)

    def _tuple_item(self, node: fx.Node, source: fx.Node) -> None:
        """``chunk(...)[i]``: one of the maps of a per-pixel split."""
        self.env[node] = self.graph.call_function(
            operator.getitem, (self.env[source], node.args[1])
        )
        self.lattice[node] = self.lattice[source]
        self.receptive[node] = self.receptive[source]

    def _getitem(self, node: fx.Node, x: fx.Node, index: Any) -> None:
        """``x[...]`` with slices: channel slices as they are, spatial ones as shifts."""
        shape = _shape(x)
        if shape is None:
            raise self._unsupported(node, "indexing a value that is not a tensor.")
        items = list(index) if isinstance(index, tuple) else [index]
        # Bounds computed from sizes (x[:, :, a : a + h]) as the patch network computed them.
        items = [
            slice(_static(i.start), _static(i.stop), _static(i.step)) if isinstance(i, slice) else i
            for i in items
        ]
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items[at : at + 1] = [slice(None)] * (len(shape) - len(items) + 1)
        items += [slice(None)] * (len(shape) - len(items))
        full = slice(None)
        if len(shape) == 2 and items[:2] == [full, full] and all(i is None for i in items[2:]):
            self._alias(node, x)  # (N, K) -> (N, K, 1, ...): the same dense tensor
            return
        if len(items) != len(shape) or not all(isinstance(i, slice) for i in items):
            raise self._unsupported(
                node,
                "only slices (x[:, a:b, c:d, e:f]) of a feature map densify, not integer, "
                "tensor or None indices. Hint: slice with ':' ranges and unsqueeze() later.",
            )
        bounds = [item.indices(size) for item, size in zip(items, shape, strict=True)]
        self._slice(node, x, bounds)

    def _aten_slice(self, node: fx.Node, x: fx.Node, kw: dict[str, Any]) -> None:
        """``aten.slice.Tensor(x, dim, start, end, step)`` of an exported graph."""
        shape = _shape(x)
        assert shape is not None
        dim = kw.get("dim", 0) % len(shape)
        start, end, step = (_static(kw.get(k)) for k in ("start", "end", "step"))
        bounds = [(0, size, 1) for size in shape]
        bounds[dim] = slice(start, end, step).indices(shape[dim])
        self._slice(node, x, bounds)

    def _slice(self, node: fx.Node, x: fx.Node, bounds: list[tuple[int, int, int]]) -> None:
        shape = _shape(x)
        lattice = self.lattice[x]
        assert shape is not None
        if bounds[0] != (0, shape[0], 1):
            raise self._unsupported(node, "it slices the batch dimension.")
        if lattice.channels_last:
            raise self._unsupported(node, "it slices a channels-last map. Hint: permute back.")
        if lattice.flattened is not None and bounds[1] != (0, shape[1], 1):
            raise self._unsupported(node, "it slices a flattened feature map.")
        spatial = bounds[2:] if len(shape) == 4 else []
        if any(step != 1 for _, _, step in spatial):
            raise self._unsupported(
                node,
                "a strided slice of a feature map subsamples it like a pooling of stride "
                f"{[s for _, _, s in spatial]}. Hint: use a 1x1 max pool with that stride.",
            )
        dense = self.env[x]
        channels = bounds[1]
        if channels != (0, shape[1], 1):
            dense = self.graph.call_function(
                operator.getitem, (dense, (slice(None), slice(*channels)))
            )
        if spatial and any(start for start, _, _ in spatial):
            dy, dx = self._emitted_dilation(lattice)
            (top, _, _), (left, _, _) = spatial
            dense = self.graph.call_function(
                operator.getitem,
                (dense, (slice(None), slice(None), slice(top * dy, None), slice(left * dx, None))),
            )
        self.env[node] = dense
        self.lattice[node] = lattice
        self.receptive[node] = self.receptive[x]

    def _permute(self, node: fx.Node, x: fx.Node, dims: Any) -> None:
        """``permute``: to channels last ``(0, 2, 3, 1)`` and back ``(0, 3, 1, 2)`` only."""
        shape, lattice = _shape(x), self.lattice[x]
        order = tuple(d % 4 for d in dims) if shape is not None and len(shape) == 4 else None
        to_last, to_first = (0, 2, 3, 1), (0, 3, 1, 2)
        if order == (0, 1, 2, 3):
            self._alias(node, x)
            return
        expected = to_first if lattice.channels_last else to_last
        if lattice.flattened is not None or order != expected:
            raise self._unsupported(
                node,
                f"it permutes {tuple(shape or ())} by {tuple(dims)}; only moving the channels "
                "last (0, 2, 3, 1) and back (0, 3, 1, 2) densifies.",
            )
        self.env[node] = self.graph.call_method("permute", (self.env[x], order))
        self.lattice[node] = replace(lattice, channels_last=not lattice.channels_last)
        self.receptive[node] = self.receptive[x]

    def _layer_norm(
        self, node: fx.Node, x: fx.Node, shape: Any, weight: Any, bias: Any, eps: float
    ) -> None:
        """``LayerNorm`` over the channels (the last dim of a channels-last map, or a vector)."""
        in_shape, lattice = _shape(x), self.lattice[x]
        shape = _static(shape)
        normalized = tuple(shape) if isinstance(shape, list | tuple) else (shape,)
        if in_shape is None or normalized != in_shape[-1:] or lattice.flattened is not None:
            raise self._unsupported(
                node,
                f"it normalises over {normalized} of {tuple(in_shape or ())}: only a LayerNorm "
                "over the channels acts per pixel. Hint: x.permute(0, 2, 3, 1) before it.",
            )
        if len(in_shape) == 4 and lattice.channels_last:
            self.env[node] = self.graph.call_function(
                F.layer_norm, (self.env[x], normalized, weight, bias, eps)
            )
        elif len(in_shape) == 2:  # one vector per patch: its channels are dim 1 of the map
            self.env[node] = self.graph.call_function(
                _ops.channel_layer_norm, (self.env[x], normalized, weight, bias, eps)
            )
        else:
            raise self._unsupported(
                node, "LayerNorm over the last (spatial) axis of a map. Hint: permute first."
            )
        self.lattice[node] = lattice
        self.receptive[node] = self.receptive[x]
