"""The phase cover: a few output positions that meet every phase of every striding layer.

A layer of stride ``s`` whose input lies on a lattice of ``c`` pixels is evaluated, at the
output position ``y`` (pixels), at phase ``(y // c) % s``. Layers stacked in sequence have
``c`` = the product of the strides before them, so ``y`` written in that mixed radix holds one
phase digit per layer: one position meets one phase of *every* layer at once. Every digit of
every layer then appears within ``y <= max((s - 1) * c)`` (the *extent*), and about
``max(s_y) × max(s_x)`` positions cover all the phases, rather than the product of the strides.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from napari_dense.convert.geometry import Pair

__all__ = ["PhaseCover", "StridingLayer", "phase_cover"]

#: One striding layer: (input lattice c, stride s, the phases (a, b) it computes).
StridingLayer = tuple[Pair, Pair, Iterable[Pair]]
#: Positions ``(row, col)`` on the output grid, the grid's ``(rows, cols)``, and whether every
#: phase is met.
PhaseCover = tuple[list[Pair], Pair, bool]


def phase_cover(
    layers: Sequence[StridingLayer],
    step: Pair = (1, 1),
    computed: Sequence[Sequence[bool]] | None = None,
) -> PhaseCover:
    """Output positions that together meet every computed phase of every striding layer.

    Parameters
    ----------
    layers
        The striding layers: ``(input stride c, stride s, phases)`` each, ``c`` and ``s`` in
        ``(y, x)``; ``phases`` are the ``(a, b)`` the dense layer computes (all ``s_y × s_x``
        when densified, the checkered ones, or ``(0, 0)`` when left strided).
    step
        Pixels between neighbouring output positions (``plan.output_stride``).
    computed
        The sample pattern (``plan.sample_pattern``, repeated): only those grid points hold
        computed outputs. ``None``: every point.

    Returns
    -------
    PhaseCover
        ``(positions, (rows, cols), covered)``: grid positions ``(i, j)`` (pixel
        ``(i * step_y, j * step_x)``): the grid's first and last computed points, then every
        pair of a row and a column that each meet every layer's phase digits along their axis
        (about ``max(s_y) × max(s_x)``), where computed, then greedily any position meeting
        phases not met yet; the smallest grid that holds them; and whether every phase is met
        (phases of layers before a strided one that no output position reaches cannot be).
    """
    layers = [(c, s, set(ph)) for c, s, ph in layers]
    extent = [max([(s[a] - 1) * c[a] for c, s, _ in layers] or [0]) for a in (0, 1)]
    grid = (max(2, -(-extent[0] // step[0]) + 1), max(2, -(-extent[1] // step[1]) + 1))
    rows, cols = (_axis_cover(layers, step, grid, a) for a in (0, 1))
    product = [(i, j) for i in rows for j in cols]
    positions, covered = _greedy(layers, step, grid, computed, product)
    if not covered:  # checkered patterns may place a phase beyond the extent: one period more
        period = [max([s[a] * c[a] for c, s, _ in layers] or [1]) for a in (0, 1)]
        wider = tuple(max(grid[a], -(-period[a] // step[a]) + 1) for a in (0, 1))
        if wider != grid:
            grid = (wider[0], wider[1])
            positions, covered = _greedy(layers, step, grid, computed, [])
    return positions, grid, covered


def _axis_cover(
    layers: list[tuple[Pair, Pair, set[Pair]]], step: Pair, grid: Pair, axis: int
) -> list[int]:
    """Grid rows (or columns) along which every layer meets each of its phase digits.

    Greedy: the index meeting the most digits not met yet; ties go to the one meeting the
    rarest digits (those few indices reach), which keeps the set near ``max(s)`` indices.
    """
    needed = {(k, phase[axis]) for k, (_, _, phases) in enumerate(layers) for phase in phases}
    met = {
        i: {(k, (i * step[axis] // c[axis]) % s[axis]) for k, (c, s, _) in enumerate(layers)}
        & needed
        for i in range(grid[axis])
    }
    reach = {digit: sum(digit in m for m in met.values()) for digit in needed}
    chosen: list[int] = []
    seen: set[tuple[int, int]] = set()
    while not needed <= seen:
        best = max(
            met, key=lambda i: (len(met[i] - seen), sum(1 / reach[d] for d in met[i] - seen))
        )
        if not met[best] - seen:
            break
        chosen.append(best)
        seen |= met[best]
    return chosen


def _greedy(
    layers: list[tuple[Pair, Pair, set[Pair]]],
    step: Pair,
    grid: Pair,
    computed: Sequence[Sequence[bool]] | None,
    first: list[Pair],
) -> tuple[list[Pair], bool]:
    """The grid's first and last computed positions, ``first`` (where computed), then greedily
    the position meeting the most phases not met yet, until every phase is met."""
    mask = _mask(computed, grid)
    candidates = [(i, j) for i in range(grid[0]) for j in range(grid[1]) if mask[i, j]]
    needed = {(k, phase) for k, (_, _, phases) in enumerate(layers) for phase in phases}

    def meets(position: Pair) -> set[tuple[int, Pair]]:
        y, x = position[0] * step[0], position[1] * step[1]
        found = {
            (k, ((y // c[0]) % s[0], (x // c[1]) % s[1])) for k, (c, s, _) in enumerate(layers)
        }
        return found & needed

    chosen = list(dict.fromkeys([candidates[0], candidates[-1], *(p for p in first if mask[p])]))
    seen = set().union(*(meets(p) for p in chosen))
    if needed <= seen:
        return chosen, True
    met = {p: meets(p) for p in candidates}
    # Ties go to the position meeting the coarsest layers' phases: few positions reach those.
    coarse = {
        (k, phase): c[0] * c[1] for k, (c, _, phases) in enumerate(layers) for phase in phases
    }
    while not needed <= seen:
        best = max(
            candidates,
            key=lambda p: (len(met[p] - seen), sum(coarse[q] for q in met[p] - seen)),
        )
        if not met[best] - seen:
            break  # the rest is met by no computed position
        chosen.append(best)
        seen |= met[best]
    return chosen, needed <= seen


def _mask(pattern: Sequence[Sequence[bool]] | None, grid: Pair) -> np.ndarray:
    if pattern is None:
        return np.ones(grid, dtype=bool)
    tile = np.array(pattern, dtype=bool)
    reps = (-(-grid[0] // tile.shape[0]), -(-grid[1] // tile.shape[1]))
    return np.tile(tile, reps)[: grid[0], : grid[1]]
