"""Certification: every conversion checks its dense network against the original model.

Before :func:`~napari_dense.densify` returns, the dense network and the model itself (not its
traced graph: hooks and anything tracing may lose are included) run on a small random batch.
The patch positions compared cover every phase of every striding layer (:mod:`.cover`: about
``max stride_y × max stride_x`` positions, in images just large enough to hold them), include
the first and the last position of the output grid, and a few random ones where the model is
cheap; the model runs once, on all of them in one batch. An exact claim that does not hold
raises :class:`ConversionError`, which names the first node whose dense map differs from the
patch network's (found by comparing intermediate maps); for networks that are not exact the
measured deviation is recorded in ``plan.verified``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.export import ExportedProgram

from napari_dense.convert.acquire import Classifier, ExportedModule, _device_of
from napari_dense.convert.builder import _DenseGraphBuilder
from napari_dense.convert.cover import _mask, phase_cover
from napari_dense.convert.dense import DenseClassifier
from napari_dense.convert.geometry import Lattice, Pair, checkered_phases
from napari_dense.convert.patchnet import _graph_output, _Traced
from napari_dense.convert.plan import Verification
from napari_dense.errors import ConversionError

__all__ = ["ConversionError", "certify"]

#: Deviation allowed of an exact network, relative to max(1, largest |output|) (float32).
RELATIVE_TOLERANCE = 1e-4
_BATCH = 2
_SEED = 20171
# Random positions besides the phase cover, while the model's extra patches cost this little
# in all (a few tenths of a millisecond on one CPU core): small nets get up to _MAX_EXTRA.
_MAX_EXTRA = 4
_FREE_MACS = 1e7
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def certify(
    model: Classifier,
    traced: _Traced,
    dense: DenseClassifier,
    builder: _DenseGraphBuilder,
) -> Verification:
    """Run ``dense`` and ``model`` on a random batch and compare them.

    Parameters
    ----------
    model
        The caller's classifier (run in eval mode; its mode is restored).
    traced
        The patch network the conversion was made from.
    dense
        The converted network.
    builder
        The builder that made it (the striding layers and their input strides).

    Returns
    -------
    Verification
        Max |Δ|, tolerance and the positions compared.

    Raises
    ------
    ConversionError
        When the plan claims exactness and the outputs differ by more than the tolerance.
    """
    plan = dense.plan
    (ph, pw), (sy, sx) = plan.patch_size, plan.output_stride
    layers = [
        (
            builder.layer_input_stride[layer.name],
            layer.stride,
            _phases(layer.sampling, layer.stride),
        )
        for layer in plan.layers
    ]
    cover, (rows, cols), covered = phase_cover(layers, (sy, sx), plan.sample_pattern)
    size = (ph + (rows - 1) * sy, pw + (cols - 1) * sx)
    generator = torch.Generator().manual_seed(_SEED)
    x = torch.randn(_BATCH, traced.in_channels, *size, generator=generator)
    x = x.to(_device_of(traced.module))
    with torch.no_grad():
        out = dense(x)
    if tuple(out.shape) != (_BATCH, plan.num_classes, rows, cols):
        raise ConversionError(
            f"the dense network returns {tuple(out.shape)} for a {size[0]}x{size[1]} input, "
            f"expected {(_BATCH, plan.num_classes, rows, cols)}: a converter bug; report it "
            "with the model, or convert with verify=False to skip this check"
        )
    positions = _positions(cover, plan, rows, cols, generator)
    index = torch.tensor(positions, device=x.device).T
    # (B, C, rows, cols, ph, pw) views of every patch; the chosen ones in one batch.
    windows = x.unfold(2, ph, sy).unfold(3, pw, sx)
    patches = windows[index[0], :, index[1], index[2]].contiguous()
    reference = _run_model(model, traced, patches).reshape(len(positions), -1).float()
    computed = out[index[0], :, index[1], index[2]].float()
    scale = float(reference.abs().nan_to_num(0.0).max()) if reference.numel() else 0.0
    tolerance = RELATIVE_TOLERANCE * max(1.0, scale)
    deviation = _deviation(computed, reference)
    verification = Verification(
        max_abs_diff=min(float(deviation.max()), _FLOAT32_MAX),  # finite: provenance is JSON
        tolerance=tolerance,
        scale=scale,
        positions=len(positions),
        batch=_BATCH,
        input_size=size,
        phases_covered=covered,
    )
    if plan.exact and not verification.passed:
        first = int(torch.nonzero(deviation > tolerance)[0, 0])
        b, i, j = positions[first]
        where = _localise(model, traced, x, patches, positions, (sy, sx), tolerance)
        raise ConversionError(
            f"the dense network is not exact although the conversion claims it: max |Δ| "
            f"{verification.max_abs_diff:.3g} (tolerance {tolerance:.2g}), first at the patch "
            f"with top-left ({i * sy}, {j * sx}) of random image {b}; {where}. Report it with "
            "the model; convert with verify=False to skip this check"
        )
    return verification


def certified(
    model: Classifier, traced: _Traced, dense: DenseClassifier, builder: _DenseGraphBuilder
) -> DenseClassifier:
    """``dense`` with ``plan.verified`` filled in by :func:`certify`."""
    dense.plan = replace(dense.plan, verified=certify(model, traced, dense, builder))
    return dense


def _deviation(computed: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per position, max |Δ| over classes; a NaN on one side only counts as infinite."""
    diff = (computed - reference).abs()
    both_nan = computed.isnan() & reference.isnan()
    diff = torch.where(both_nan, torch.zeros_like(diff), diff.nan_to_num(float("inf")))
    return diff.amax(dim=1)


