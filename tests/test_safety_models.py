"""Untrusted model files never run code: malicious archives built here, refused everywhere.

Each malicious ``.pt2`` is a real exported model with a payload that creates a marker folder
(``os.mkdir``) injected where torch would run it. Every payload has a positive control: the
unsafe load (``torch.load(weights_only=False)``, ``pickle.loads``, ``sympy.sympify``, torch's
own ``torch.export.load``) does create the marker, so a passing refusal is not vacuous.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from napari_dense._napari import reader as _reader
from napari_dense.cli import main
from napari_dense.evaluate.models import fdfe15
from napari_dense.model_files import (
    CodeExecutionRefused,
    ModelFileError,
    ModelMetadata,
    load_classifier,
    save_classifier,
)

REEXPORT = "napari_dense.save_classifier(model, 'model.pt2')"
METADATA = ModelMetadata(patch_size=(15, 15), class_names=["a", "b", "c"], activation="softmax")


class _Payload:
    """Unpickling this creates ``marker`` (a folder): stands for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def _torch_saved(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("good")
    return save_classifier(fdfe15(num_classes=3), folder / "good.pt2", metadata=METADATA)


def _entries(path: Path) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        root = archive.namelist()[0].split("/")[0]
        return root, {i.filename[len(root) + 1 :]: archive.read(i) for i in archive.infolist()}


def _rewrite(source: Path, target: Path, changes: dict[str, bytes]) -> Path:
    """A copy of ``source`` with entries replaced or added (names below the root folder)."""
    root, entries = _entries(source)
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in {**entries, **changes}.items():
            archive.writestr(f"{root}/{name}", data)
    return target


def _edit_json(source: Path, name: str, edit: Callable[[Any], None]) -> bytes:
    data = json.loads(_entries(source)[1][name])
    edit(data)
    return json.dumps(data).encode()


def _first_expression(node: Any) -> dict[str, Any]:
    if isinstance(node, dict):
        if isinstance(node.get("expr_str"), str):
            return node
        children = list(node.values())
    else:
        children = list(node) if isinstance(node, list) else []
    for child in children:
        found = _first_expression(child)
        if found:
            return found
    return {}


# Each case: the entries it changes, and the unsafe load that runs its payload (the control).
def _sample_inputs(good: Path, marker: Path) -> tuple[dict[str, bytes], Callable[[Path], Any]]:
    raw = _torch_saved(((torch.zeros(2, 1, 15, 15),), {"payload": _Payload(marker)}))
    return {"data/sample_inputs/model.pt": raw}, lambda bad: torch.export.load(bad)


def _pickled_weight(good: Path, marker: Path) -> tuple[dict[str, bytes], Callable[[Path], Any]]:
    def edit(config: Any) -> None:
        config["config"]["0.weight"]["use_pickle"] = True

    raw = _torch_saved(_Payload(marker))
    changes = {
        "data/weights/model_weights_config.json": _edit_json(
            good, "data/weights/model_weights_config.json", edit
        ),
        "data/weights/weight_0": raw,
    }
    return changes, lambda bad: torch.load(io.BytesIO(raw), weights_only=False)


def _pickled_constant(good: Path, marker: Path) -> tuple[dict[str, bytes], Callable[[Path], Any]]:
    def edit(config: Any) -> None:
        config["config"]["c"] = {"path_name": "tensor_0", "is_param": False, "use_pickle": True}

    raw = _torch_saved(_Payload(marker))
    changes = {
        "data/constants/model_constants_config.json": _edit_json(
            good, "data/constants/model_constants_config.json", edit
        ),
        "data/constants/tensor_0": raw,
    }
    return changes, lambda bad: torch.load(io.BytesIO(raw), weights_only=False)


def _opaque_object(good: Path, marker: Path) -> tuple[dict[str, bytes], Callable[[Path], Any]]:
    def edit(config: Any) -> None:
        config["config"]["c"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True}

    raw = pickle.dumps(_Payload(marker))
    changes = {
        "data/constants/model_constants_config.json": _edit_json(
            good, "data/constants/model_constants_config.json", edit
        ),
        "data/constants/opaque_obj_0": raw,
    }
    return changes, lambda bad: pickle.loads(raw)


def _legacy_weights(good: Path, marker: Path) -> tuple[dict[str, bytes], Callable[[Path], Any]]:
    raw = _torch_saved(_Payload(marker))
    return {"data/weights/model.pt": raw}, lambda bad: torch.load(
        io.BytesIO(raw), weights_only=False
    )


def _symbolic_shape(good: Path, marker: Path) -> tuple[dict[str, bytes], Callable[[Path], Any]]:
    import sympy

    code = f"{{}} + 0*len(str(__import__('os').mkdir({str(marker)!r})))"

    def edit(program: Any) -> None:
        node = _first_expression(program)
        node["expr_str"] = code.format(node["expr_str"])

    changes = {"models/model.json": _edit_json(good, "models/model.json", edit)}
    return changes, lambda bad: sympy.sympify(code.format("Symbol('s0', integer=True)"))


def _guard(good: Path, marker: Path) -> tuple[dict[str, bytes], Callable[[Path], Any]]:
    def edit(program: Any) -> None:
        program["guards_code"] = [f"__import__('os').mkdir({str(marker)!r}) is None"]

    def control(bad: Path) -> Any:
        return torch.export.load(bad).module()(torch.zeros(2, 1, 15, 15))

    return {"models/model.json": _edit_json(good, "models/model.json", edit)}, control


CASES = {
    "sample inputs": (_sample_inputs, "sample inputs"),
    "pickled weight": (_pickled_weight, "stored as a pickle"),
    "pickled constant": (_pickled_constant, "stored as a pickle"),
    "opaque object": (_opaque_object, "pickled Python object"),
    "legacy weights": (_legacy_weights, "holds a pickle"),
    "symbolic shape": (_symbolic_shape, "symbolic shape that is not a plain expression"),
    "guard": (_guard, "guard that is not a plain size check"),
}


def _malicious(good: Path, folder: Path, case: str) -> tuple[Path, Path, Callable[[Path], Any]]:
    marker = folder / f"ran-{case.replace(' ', '-')}"
    changes, control = CASES[case][0](good, marker)
    return _rewrite(good, folder / "model.pt2", changes), marker, control


def test_a_rewritten_clean_archive_still_loads(good: Path, tmp_path: Path) -> None:
    """The rewriting itself is harmless: the refusals below come from the payloads."""
    copy = _rewrite(good, tmp_path / "copy.pt2", {})
    x = torch.rand(2, 1, 15, 15)
    torch.testing.assert_close(load_classifier(copy).module(x), load_classifier(good).module(x))


@pytest.mark.parametrize("case", list(CASES))
def test_payloads_are_refused_and_never_run(good: Path, tmp_path: Path, case: str) -> None:
    bad, marker, control = _malicious(good, tmp_path, case)
    with pytest.raises(ModelFileError) as info:
        load_classifier(bad)
    message = str(info.value)
    assert CASES[case][1] in message and REEXPORT in message and "\n" not in message
    assert not marker.exists()
    # Positive control: the unsafe load of the same bytes runs the payload.
    try:
        control(bad)
    except Exception:
        pass  # some payloads break the program after having run
    assert marker.exists()


def test_graph_targets_other_than_torch_operators_are_refused(good: Path, tmp_path: Path) -> None:
    def edit(program: Any) -> None:
        program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"

    graph = _edit_json(good, "models/model.json", edit)
    bad = _rewrite(good, tmp_path / "m.pt2", {"models/model.json": graph})
    with pytest.raises(ModelFileError, match=r"calls 'torch\.os\.system', which is not a torch"):
        load_classifier(bad)


def test_entries_readers_may_disagree_on_or_torch_does_not_write_are_refused(
    good: Path, tmp_path: Path
) -> None:
    root, entries = _entries(good)
    twice = _rewrite(good, tmp_path / "twice.pt2", {})
    with zipfile.ZipFile(twice, "a") as archive:  # the same name to torch's reader (miniz)
        archive.writestr(f"{root}/Models/model.json", entries["models/model.json"])
    with pytest.raises(ModelFileError, match=r"Models/model\.json' appears twice"):
        load_classifier(twice)
    compiled = _rewrite(good, tmp_path / "aoti.pt2", {"data/aotinductor/model/m.so": b"ELF"})
    with pytest.raises(ModelFileError, match=r"compiled AOTInductor code \(data/aotinductor"):
        load_classifier(compiled)
    scripted = tmp_path / "scripted.pt2"
    with zipfile.ZipFile(scripted, "w") as archive:
        archive.writestr("scripted/code/__torch__.py", b"def forward(self): pass")
        archive.writestr("scripted/data.pkl", b"")
    with pytest.raises(ModelFileError, match=r"scripted\.pt2 is a TorchScript archive"):
        load_classifier(scripted)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image.npy"
    np.save(path, np.random.rand(40, 40).astype(np.float32))
    return path


def _cli_commands(model: Path, image: Path, folder: Path) -> dict[str, list[str]]:
    return {
        "explain": ["explain", str(model)],
        "predict": ["predict", str(model), str(image), "-o", str(folder / "out.zarr")],
        "compare": ["compare", str(model), str(image)],
        "frontier": ["frontier", str(model), str(image), "--plot", str(folder / "f.png")],
    }


@pytest.mark.parametrize("command", ["explain", "predict", "compare", "frontier"])
def test_every_cli_command_refuses_in_one_line(
    good: Path, tmp_path: Path, image: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad, marker, _ = _malicious(good, tmp_path, "sample inputs")
    argv = _cli_commands(bad, image, tmp_path)[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("napari-dense: error: model.pt2 is refused: the sample inputs")
    assert REEXPORT in err and "\n" not in err
    assert not marker.exists() and not (tmp_path / "out.zarr").exists()


def test_the_reader_and_a_drop_on_the_viewer_run_nothing(
    good: Path, tmp_path: Path, make_napari_viewer: Any
) -> None:
    bad, marker, _ = _malicious(good, tmp_path, "sample inputs")
    reader = _reader.get_reader(str(bad))
    assert reader is not None and reader(str(bad)) == [(None,)]  # no viewer: nothing loaded
    viewer = make_napari_viewer()
    viewer.open(str(bad), plugin="napari-dense")
    assert not marker.exists() and len(viewer.layers) == 0
    from napari_dense._napari.widget import dense_widget_of

    assert dense_widget_of(viewer)._loaded is None  # the refused model was not loaded


def test_flipped_bytes_are_refused(good: Path, tmp_path: Path) -> None:
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("weights/weight_7"))
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_length + extra_length  # the local header's lengths
    data[start + 3] ^= 0x40  # an exponent bit of the last bias: zip structure intact
    flipped = tmp_path / "flipped.pt2"
    flipped.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"weight_7' is damaged .*copy it again"):
        load_classifier(flipped)
    # Control: torch alone loads it and computes with the altered weight.
    x = torch.rand(2, 1, 15, 15)
    altered = torch.export.load(flipped).module()(x)
    assert not torch.allclose(altered, load_classifier(good).module(x))


def _with_declared_size(path: Path, name: str, size: int) -> None:
    """Patch the uncompressed size a zip declares for ``name`` (local and central headers)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    struct.pack_into("<I", data, info.header_offset + 22, size)
    patched = 0
    position = data.find(b"PK\x01\x02")
    while position >= 0:  # central directory records
        length = struct.unpack_from("<H", data, position + 28)[0]
        if data[position + 46 : position + 46 + length] == name.encode():
            struct.pack_into("<I", data, position + 24, size)
            patched += 1
        position = data.find(b"PK\x01\x02", position + 4)
    assert patched == 1
    path.write_bytes(bytes(data))


def test_zip_bombs_are_refused_with_the_limit_and_how_to_raise_it(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = _entries(good)
    bomb = _rewrite(good, tmp_path / "bomb.pt2", {})
    with zipfile.ZipFile(bomb, "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{root}/extra/bomb.txt", b" " * (1 << 20))
    _with_declared_size(bomb, f"{root}/extra/bomb.txt", 3 << 30)  # 3 GiB from a 1 kB entry
    assert bomb.stat().st_size < 300_000
    with pytest.raises(ModelFileError) as info:
        load_classifier(bomb)
    message = str(info.value)
    assert "more than the limit of 2,147,483,648 bytes" in message and "\n" not in message
    assert "max_archive_bytes=N" in message and "NAPARI_DENSE_MAX_MODEL_BYTES=N" in message
    # A real 64 MiB of spaces in 64 kB: refused under a lower limit, loaded when raised.
    real = _rewrite(good, tmp_path / "big.pt2", {})
    with zipfile.ZipFile(real, "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{root}/extra/bomb.txt", b" " * (64 << 20))
    monkeypatch.setenv("NAPARI_DENSE_MAX_MODEL_BYTES", str(32 << 20))
    with pytest.raises(ModelFileError, match=r"declare 67,\d{3},\d{3} bytes, more than the limit"):
        load_classifier(real)
    assert load_classifier(real, max_archive_bytes=128 << 20).metadata.patch_size == (15, 15)


NET_PY = textwrap.dedent(
    """
    import os
    from torch import nn

    os.mkdir({marker!r})  # stands for any code


    class PatchNet(nn.Sequential):
        def __init__(self):
            super().__init__(
                nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 128, 2), nn.ReLU(), nn.Conv2d(128, 3, 1),
            )
    """
)


def _python_model(folder: Path, code_folder: Path | None = None) -> tuple[Path, Path, Path]:
    """A sidecar naming a Python file whose import creates a marker; (sidecar, code, marker)."""
    marker = folder / "code-ran"
    code = (code_folder or folder) / "net.py"
    for directory in (folder, code.parent):
        directory.mkdir(parents=True, exist_ok=True)
    code.write_text(NET_PY.format(marker=str(marker)), "utf-8")
    torch.save(fdfe15(num_classes=3).state_dict(), folder / "net.pth")
    named = str(code) if code_folder else "net.py"
    sidecar = folder / "model.yaml"
    sidecar.write_text(
        f"python_file: {named}\nclass_name: PatchNet\nweights: net.pth\npatch_size: 15\n"
        "class_names: [a, b, c]\n",
        "utf-8",
    )
    return sidecar, code, marker


def test_python_files_need_the_opt_in(tmp_path: Path) -> None:
    sidecar, code, marker = _python_model(tmp_path)
    for call in (
        lambda: load_classifier(sidecar),
        lambda: load_classifier(code, class_name="PatchNet", weights=tmp_path / "net.pth"),
    ):
        with pytest.raises(CodeExecutionRefused) as info:
            call()
        assert info.value.path == code.resolve()
        message = str(info.value)
        assert "trust_code=True" in message and "--trust-code" in message and "\n" not in message
        assert str(tmp_path) in message and not marker.exists()
    assert info.value.sidecar is None
    loaded = load_classifier(sidecar, trust_code=True)
    assert marker.exists() and loaded.metadata.patch_size == (15, 15)


def test_python_files_outside_the_sidecar_folder_say_so(tmp_path: Path) -> None:
    sidecar, code, marker = _python_model(tmp_path / "model", tmp_path / "elsewhere")
    with pytest.raises(CodeExecutionRefused, match="from outside the sidecar's folder") as info:
        load_classifier(sidecar)
    assert info.value.path == code.resolve() and info.value.sidecar == sidecar
    assert not marker.exists()


def test_cli_python_model_needs_trust_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sidecar, _, marker = _python_model(tmp_path)
    assert main(["explain", str(sidecar)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pass trust_code=True" in err and "--trust-code" in err and "\n" not in err
    assert not marker.exists()
    assert main(["explain", str(sidecar), "--trust-code"]) == 0 and marker.exists()


def test_a_python_sidecar_dropped_on_napari_runs_nothing_unasked(
    tmp_path: Path, make_napari_viewer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The widget asks (``confirm_code_execution``, answered "no" here): no code runs."""
    from napari_dense._napari import output_dialog as _output_dialog
    from napari_dense._napari import widget as _widget

    sidecar, code, marker = _python_model(tmp_path)
    asked: list[Path] = []
    monkeypatch.setattr(
        _output_dialog, "confirm_code_execution", lambda path, _: asked.append(path)
    )
    viewer = make_napari_viewer()
    viewer.open(str(sidecar), plugin="napari-dense")
    assert not marker.exists() and _widget.dense_widget_of(viewer)._loaded is None
    assert asked == [code.resolve()]


