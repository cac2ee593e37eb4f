"""Overwrite protection: ``overwrite`` deletes only a store this project wrote, and never the input.

Never deleted: a file, another Zarr, a store holding foreign files, a symbolic link, the input
image or a folder containing it, a store another run is writing (its writer lock).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from napari_dense.io.store._errors import (
    OverwriteRefusedError,
    StoreExistsError,
    StoreWriteError,
    reason,
)
from napari_dense.io.store._layout import ATTRIBUTES_KEY, OUR_NAME_PATTERN, OUR_NAMES
from napari_dense.io.store._lock import WriterLock

__all__ = ["check_replaceable", "make_store_folder", "remove_existing_store", "written_by_us"]

#: A store's zarr.json larger than this is not ours (provenance is a few kB).
_MAX_METADATA_BYTES: Final = 16 * 2**20
_CHOOSE: Final = "choose another output path"


def check_replaceable(path: Path, protect: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse (:class:`OverwriteRefusedError`) unless ``path`` is a store of ours, or empty."""
    if path.is_symlink():
        raise OverwriteRefusedError(
            f"{path} is a symbolic link (to {os.readlink(path)}); overwrite does not follow "
            f"links: {_CHOOSE}, or remove the link yourself"
        )
    real = path.resolve()
    for protected in protect:
        guarded = Path(protected).resolve()
        if guarded == real or real in guarded.parents:
            what = "is the input image" if guarded == real else f"contains the input {guarded}"
            raise OverwriteRefusedError(
                f"{path} {what}; napari-dense never deletes its input: {_CHOOSE}"
            )
    if not path.is_dir():
        raise OverwriteRefusedError(
            f"{path} is a file, not a probability map napari-dense wrote, so it is not deleted: "
            f"{_CHOOSE} (or delete the file yourself)"
        )
    names = sorted(entry.name for entry in os.scandir(path))
    if not names:
        return  # an empty directory holds nothing to lose
    if not any(name in names for name in ("zarr.json", ".zgroup", ".zarray")):
        raise OverwriteRefusedError(
            f"{path} exists and is not a Zarr store, so overwrite will not delete it; {_CHOOSE}"
        )
    if not written_by_us(path / "zarr.json"):
        raise OverwriteRefusedError(
            f"{path} is a Zarr store that napari-dense did not write (no '{ATTRIBUTES_KEY}' "
            f"attribute), so overwrite will not delete it; {_CHOOSE}"
        )
    foreign = [n for n in names if n not in OUR_NAMES and not OUR_NAME_PATTERN.fullmatch(n)]
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise OverwriteRefusedError(
            f"{path} holds files napari-dense did not write ({listed}), so overwrite will not "
            f"delete it; move them out, or {_CHOOSE}"
        )


def written_by_us(metadata: Path) -> bool:
    """Whether ``metadata`` is a Zarr v3 group's zarr.json with our provenance attribute.

    Read as plain JSON, size-limited, before anything else: the file is not trusted.
    """
    try:
        if metadata.stat().st_size > _MAX_METADATA_BYTES:
            return False
        document = json.loads(metadata.read_bytes())
    except (OSError, ValueError):
        return False
    attributes = document.get("attributes") if isinstance(document, dict) else None
    return (
        document.get("zarr_format") == 3
        and document.get("node_type") == "group"
        and isinstance(attributes, dict)
        and isinstance(attributes.get(ATTRIBUTES_KEY), dict)
        and isinstance(attributes.get("ome"), dict)
    )


def remove_existing_store(path: Path) -> None:
    """Delete what :func:`check_replaceable` allowed, under the store's writer lock."""
    try:
        if not any(path.iterdir()):
            path.rmdir()  # fails, deleting nothing, if something appeared meanwhile
            return
        lock = WriterLock(path)
        lock.acquire()  # StoreLockedError while another run writes it
        try:
            shutil.rmtree(path)
        finally:
            lock.release()
    except OSError as err:
        raise StoreWriteError(f"cannot replace {path}: {reason(err)}") from err


def make_store_folder(
    path: Path, *, overwrite: bool, protect: Sequence[str | os.PathLike[str]]
) -> None:
    """Create the empty folder of a new store: replace what is there only if ``overwrite`` may.

    The folder is made exclusively, so of two runs creating the same store, one is refused.
    """
    if path.exists() or path.is_symlink():
        # Checked first, with or without overwrite: the message says what is there.
        check_replaceable(path, protect)
        if not overwrite:
            raise StoreExistsError(
                f"{path} exists; pass overwrite=True (CLI: --overwrite) or resume=True (--resume)"
            )
        remove_existing_store(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreWriteError(
            f"cannot create {path}: {reason(err)}; choose a writable output path"
        ) from err
    try:
        path.mkdir()
    except FileExistsError:
        raise StoreExistsError(
            f"{path} was created by another run just now; choose another output path"
        ) from None
    except OSError as err:
        raise StoreWriteError(
            f"cannot create {path}: {reason(err)}; choose a writable output path"
        ) from err
