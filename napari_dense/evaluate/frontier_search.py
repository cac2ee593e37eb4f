"""The frontier's search: the settings one frontier measures, and how each is measured.

:class:`FrontierRun` holds what every setting shares (the model, its layer groups, the
normalised region); :meth:`FrontierRun.rows` measures advanced first, then every combination
of levels (few groups) or a greedy path (many).
"""

from __future__ import annotations

import itertools
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_dense.convert import densify, explain
from napari_dense.errors import InputError
from napari_dense.evaluate.frontier_table import LETTERS, LEVELS, FrontierRow
from napari_dense.io.image import as_batch, guess_channel_axis, normalise
from napari_dense.run._memory import PeakMemory
from napari_dense.run.device import resolve_device
from napari_dense.run.options import RunOptions
from napari_dense.run.predict import predict

__all__ = ["FrontierRun", "check_levels", "groups_of", "rows_expected", "unwrap"]


@dataclass
class FrontierRun:
    """What every setting of one frontier shares: the model, its layer groups, the region."""

    module: Any
    patch: int | tuple[int, int]
    groups: list[list[str]]
    image: np.ndarray  # (C, H, W), normalised
    device: torch.device
    activation: str | None
    border: str
    repeats: int
    levels: tuple[str, ...]
    max_exhaustive: int

    @classmethod
    def prepare(
        cls,
        model: Any,
        image: Any,
        patch_size: int | tuple[int, int] | None,
        options: RunOptions,
        *,
        region: tuple[int, int, int, int] | None,
        repeats: int,
        levels: Sequence[str],
        max_exhaustive: int,
    ) -> FrontierRun:
        """Check the arguments, read and normalise the region, group the layers."""
        checked_levels = check_levels(levels)
        activation = None if options.activation == "none" else options.activation
        if repeats < 1:
            raise InputError(f"repeats must be at least 1, got {repeats}")
        module, patch, normalisation = unwrap(model, patch_size, options.normalisation)
        plan = explain(module, patch)
        if not plan.exact:
            warnings.warn(
                "the dense network is not exact: "
                + "; ".join(plan.inexact_reasons)
                + ". The frontier's errors are against advanced, which itself deviates from "
                "per-patch evaluation (napari_dense.evaluate.compare measures by how much).",
                stacklevel=3,
            )
        batch = as_batch(
            _crop(image, region, options.channel_axis, plan.in_channels),
            channel_axis=options.channel_axis,
            channels=plan.in_channels,
            non_finite=options.non_finite,
        )
        return cls(
            module=module,
            patch=patch,
            groups=groups_of(plan.layers),
            image=normalise(batch[0], normalisation),
            device=resolve_device(options.device),
            activation=activation,
            border=options.border,
            repeats=repeats,
            levels=checked_levels,
            max_exhaustive=max_exhaustive,
        )

    @property
    def search(self) -> str:
        return "exhaustive" if len(self.groups) <= self.max_exhaustive else "greedy"

    @property
    def size(self) -> int | None:
        """Rows :meth:`rows` yields (None where it depends on the greedy path)."""
        return rows_expected(len(self.levels), len(self.groups), self.max_exhaustive)

    def rows(self) -> Iterator[FrontierRow]:
        """Advanced first, then the exhaustive product or the greedy path."""
        levels, top = self.levels, len(self.levels) - 1
        advanced_choice = (levels[top],) * len(self.groups)
        advanced, reference = self.measure(advanced_choice, None)
        yield advanced
        if self.search == "exhaustive" or top == 0:
            for choice in itertools.product(levels, repeat=len(self.groups)):
                if choice != advanced_choice:
                    yield self.measure(choice, reference)[0]
            return
        # Greedy: a path from the cheapest setting to advanced, one group one level at a time.
        state = (0,) * len(self.groups)
        current = self.measure(tuple(levels[i] for i in state), reference)[0]
        yield current
        while any(i < top for i in state):
            candidates = []
            for g in range(len(self.groups)):
                if state[g] < top:
                    upgraded = (*state[:g], state[g] + 1, *state[g + 1 :])
                    choice = tuple(levels[i] for i in upgraded)
                    if choice == advanced_choice:
                        row = advanced  # measured first; not measured (nor yielded) twice
                    else:
                        row = self.measure(choice, reference)[0]
                        yield row
                    candidates.append((upgraded, row))
            state, current = max(candidates, key=lambda c: _gain(current, c[1]))

    def measure(
        self, choice: tuple[str, ...], reference: np.ndarray | None
    ) -> tuple[FrontierRow, np.ndarray]:
        """One setting's row and probabilities; errors against ``reference`` (None: itself)."""
        pairs = zip(self.groups, choice, strict=True)
        sampling = {name: level for group, level in pairs for name in group}
        with warnings.catch_warnings():  # said once, in prepare(), not once per setting
            warnings.filterwarnings("ignore", message="the dense network is not exact")
            dense = densify(self.module, self.patch, sampling=sampling)

        def run() -> np.ndarray:
            return predict(
                self.image,
                dense,
                channel_axis=0,
                border=self.border,
                device=self.device,
                activation=self.activation,
            )

        # The first run warms up (kernel selection, allocator) and measures memory, untimed.
        with PeakMemory(self.device) as memory:
            probabilities = run()  # activated by predict, as the engine does
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            run()  # returns a numpy array: the device has finished
            times.append(time.perf_counter() - start)
        if reference is None:
            reference = probabilities
        diff = np.abs(probabilities - reference)
        changed = probabilities.argmax(0) != reference.argmax(0)
        row = FrontierRow(
            sampling=sampling,
            label=" ".join(LETTERS[level] for level in choice),
            density=float(dense.plan.density),
            macs_per_pixel=float(dense.plan.macs_per_pixel),
            bytes_per_megapixel=float(dense.plan.bytes_per_megapixel),
            seconds=statistics.median(times),
            peak_bytes=memory.device_bytes if self.device.type == "cuda" else memory.host_bytes,
            mean_abs_diff=float(diff.mean()),
            p99_abs_diff=float(np.percentile(diff, 99)),
            class_change=float(changed.mean()),
        )
        return row, probabilities