@pytest.mark.parametrize("content", ["state dict", "pickled payload"])
def test_a_pt2_that_is_a_pickle_is_never_unpickled(tmp_path: Path, content: str) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt2"
    value = fdfe15().state_dict() if content == "state dict" else {"w": _Payload(marker)}
    torch.save(value, path)
    # Even with a sidecar naming a Python class (which would make it the class's weights).
    _python_model(tmp_path)
    (tmp_path / "model.yaml").write_text(
        "model_file: model.pt2\npython_file: net.py\nclass_name: PatchNet\n", "utf-8"
    )
    for given in (path, tmp_path / "model.yaml"):
        with pytest.raises(ModelFileError, match=r"model\.pt2 is named \.pt2 but is a torch\.save"):
            load_classifier(given, trust_code=True)
    assert not marker.exists() and not (tmp_path / "code-ran").exists()
    if content == "pickled payload":  # control
        torch.load(path, weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_the_pickle_scan_sees_the_payload_in_every_protocol(tmp_path: Path, protocol: int) -> None:
    """Sample inputs are read from their opcodes: a payload's import is seen, never run."""
    from napari_dense.model_files.pickle_scan import TENSOR_PICKLE_GLOBALS, pickle_globals

    marker = tmp_path / "ran"
    value = ((torch.zeros(2),), {"p": _Payload(marker)})
    names = pickle_globals(pickle.dumps(value, protocol=protocol))
    assert names is None or f"{os.mkdir.__module__}.mkdir" in names
    # torch.save's own pickle of tensors names only the allowed globals.
    buffer = io.BytesIO()
    torch.save(((torch.zeros(2), torch.ones(1, dtype=torch.int64)), {}), buffer)
    with zipfile.ZipFile(buffer) as inner:
        data = inner.read(next(n for n in inner.namelist() if n.endswith("/data.pkl")))
    assert set(pickle_globals(data) or ["unreadable"]) <= TENSOR_PICKLE_GLOBALS
    assert not marker.exists()
