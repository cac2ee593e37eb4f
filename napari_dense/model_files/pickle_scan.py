"""Sample inputs of a ``.pt2``: a pickle, checked from its opcodes without running it.

``torch.save`` writes sample inputs as a pickle even for plain tensors, and torch unpickles
them when loading (falling back to an unrestricted ``torch.load``). Here only the globals that
``torch.save`` writes for tensors (:data:`TENSOR_PICKLE_GLOBALS`) may appear; the entry is then
emptied before torch reads the archive (:meth:`.archive.CheckedArchive.for_torch`).
"""

from __future__ import annotations

import io
import zipfile
import zlib

from napari_dense.model_files.errors import REEXPORT, ArchiveProblem

__all__ = ["TENSOR_PICKLE_GLOBALS", "check_sample_inputs", "pickle_globals"]

#: Globals of a ``torch.save`` pickle of tensors, tuples and dicts.
TENSOR_PICKLE_GLOBALS = frozenset(
    ["torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter"]
    + ["collections.OrderedDict", "torch.device", "torch.Size"]
    + [
        f"torch.{kind}Storage"
        for kind in "Float Double Half BFloat16 Long Int Short Char Byte Bool Untyped".split()
    ]
)
_STRING_OPS = frozenset(
    "SHORT_BINUNICODE BINUNICODE BINUNICODE8 UNICODE SHORT_BINSTRING BINSTRING STRING".split()
)
_MEMO_OPS = frozenset({"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"})


def pickle_globals(data: bytes) -> list[str] | None:
    """The globals a pickle imports, read from its opcodes (None: not readable statically)."""
    import pickletools

    names: list[str] = []
    strings: list[str] = []  # strings pushed just before (for STACK_GLOBAL)
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                names.append(str(argument).replace(" ", "."))
                strings = []
            elif opcode.name in _STRING_OPS:
                strings.append(str(argument))
            elif opcode.name == "STACK_GLOBAL":
                if len(strings) < 2:
                    return None
                names.append(f"{strings[-2]}.{strings[-1]}")
                strings = []
            elif opcode.name in ("OBJ", "EXT1", "EXT2", "EXT4"):
                return None
            elif opcode.name not in _MEMO_OPS:
                strings = []
    except (ValueError, EOFError, UnicodeDecodeError):
        return None
    return names


def check_sample_inputs(name: str, raw: bytes) -> None:
    """Sample inputs are a ``torch.save`` zip around a pickle: read its opcodes, run nothing.

    Only the globals ``torch.save`` writes for tensors (:data:`TENSOR_PICKLE_GLOBALS`) may
    appear. The entry is then not given to torch at all (:meth:`CheckedArchive.for_torch`).
    """
    if not raw:
        return  # torch reads an empty entry as "no sample inputs"
    found = "a pickle that is not torch.save's zip format"
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as inner:
            pickles = [n for n in inner.namelist() if n.endswith("/data.pkl")]
            if len(pickles) == 1:
                names = pickle_globals(inner.read(pickles[0]))
                unsafe = None if names is None else sorted(set(names) - TENSOR_PICKLE_GLOBALS)
                if unsafe == []:
                    return
                found = (
                    f"a pickle that calls {', '.join(unsafe)[:120]}"
                    if unsafe
                    else "a pickle whose calls cannot be read without running it"
                )
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, EOFError, zlib.error):
        pass
    raise ArchiveProblem(
        f"the sample inputs ({name}) are {found}, not plain tensors: it could run code when "
        f"loaded; {REEXPORT}"
    )