def _gain(current: FrontierRow, candidate: FrontierRow) -> tuple[float, float]:
    """Error removed per multiply-add per pixel added: (class change, mean |Δp|)."""
    added = max(candidate.macs_per_pixel - current.macs_per_pixel, 1e-9)
    return (
        (current.class_change - candidate.class_change) / added,
        (current.mean_abs_diff - candidate.mean_abs_diff) / added,
    )


def rows_expected(levels: int, groups: int, max_exhaustive: int) -> int | None:
    """Rows a search yields (None where it depends on the greedy path)."""
    if groups <= max_exhaustive or levels == 1:
        return levels**groups
    # Greedy: advanced, the start, then one row per non-top group per step (the last step's
    # only candidate is advanced, not measured twice). With two levels every path is as long.
    return 1 + groups * (groups + 1) // 2 if levels == 2 else None


def groups_of(layers: Sequence[Any]) -> list[list[str]]:
    """Each layer with the layers tied to it, in plan order, each layer in one group."""
    order = {layer.name: number for number, layer in enumerate(layers)}
    groups: list[list[str]] = []
    seen: set[str] = set()
    for layer in layers:
        if layer.name in seen:
            continue
        group = sorted({layer.name, *layer.tied_with}, key=lambda name: order.get(name, 0))
        seen.update(group)
        groups.append(group)
    return groups


def unwrap(
    model: Any,
    patch_size: int | tuple[int, int] | None,
    normalisation: Mapping[str, Any] | None,
) -> tuple[Any, int | tuple[int, int], Mapping[str, Any] | None]:
    """(module, patch size, normalisation), from a loaded model file's metadata where missing."""
    metadata = getattr(model, "metadata", None)
    if metadata is not None:  # a LoadedClassifier
        patch_size = patch_size or metadata.patch_size
        normalisation = normalisation if normalisation is not None else metadata.normalisation
        model = model.module
    if patch_size is None:
        raise InputError("patch_size is required to convert a patch classifier")
    return model, patch_size, normalisation


def _crop(
    image: Any, region: tuple[int, int, int, int] | None, channel_axis: int | None, channels: int
) -> Any:
    """The region of ``image`` (its spatial axes), read from lazy arrays without the rest."""
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    if region is None:
        return image
    ndim = len(np.shape(image))
    if ndim not in (2, 3):
        return image  # as_batch names the problem
    spatial = [0, 1]
    if ndim == 3:
        guessed = guess_channel_axis(np.shape(image), channels)
        axis = channel_axis if channel_axis is not None else guessed
        spatial = [a for a in range(3) if a != (axis or 0) % 3]  # None: as_batch names it
    shape = np.shape(image)
    try:
        y0, y1, x0, x1 = (int(v) for v in region)
    except (TypeError, ValueError):
        raise InputError(f"region must be (y0, y1, x0, x1), got {region!r}") from None
    height, width = shape[spatial[0]], shape[spatial[1]]
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise InputError(
            f"region {region} is empty or outside the image ({height}x{width}); "
            "give 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width"
        )
    index: list[slice] = [slice(None)] * ndim
    index[spatial[0]], index[spatial[1]] = slice(y0, y1), slice(x0, x1)
    return image[tuple(index)]


def check_levels(levels: Sequence[str]) -> tuple[str, ...]:
    """``levels`` in :data:`LEVELS` order; it must include ``"all"`` (the reference)."""
    unknown = [level for level in levels if level not in LEVELS]
    if unknown or "all" not in levels:
        raise InputError(
            f"levels must be a subset of {LEVELS} that includes 'all' (advanced, the reference "
            f"every error is measured against), got {tuple(levels)!r}"
        )
    return tuple(level for level in LEVELS if level in levels)
