"""Exceptions with messages that name the fix."""

from __future__ import annotations

__all__ = [
    "ConversionError",
    "InputError",
    "NapariDenseError",
    "PatchSizeError",
    "UnsupportedLayerError",
]


class NapariDenseError(Exception):
    """Base of every error napari-dense raises on purpose (the CLI prints these as one line)."""


class UnsupportedLayerError(NapariDenseError, TypeError):
    """The model contains an operation that has no exact dense equivalent (yet)."""


class PatchSizeError(NapariDenseError, ValueError):
    """The patch size does not fit the model (its head does not reduce the patch to 1×1)."""


class InputError(NapariDenseError, ValueError):
    """The image (or another argument) cannot be used as given."""


class ConversionError(NapariDenseError, RuntimeError):
    """The converted network does not compute what the model computes (a failed self-check)."""
