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

from dataclasses import dataclass, replace
from typing import TypeAlias

__all__ = ["Lattice", "Pair", "border_padding", "pair"]

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
    """

    dilation: Pair = (1, 1)
    step: Pair = (1, 1)
    flattened: tuple[int, int, int] | None = None
    phases: tuple[Pair, ...] = ()

    def densified(self, stride: Pair) -> Lattice:
        """Lattice after a layer of ``stride`` evaluated at every phase (stride 1, dilated)."""
        return replace(self, dilation=_mul(self.dilation, stride))

    def strided(self, stride: Pair) -> Lattice:
        """Lattice after a layer of ``stride`` evaluated at one phase only (kept strided)."""
        return replace(self, step=_mul(self.step, stride))

    @property
    def total_stride(self) -> Pair:
        """Product of all strides upstream (input pixels between neighbouring patch features)."""
        return _mul(self.dilation, self.step)


def border_padding(size: int, patch: int, step: int = 1) -> tuple[int, int]:
    """Padding ``(before, after)`` of one image axis for dense prediction.

    With this padding, output sample ``i`` belongs to the patch centred (FDFE convention: the patch
    starts ``patch // 2`` before its centre) at input pixel ``i * step``, and the samples cover
    every pixel: the last one sits at or beyond ``size - 1`` so interpolation never extrapolates.
    """
    samples = -(-(size - 1) // step) + 1  # ceil((size - 1) / step) + 1
    before = patch // 2
    after = (samples - 1) * step + patch - size - before
    return before, after
