"""One writer per probability store: an advisory lock inside the store, readers never blocked.

The lock is an operating-system file lock (:mod:`filelock`: ``flock`` on Unix) on
``<store>/.napari_dense.lock``, so the kernel releases it when its owner exits in any way —
SIGKILL, a crash, a closed laptop lid that ends the session. A lock left by a dead process is
therefore recovered without anyone deleting a file. Beside it, ``.napari_dense_owner.json``
names the current owner (PID, host, start time) for the refusal message; it is informational
only, removed on release, and left (stale) only by a process that died.

Only runs that write take the lock (:func:`napari_dense.run.to_zarr.prepare_run`, ``create``,
``finalize``); opening a store to read it never does.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Final

from filelock import FileLock, Timeout

from napari_dense.errors import NapariDenseError

__all__ = ["LOCK_FILE", "OWNER_FILE", "LockMixin", "StoreLockedError", "WriterLock"]

#: The file the lock is taken on (empty; kept after release so that waiters share one inode).
LOCK_FILE: Final = ".napari_dense.lock"
#: Who holds the lock: ``{"pid", "host", "started"}`` (stale after a crash).
OWNER_FILE: Final = ".napari_dense_owner.json"


class StoreLockedError(NapariDenseError, RuntimeError):
    """Another run is writing this store (or the lock cannot be taken).

    Attributes
    ----------
    owner : dict
        ``{"pid", "host", "started"}`` of the run holding the lock, as far as known (may be empty).
    """

    def __init__(self, message: str, owner: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.owner: dict[str, Any] = dict(owner or {})


class WriterLock:
    """The writer lock of the store at ``store_path`` (not taken until :meth:`acquire`).

    Parameters
    ----------
    store_path
        The store's directory (it must exist before :meth:`acquire`).
    """

    def __init__(self, store_path: Path) -> None:
        self.store_path = Path(store_path)
        # thread_local=False: the GUI takes the lock on its thread and the worker thread
        # releases it when the run ends. No timeout: a second writer is refused, not queued.
        self._lock = FileLock(
            str(self.store_path / LOCK_FILE),
            timeout=0,
            thread_local=False,
            preserve_lock_file=True,
        )

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return bool(self._lock.is_locked)

    def acquire(self) -> None:
        """Take the lock, or raise :class:`StoreLockedError` naming who holds it.

        Re-acquiring a lock this object already holds does nothing.
        """
        if self.held:
            return
        try:
            self._lock.acquire(blocking=False)
        except Timeout:
            owner = self.owner()
            raise StoreLockedError(
                f"{self.store_path} is being written by another run ({_describe(owner)}); wait "
                "for it to finish or stop it (a run that died releases the lock by itself), or "
                "write to another output path",
                owner,
            ) from None
        except OSError as err:
            raise StoreLockedError(
                f"cannot lock {self.store_path} for writing: {err.strerror or err}; choose a "
                "writable output path on a local disk"
            ) from err
        try:
            self._write_owner()
        except OSError:
            # The owner file only serves messages; the lock itself is held.
            pass

    def release(self) -> None:
        """Release the lock if held (safe to call more than once); the owner file goes first.

        A finished map keeps no PID or host name; removed while the lock is still held, so
        that the next owner's file is never the one deleted.
        """
        if self.held:
            try:
                (self.store_path / OWNER_FILE).unlink(missing_ok=True)
            except OSError:
                pass
            self._lock.release(force=True)

    def owner(self) -> dict[str, Any]:
        """The last recorded owner, ``{}`` when unknown (never raises)."""
        try:
            text = (self.store_path / OWNER_FILE).read_text(encoding="utf-8")[:4096]
            owner = json.loads(text)
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def _write_owner(self) -> None:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        temporary = self.store_path / f".{uuid.uuid4().hex}.owner.tmp"
        temporary.write_text(json.dumps(owner), encoding="utf-8")
        os.replace(temporary, self.store_path / OWNER_FILE)


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "owner unknown"
    pid, host, started = owner.get("pid", "?"), owner.get("host", "?"), owner.get("started", "?")
    here = " (this process)" if pid == os.getpid() and host == socket.gethostname() else ""
    return f"PID {pid}{here} on {host}, started {started}"


class LockMixin:
    """The writer-lock methods of :class:`~napari_dense.io.store.ProbabilityStore` (``_lock``)."""

    _lock: WriterLock

    @property
    def holds_lock(self) -> bool:
        """Whether this object holds the store's writer lock."""
        return self._lock.held

    def acquire_lock(self) -> None:
        """Become the store's one writing run (readers are never blocked).

        Taken by :meth:`create`, by :func:`napari_dense.run.to_zarr.prepare_run` on resume and by
        :meth:`finalize`; released by :meth:`release_lock`, at the end of :meth:`finalize`, and
        by the operating system when the process exits (also SIGKILL or a crash).

        Raises
        ------
        StoreLockedError
            Another run (another process, or another store object in this one) holds it; the
            message names its PID, host and start time.
        """
        self._lock.acquire()

    def release_lock(self) -> None:
        """Let another run write the store (no-op when not held)."""
        self._lock.release()

    def lock_owner(self) -> dict[str, Any]:
        """``{"pid", "host", "started"}`` of the last run that took the lock (``{}`` if none)."""
        return self._lock.owner()
