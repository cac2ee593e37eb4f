"""Pure geometry of dense networks: pairs, lattices and border padding.

Vocabulary
----------
patch network
    The user's classifier applied to one ``Ph × Pw`` patch.
dense tensor
    A feature map of the dense network. Index ``(y, x)`` of a dense tensor holds what the patch
    network computes for the patch whose top-left corner is at pixel ``(y * step_y, x * step_x)``.
lattice
    How a dense tensor relates to the patch network (see :class:`Lattice`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TypeAlias

__all__ = ["Lattice", "Pair", "border_padding", "checkered_phases", "pair", "sample_grid"]

Pair: TypeAlias = tuple[int, int]


def pair(value: int | tuple[int, ...] | list[int], name: str = "value") -> Pair:
    """Return ``value`` as a ``(y, x)`` pair of ints (an int is used for both axes)."""
    if isinstance(value, int):
        return (value, value)
    values = tuple(int(v) for v in value)
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (values[0], values[1])


def _mul(a: Pair, b: Pair) -> Pair:
    return (a[0] * b[0], a[1] * b[1])


@dataclass(frozen=True)
class Lattice:
    """Where the values of a dense tensor sit, relative to the patch network.

    Attributes
    ----------
    dilation
        Distance, in dense-tensor indices, between neighbouring features of the patch network's map
        at this point: the product of the strides of the *densified* layers upstream. Layers that
        read this tensor use it as their dilation.
    step
        Input pixels between neighbouring dense-tensor indices: the product of the strides of the
        layers upstream that were *not* densified (1 when everything is densified).
    flattened
        ``(C, h, w)`` when the patch network has flattened its ``C × h × w`` map into a vector that
        a ``Linear`` layer has not consumed yet; the dense tensor keeps the map unflattened.
    phases
        In phase-batch form only: the strides whose phases were moved into the batch dimension,
        in order (the batch is ``(phases of the last, ..., phases of the first, N)``).
    channels_last
        True while the patch network holds this map permuted to ``(N, h, w, C)`` (for a
        ``LayerNorm`` or ``Linear`` over channels); the dense tensor is permuted alike.
    reduced
        The spatial axis (2 or 3) that the patch network has reduced away (``x.amax(3)``,
        before the other axis is reduced too); the dense tensor keeps it.
    checkered
        For every checkered layer upstream, in order: the input-pixel offsets of the phases it
        kept. Each kept phase is carried in the batch dimension (the batch is ``(phases of the
        last, ..., phases of the first, N)``) as a compact map of the lattice ``step``.
    """

    dilation: Pair = (1, 1)
    step: Pair = (1, 1)
    flattened: tuple[int, int, int] | None = None
    channels_last: bool = False
    reduced: int | None = None
    phases: tuple[Pair, ...] = ()
    checkered: tuple[tuple[Pair, ...], ...] = ()

    def densified(self, stride: Pair) -> Lattice:
        """Lattice after a layer of ``stride`` evaluated at every phase (stride 1, dilated)."""
        return replace(self, dilation=_mul(self.dilation, stride))

    def strided(self, stride: Pair) -> Lattice:
        """Lattice after a layer of ``stride`` evaluated at one phase only (kept strided)."""
        return replace(self, step=_mul(self.step, stride))

    def checkered_by(self, stride: Pair) -> Lattice:
        """Lattice after a layer of ``stride`` evaluated at its checkered phases only."""
        offsets = tuple((a * self.step[0], b * self.step[1]) for a, b in checkered_phases(stride))
        return replace(self, step=_mul(self.step, stride), checkered=(*self.checkered, offsets))

    def sample_offsets(self) -> tuple[Pair, ...]:
        """Input-pixel offset of every batch entry's samples, in batch order (one per batch
        entry of a single image; ``((0, 0),)`` without checkered layers)."""
        combined: list[Pair] = [(0, 0)]
        for offsets in self.checkered:  # the latest split is outermost in the batch
            combined = [(o[0] + c[0], o[1] + c[1]) for o in offsets for c in combined]
        return tuple(combined)

    @property
    def density(self) -> float:
        """Positions computed per input pixel (1 when every layer is densified)."""
        return math.prod(len(o) for o in self.checkered) / (self.step[0] * self.step[1])

    @property
    def total_stride(self) -> Pair:
        """Product of all strides upstream (input pixels between neighbouring patch features)."""
        return _mul(self.dilation, self.step)


def border_padding(
    size: int, patch: int, step: int = 1, *, whole_cells: bool = False
) -> tuple[int, int]:
    """Padding ``(before, after)`` of one image axis for dense prediction.

    With this padding, output sample ``i`` belongs to the patch centred (FDFE convention: the patch
    starts ``patch // 2`` before its centre) at input pixel ``i * step``, and the samples cover
    every pixel: the last one sits at or beyond ``size - 1`` so interpolation never extrapolates.
    With ``whole_cells`` every pixel lies in a cell ``[i * step, (i + 1) * step)`` whose both
    ends are sampled (sample patterns are filled cell by cell, as tiles compute them).
    """
    if whole_cells:
        samples = (size - 1) // step + 2
    else:
        samples = -(-(size - 1) // step) + 1  # ceil((size - 1) / step) + 1
    before = patch // 2
    after = (samples - 1) * step + patch - size - before
    return before, after


def checkered_phases(stride: Pair) -> tuple[Pair, ...]:
    """The phases ``(a, b)`` of a ``sy × sx`` stride that checkered sampling keeps.

    A checkerboard of the phase grid: ``a + b`` even. For stride 2×2 that is the diagonal
    ``(0, 0), (1, 1)`` (half the work of all four phases); for 3×3, 5 of 9; for 4×4, 8 of 16.
    Along one axis only (``sx == 1``) it keeps the even phases. ``(0, 0)`` is always kept, so
    the samples of a checkered layer include those of the strided layer.
    """
    return tuple((a, b) for a in range(stride[0]) for b in range(stride[1]) if (a + b) % 2 == 0)


def sample_grid(lattice: Lattice) -> tuple[Pair, tuple[tuple[bool, ...], ...]]:
    """The grid that holds every computed sample of ``lattice``, and its pattern.

    Samples sit at ``offset + step * k`` for the :meth:`Lattice.sample_offsets`. Returns the
    grid spacing ``G`` (input pixels; the largest that divides the step and every offset) and
    the ``P × P`` pattern (``P = step / G``) of grid points that hold a computed sample, repeated
    every ``step`` pixels; ``pattern[0][0]`` is always True.
    """
    offsets = lattice.sample_offsets()
    grid = tuple(math.gcd(lattice.step[a], *(o[a] for o in offsets)) for a in (0, 1))
    period = (lattice.step[0] // grid[0], lattice.step[1] // grid[1])
    kept = {(o[0] // grid[0], o[1] // grid[1]) for o in offsets}
    pattern = tuple(tuple((a, b) in kept for b in range(period[1])) for a in range(period[0]))
    return (grid[0], grid[1]), pattern
