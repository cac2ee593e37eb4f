"""Generators run in napari thread workers: make their errors reach the user."""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

from napari_dense.errors import NapariDenseError

__all__ = ["ComputeError", "reporting_errors"]

T = TypeVar("T")
R = TypeVar("R")


class ComputeError(NapariDenseError):
    """A runtime error while computing (torch out of memory, a bad kernel, ...)."""


def reporting_errors(results: Generator[T, None, R]) -> Generator[T, None, R]:
    """Yield from ``results`` and return what it returns, re-raising any ``RuntimeError`` as a
    :class:`ComputeError`.

    superqt's generator workers take a ``RuntimeError`` for a deleted worker and only warn:
    torch's errors (mostly ``RuntimeError``) would vanish instead of reaching ``errored``.
    Closing this generator (cancel) closes ``results``.
    """
    try:
        return (yield from results)
    except RuntimeError as err:
        raise ComputeError(str(err)) from err
