"""The errors a user can hit with a store: each is one line that names the fix."""

from __future__ import annotations

from napari_dense.errors import NapariDenseError
from napari_dense.io.store._lock import StoreLockedError

__all__ = [
    "OverwriteRefusedError",
    "StoreExistsError",
    "StoreIncompleteError",
    "StoreLockedError",
    "StoreWriteError",
    "reason",
]


class StoreExistsError(NapariDenseError, FileExistsError):
    """The output path exists and neither overwriting nor resuming was asked for."""


class OverwriteRefusedError(StoreExistsError):
    """The output path holds something ``overwrite`` must not delete (not ours, or the input)."""


class StoreWriteError(NapariDenseError, OSError):
    """The store cannot be created or written (permissions, a file in the way, a full disk)."""


class StoreIncompleteError(NapariDenseError, RuntimeError):
    """The store cannot be finalized because some tiles have not been written."""


def reason(err: OSError) -> str:
    """The operating system's words for ``err`` (``"No space left on device"``)."""
    return err.strerror or str(err)