def _positions(
    cover: list[Pair], plan: Any, rows: int, cols: int, generator: torch.Generator
) -> list[tuple[int, int, int]]:
    """``(image, row, col)``: the phase cover spread over the batch (its first position in the
    first image, its last in the last), then a few random positions where the model is cheap."""
    chosen = [(index % _BATCH, i, j) for index, (i, j) in enumerate(cover)]
    mask = _mask(plan.sample_pattern, (rows, cols))
    extra = min(_MAX_EXTRA, int(_FREE_MACS // max(plan.macs_per_patch, 1.0)))
    if extra > 0:
        taken = set(chosen)
        cells = [(int(i), int(j)) for i, j in zip(*np.nonzero(mask), strict=True)]
        grid = [(b, i, j) for b in range(_BATCH) for i, j in cells]
        order = torch.randperm(len(grid), generator=generator).tolist()
        chosen += [p for p in (grid[k] for k in order) if p not in taken][:extra]
    return chosen


def _phases(sampling: str, stride: Pair) -> list[Pair]:
    """The phases a striding layer computes: all, the checkered ones, or (0, 0) (strided)."""
    if sampling == "all":
        return [(a, b) for a in range(stride[0]) for b in range(stride[1])]
    return list(checkered_phases(stride)) if sampling == "checkered" else [(0, 0)]


def _run_model(model: Classifier, traced: _Traced, patches: torch.Tensor) -> torch.Tensor:
    """The caller's model on a batch of patches, in eval mode (its modes restored)."""
    # A program runs on the private copy of its graph the conversion made (ExportedModule's).
    runner: Callable[[torch.Tensor], Any] = (
        ExportedModule.over(model, traced.module) if isinstance(model, ExportedProgram) else model
    )
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    try:
        for module, _ in modes:
            module.training = False
        with torch.no_grad():
            try:
                out = runner(patches)
            except Exception:  # a model fixed to its traced batch size: one chunk at a time
                out = torch.cat([_single(runner(chunk)) for chunk in patches.split(1)])
    finally:
        for module, mode in modes:
            module.training = mode
    return _single(out)


def _single(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) and len(out) == 1 else out


# --------------------------------------------------------------------------------------------
# Localising a mismatch: compare every intermediate map of the patch network with the dense
# network's (all layers densified, so dense index (y, x) is the patch with top-left (y, x)).
# --------------------------------------------------------------------------------------------


def _localise(
    model: Classifier,
    traced: _Traced,
    x: torch.Tensor,
    patches: torch.Tensor,
    positions: list[tuple[int, int, int]],
    stride: Pair,
    tolerance: float,
) -> str:
    try:
        return _first_mismatch(model, traced, x, patches, positions, stride, tolerance)
    except Exception as err:  # localising is a best effort; the mismatch itself is certain
        return f"the node could not be localised ({type(err).__name__})"


def _first_mismatch(
    model: Classifier,
    traced: _Traced,
    x: torch.Tensor,
    patches: torch.Tensor,
    positions: list[tuple[int, int, int]],
    stride: Pair,
    tolerance: float,
) -> str:
    reference = _run_model(model, traced, patches).reshape(len(patches), -1)
    patch_values = _record(traced.module, patches)
    output = _graph_output(traced.module.graph)
    graph_out = patch_values[output].reshape(len(patches), -1)
    if _max_diff(graph_out, reference) > tolerance:
        return (
            "the traced graph itself differs from the model: something in forward() was not "
            "recorded (a global forward hook, Python side effects, state read at run time). "
            "Hint: remove it, or export the model with torch.export and convert the program"
        )
    builder = _DenseGraphBuilder(traced, "all")
    graph = builder.build()
    dense_values = _record(fx.GraphModule(builder.attrs, graph), x)
    (sy, sx) = stride  # output grid units -> pixels (= dense indices when all is densified)
    for node in traced.module.graph.nodes:
        if node not in builder.lattice or node.op == "placeholder":
            continue
        value, dense_node = patch_values.get(node), builder.env.get(node)
        lattice = builder.lattice[node]
        if not isinstance(value, torch.Tensor) or dense_node not in dense_values:
            continue
        if lattice.phases or lattice.checkered:
            continue
        expected = _from_dense(dense_values[dense_node], lattice, value.shape, positions, sy, sx)
        if expected is not None and _max_diff(expected, value) > tolerance:
            stack = node.meta.get("nn_module_stack") or {}
            paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v and v[0]]
            path = str(node.target) if node.op == "call_module" else (paths[-1] if paths else "")
            op = (
                type(traced.module.get_submodule(str(node.target))).__name__
                if node.op == "call_module"
                else getattr(node.target, "__name__", str(node.target))
            )
            module = f"module '{path}', " if path else ""
            return f"the first map that differs is node '{node.name}' ({module}{op})"
    return "no intermediate map differs with every layer densified (a sampling-specific bug)"


def _record(module: fx.GraphModule, x: torch.Tensor) -> dict[fx.Node, Any]:
    interpreter = fx.Interpreter(module, garbage_collect_values=False)
    with torch.no_grad():
        interpreter.run(x)
    return dict(interpreter.env)


def _from_dense(
    dense: Any,
    lattice: Lattice,
    shape: torch.Size,
    positions: list[tuple[int, int, int]],
    sy: int,
    sx: int,
) -> torch.Tensor | None:
    """The patch network's value at every position, read from an all-densified dense map."""
    if not isinstance(dense, torch.Tensor) or dense.ndim != 4:
        return None
    dy, dx = lattice.dilation
    if len(shape) == 4:
        h, w = shape[2], shape[3]
    elif lattice.flattened is not None:
        h, w = lattice.flattened[1:]
    elif len(shape) == 2:
        h, w = 1, 1
    else:
        return None
    values = []
    for b, i, j in positions:
        y, x = i * sy, j * sx
        crop = dense[b, :, y : y + (h - 1) * dy + 1 : dy, x : x + (w - 1) * dx + 1 : dx]
        if crop.shape[-2:] != (h, w):
            return None
        values.append(crop)
    stacked = torch.stack(values)
    return stacked.reshape(len(positions), *shape[1:]) if stacked.numel() else None


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(_deviation(a.reshape(len(a), -1).float(), b.reshape(len(b), -1).float()).max())
