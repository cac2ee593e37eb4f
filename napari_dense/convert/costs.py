"""Build the dense module and its plan; the cost of every per-layer sampling."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from napari_dense.convert import _ops
from napari_dense.convert.builder import _DenseGraphBuilder
from napari_dense.convert.geometry import sample_grid
from napari_dense.convert.patchnet import _graph_output, _Traced
from napari_dense.convert.plan import SAMPLINGS, DensePlan, SamplingCost
from napari_dense.convert.state import SamplingSpec
from napari_dense.errors import UnsupportedLayerError


def _build(
    traced: _Traced, sampling: SamplingSpec, phases: str = "dilated"
) -> tuple[fx.GraphModule, DensePlan, _DenseGraphBuilder]:
    builder = _DenseGraphBuilder(traced, sampling, phases)
    network = fx.GraphModule(builder.attrs, builder.build(), class_name="DenseNetwork")
    network.graph.eliminate_dead_code()
    builder.check_live(network.graph)
    _relu_in_place(network)
    network.graph.lint()
    network.recompile()
    return network, _plan_of(builder), builder


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

    Layers tied by a join (their branches must share a lattice) are flipped together. A
    sampling the network does not support (a join of branches it would sample differently)
    has no entry in ``costs``.
    """
    layers = []
    for layer in plan.layers:
        group = (layer.name, *layer.tied_with)
        variants = {}
        for choice in SAMPLINGS:
            # Only the costs are needed: the graph is built, never compiled into a module.
            builder = _DenseGraphBuilder(traced, {**plan.sampling, **dict.fromkeys(group, choice)})
            try:
                builder.build()
            except UnsupportedLayerError:
                if choice == layer.sampling:
                    raise
                continue
            variants[choice] = _plan_of(builder)
        costs = tuple(
            SamplingCost(choice, v.density, v.macs_per_pixel, v.bytes_per_megapixel)
            for choice, v in variants.items()  # SAMPLINGS order: cheapest first
        )
        fallback = variants[layer.sampling]
        variants.setdefault("all", fallback)
        variants.setdefault("none", fallback)
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
