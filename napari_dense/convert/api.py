"""The public functions: :func:`densify` and :func:`explain`."""

from __future__ import annotations

import warnings

from napari_dense.convert.acquire import Classifier
from napari_dense.convert.costs import _build, _plan_with_costs
from napari_dense.convert.dense import DenseClassifier
from napari_dense.convert.patchnet import _trace
from napari_dense.convert.plan import DensePlan
from napari_dense.convert.state import SamplingSpec
from napari_dense.convert.verify import certified


def explain(
    model: Classifier,
    patch_size: int | tuple[int, int],
    *,
    sampling: SamplingSpec = "all",
    in_channels: int | None = None,
    verify: bool = True,
) -> DensePlan:
    """Describe the dense network of ``model`` before building it.

    Parameters
    ----------
    model, patch_size, sampling, in_channels, verify
        As in :func:`densify` (``plan.verified`` holds the self-check; ``str(plan)`` shows it).

    Returns
    -------
    DensePlan
        Every striding layer with its kernel, stride, sampling and the cost that densifying it
        adds; totals for the whole network. ``str(plan)`` is a markdown table.
    """
    traced = _trace(model, patch_size, in_channels)
    network, plan, builder = _build(traced, sampling)
    plan = _plan_with_costs(traced, plan)
    if verify:
        plan = certified(model, traced, DenseClassifier(network, plan), builder).plan
    return plan


def densify(
    model: Classifier,
    patch_size: int | tuple[int, int],
    *,
    sampling: SamplingSpec = "all",
    phases: str = "dilated",
    in_channels: int | None = None,
    verify: bool = True,
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
        phases, :func:`~napari_dense.convert.geometry.checkered_phases`; the computed samples form
        ``plan.sample_pattern``), or a mapping ``{layer name: "all" | "checkered" | "none"}``
        (custom; layers not named are ``"none"``). Names are those of :func:`explain`.
    phases
        How the phases of densified layers are carried, same result either way:
        ``"dilated"`` (default; later kernels dilated, "à trous") or ``"batch"`` (FDFE's
        space-to-batch: phases moved into the batch dimension and unwarped at the end; no layer
        may stay strided after a densified one, none may be checkered). See README
        "Performance" for measurements.
    in_channels
        Input channels, when they cannot be read from the model (its input or first ``Conv2d``).
    verify
        Certify the result (default): run the dense network and ``model`` itself on a random
        batch whose patch positions cover every phase of every striding layer and compare them;
        ``plan.verified`` records max |Δ| and the positions checked. ``False`` skips it.

    Returns
    -------
    DenseClassifier
        ``forward(x)`` maps ``(N, C, H, W)`` to ``(N, K, H', W')`` where output ``[i, j]`` is the
        classifier's output for the patch with top-left corner ``(i * sy, j * sx)``,
        ``(sy, sx) = output_stride``, and ``H' = (H - Ph) // sy + 1``. With checkered layers
        only the points of ``sample_pattern`` (repeated) are computed, the others are zero.

    Raises
    ------
    ConversionError
        When the self-check finds that a network claimed exact is not (it names the first node
        whose map differs).

    Warns
    -----
    UserWarning
        Once, when padding inside the network makes the dense output differ from per-patch
        evaluation (``exact`` is then False); it gives the measured deviation.
    """
    traced = _trace(model, patch_size, in_channels)
    network, plan, builder = _build(traced, sampling, phases)
    dense = DenseClassifier(network, _plan_with_costs(traced, plan))
    if verify:
        dense = certified(model, traced, dense, builder)
    if not dense.plan.exact:
        measured = dense.plan.verified
        warnings.warn(
            "the dense network is not exact: "
            + "; ".join(dense.plan.inexact_reasons)
            + (f" (self-check: {measured.summary()})" if measured else "")
            + ". Use napari_dense.evaluate.compare / reference.patchwise to measure the deviation.",
            stacklevel=2,
        )
    return dense
