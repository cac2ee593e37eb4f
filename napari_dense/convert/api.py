"""The public functions: :func:`densify` and :func:`explain`."""

from __future__ import annotations

import warnings

from ..dense import DenseClassifier
from ..plan import DensePlan
from .acquire import Classifier
from .costs import _build, _plan_with_costs
from .patchnet import _trace
from .state import SamplingSpec


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
