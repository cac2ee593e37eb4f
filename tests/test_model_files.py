"""Model files: .pt2 with metadata, sidecars, Python classes with weights, and clear refusals."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ATOL
from torch import nn
from torch.export import ExportedProgram

import napari_dense as nd
from napari_dense.convert import ExportedModule
from napari_dense.evaluate.models import fdfe15
from napari_dense.evaluate.reference import patchwise
from napari_dense.model_files import (
    LoadedClassifier,
    ModelFileError,
    ModelMetadata,
    load_classifier,
    save_classifier,
)

NET_PY = textwrap.dedent(
    """
    from torch import nn


    class PatchNet(nn.Sequential):
        '''fdfe15's layers: its state dict fits.'''

        def __init__(self, num_classes=3):
            super().__init__(
                nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 128, 2), nn.ReLU(), nn.Conv2d(128, num_classes, 1),
            )


    class TinyNet(nn.Sequential):
        '''Accepts only 6x6 patches (no pooling, a Linear head) of 2 channels.'''

        def __init__(self):
            super().__init__(
                nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                nn.Linear(4 * 2 * 2, 2),
            )


    def helper():
        return 1
    """
)

METADATA = ModelMetadata(
    patch_size=(15, 15),
    class_names=["background", "nucleus", "membrane"],
    normalisation={"scale": 1 / 255, "mean": [0.5], "std": [0.25]},
    activation="softmax",
    name="fdfe",
    description="the FDFE paper's network",
    accuracy={"held_out_accuracy": 0.9},
    training_command="python train.py --epochs 2",
)


def _predict(model: object, image: np.ndarray, patch: tuple[int, int]) -> np.ndarray:
    return nd.predict(image, model, patch)  # type: ignore[arg-type]


def _write_net(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "net.py"
    path.write_text(NET_PY, encoding="utf-8")
    return path


def test_pt2_round_trip_keeps_metadata_and_predictions(tmp_path: Path) -> None:
    model = fdfe15(num_classes=3).train()
    path = save_classifier(model, tmp_path / "fdfe.pt2", metadata=METADATA)
    assert model.training  # the caller's model keeps its mode
    loaded = load_classifier(path)
    assert isinstance(loaded, LoadedClassifier) and isinstance(loaded.module, ExportedModule)
    assert isinstance(loaded.module.exported_program, ExportedProgram)
    assert loaded.metadata == METADATA.__class__(**{**METADATA.__dict__, "in_channels": 1})
    assert loaded.path == path.resolve() and loaded.sidecar is None
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    image = np.random.rand(23, 19).astype(np.float32)
    expected = _predict(model.eval(), image, (15, 15))
    np.testing.assert_allclose(
        _predict(loaded.module, image, loaded.patch_size), expected, atol=ATOL
    )
    dense = loaded.densify()
    assert dense.output_stride == (1, 1) and dense.num_classes == 3
    # Exported with a dynamic batch: the program runs on any batch size.
    program = loaded.module.exported_program
    assert program.module()(torch.zeros(3, 1, 15, 15)).shape == (3, 3, 1, 1)
    # The module serves per-patch evaluation too (the oracle switches it to eval mode and back).
    per_patch = patchwise(image, loaded.module, 15)
    np.testing.assert_allclose(per_patch, patchwise(image, model, 15), atol=ATOL)
    # Saving a loaded model again keeps program and metadata.
    again = load_classifier(
        save_classifier(loaded.module, tmp_path / "again.pt2", metadata=loaded.metadata)
    )
    assert again.metadata == loaded.metadata


def test_sidecar_overrides_embedded_fields(tmp_path: Path) -> None:
    path = save_classifier(fdfe15(num_classes=3), tmp_path / "fdfe.pt2", metadata=METADATA)
    sidecar = tmp_path / "fdfe.yaml"
    sidecar.write_text("name: renamed\nactivation: sigmoid\naccuracy: 0.5\n", encoding="utf-8")
    for given in (path, sidecar):  # the model next to its sidecar, or the sidecar itself
        loaded = load_classifier(given)
        assert loaded.sidecar == sidecar and loaded.path == path.resolve()
        meta = loaded.metadata
        assert (meta.name, meta.activation, meta.accuracy) == ("renamed", "sigmoid", 0.5)
        assert meta.class_names == METADATA.class_names  # embedded, not overridden
        assert meta.normalisation == {"scale": 1 / 255, "mean": [0.5], "std": [0.25]}


def test_save_with_sidecar_writes_a_yaml_naming_the_model(tmp_path: Path) -> None:
    save_classifier(fdfe15(num_classes=3), tmp_path / "m.pt2", metadata=METADATA, sidecar=True)
    data = yaml.safe_load((tmp_path / "m.yaml").read_text(encoding="utf-8"))
    assert data["model_file"] == "m.pt2" and data["class_names"] == METADATA.class_names
    assert load_classifier(tmp_path / "m.yaml").metadata.name == "fdfe"


def test_python_file_class_and_weights(tmp_path: Path) -> None:
    reference = fdfe15(num_classes=3).eval()
    weights = tmp_path / "fdfe.pth"
    torch.save(reference.state_dict(), weights)
    net = _write_net(tmp_path)
    # fdfe15's pooling drops odd rows: 14-17 all work, so the patch size must be given.
    with pytest.raises(ModelFileError, match=r"several patch sizes \(14, 15, 16, 17\)"):
        load_classifier(net, class_name="PatchNet", weights=weights, trust_code=True)
    (tmp_path / "net.yaml").write_text("patch_size: 15\nclass_names: [a, b, c]\n", "utf-8")
    loaded = load_classifier(net, class_name="PatchNet", weights=weights, trust_code=True)
    assert isinstance(loaded.module, nn.Module) and not loaded.module.training
    assert loaded.metadata.patch_size == (15, 15) and loaded.metadata.in_channels == 1
    assert loaded.path == weights.resolve()
    assert loaded.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    image = np.random.rand(20, 21).astype(np.float32)
    np.testing.assert_allclose(
        _predict(loaded.module, image, (15, 15)), _predict(reference, image, (15, 15)), atol=ATOL
    )


def test_yaml_naming_the_python_file_class_and_weights(tmp_path: Path) -> None:
    reference = fdfe15(num_classes=4).eval()
    _write_net(tmp_path / "code")
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    sidecar = tmp_path / "model.yaml"
    sidecar.write_text(
        "python_file: code/net.py\nclass_name: PatchNet\ninit_args: {num_classes: 4}\n"
        "weights: ckpt.pth\npatch_size: [15, 15]\nname: from yaml\n",
        encoding="utf-8",
    )
    loaded = load_classifier(
        sidecar, trust_code=True
    )  # relative paths are resolved next to the yaml
    assert loaded.metadata.name == "from yaml" and loaded.sidecar == sidecar
    x = torch.rand(1, 1, 15, 15)
    torch.testing.assert_close(loaded.module(x), reference(x))
    # The weights file itself, with a sidecar naming the class, loads the same model.
    (tmp_path / "ckpt.yaml").write_text(
        "python_file: code/net.py\nclass_name: PatchNet\ninit_args: [4]\npatch_size: 15\n", "utf-8"
    )
    torch.testing.assert_close(
        load_classifier(tmp_path / "ckpt.pth", trust_code=True).module(x), reference(x)
    )


def test_channels_and_patch_size_are_inferred(tmp_path: Path) -> None:
    net = _write_net(tmp_path)
    torch.manual_seed(0)
    tiny = load_classifier(
        net, class_name="TinyNet", weights=_tiny_weights(tmp_path), trust_code=True
    )
    assert tiny.metadata.patch_size == (6, 6) and tiny.metadata.in_channels == 2
    assert tiny.metadata.activation == "none" and tiny.metadata.normalisation is None
    # From the shape a program was exported with (rectangular here).
    program = torch.export.export(fdfe15().eval(), (torch.zeros(1, 1, 14, 16),))
    path = save_classifier(program, tmp_path / "rect.pt2")
    rect = load_classifier(path)
    assert rect.metadata.patch_size == (14, 16) and rect.metadata.in_channels == 1
    # Exported with a batch of one: the module splits larger batches.
    assert rect.module(torch.zeros(3, 1, 14, 16)).shape == (3, 113, 1, 1)


def _tiny_weights(directory: Path) -> Path:
    tiny = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2)
    )
    path = directory / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    return path


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".pt2"])
def test_torchscript_is_refused_with_the_export_recipe(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"scripted{suffix}"
    torch.jit.save(torch.jit.script(fdfe15()), path)
    with pytest.raises(ModelFileError) as info:
        load_classifier(path)
    message = str(info.value)
    assert "TorchScript" in message and "torch.export.export(model.eval()" in message
    assert "torch.export.save" in message and "\n" not in message


def test_pickled_modules_and_bare_weights_are_refused(tmp_path: Path) -> None:
    torch.save(fdfe15(), tmp_path / "whole.pth")
    with pytest.raises(ModelFileError, match=r"does not unpickle code.*torch\.export"):
        load_classifier(tmp_path / "whole.pth")
    torch.save(fdfe15().state_dict(), tmp_path / "weights.pth")
    with pytest.raises(ModelFileError, match=r"weights but no architecture.*class_name="):
        load_classifier(tmp_path / "weights.pth")


def test_missing_files_and_bad_names_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"model file not found: .*nowhere\.pt2"):
        load_classifier(tmp_path / "nowhere.pt2")
    net = _write_net(tmp_path)
    weights = _tiny_weights(tmp_path)
    with pytest.raises(ModelFileError, match=r"no class 'Nope'.*classes there: PatchNet, TinyNet$"):
        load_classifier(net, class_name="Nope", weights=weights, trust_code=True)
    with pytest.raises(ModelFileError, match="pass class_name="):
        load_classifier(net, weights=weights, trust_code=True)
    with pytest.raises(ModelFileError, match=r"model file not found: .*missing\.pth"):
        load_classifier(
            net, class_name="TinyNet", weights=tmp_path / "missing.pth", trust_code=True
        )
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ModelFileError, match=r"give a \.pt2"):
        load_classifier(tmp_path / "notes.txt")


def test_weights_that_do_not_fit_name_the_keys(tmp_path: Path) -> None:
    net = _write_net(tmp_path)
    torch.save(fdfe15(num_classes=7).state_dict(), tmp_path / "seven.pth")
    with pytest.raises(ModelFileError, match=r"shape mismatch .*8\.weight \(7, 128, 1, 1\) vs"):
        load_classifier(net, class_name="PatchNet", weights=tmp_path / "seven.pth", trust_code=True)
    state = fdfe15(num_classes=3).state_dict()
    del state["0.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(
        ModelFileError, match=r"missing keys 0\.bias; unexpected keys extra\.weight"
    ):
        load_classifier(
            net, class_name="PatchNet", weights=tmp_path / "partial.pth", trust_code=True
        )


def test_bad_metadata_is_refused_with_the_field(tmp_path: Path) -> None:
    path = save_classifier(fdfe15(num_classes=3), tmp_path / "m.pt2", metadata=METADATA)
    sidecar = tmp_path / "m.yaml"
    for text, expected in [
        (
            "pach_size: 15\n",
            r"unknown field\(s\) \['pach_size'\]; known: accuracy, .* \(in m\.yaml\)$",
        ),
        ("activation: relu\n", "activation must be one of softmax, sigmoid, none"),
        ("normalisation: {mean: [1, 2], std: 1}\n", "mean has 2 values for a 1-channel model"),
        ("class_names: [a, b]\n", "2 class_names for a model with 3 outputs"),
        ("patch_size: 16\n", "exported for 15x15"),
        ("format_version: 2\n", "format_version 2"),
        ("- a list\n", "must be a mapping"),
    ]:
        sidecar.write_text(text, encoding="utf-8")
        with pytest.raises(ModelFileError, match=expected):
            load_classifier(path)
    with pytest.raises(ModelFileError, match=r"writes \.pt2 files"):
        save_classifier(fdfe15(), tmp_path / "m.pth", metadata=METADATA)


def test_unclear_metadata_gets_a_message_naming_the_fix(tmp_path: Path) -> None:
    path = save_classifier(fdfe15(num_classes=3), tmp_path / "m.pt2", metadata=METADATA)
    sidecar = tmp_path / "m.yaml"
    accepted = r"positive whole number \(square patches\) or \[height, width\]"
    for text, expected in [
        (
            "patch_size: big\n",
            rf"^patch_size must be a {accepted}, got 'big' \(in m\.yaml\)$",
        ),
        ("patch_size: 24.5\n", rf"patch_size must be a {accepted}, got 24\.5"),
        ("patch_size: [15, 15, 3]\n", rf"patch_size must be a {accepted}, got \[15, 15, 3\]"),
        ("in_channels: two\n", r"in_channels must be a positive whole number .*got 'two'"),
        ("in_channels: 1.5\n", r"in_channels must be a positive whole number .*got 1\.5"),
        # A wrong channel count is a channel problem, not a normalisation one.
        ("in_channels: 3\nnormalisation: {mean: 0.5, std: 0.25}\n", "in_channels is 3 but"),
    ]:
        sidecar.write_text(text, encoding="utf-8")
        with pytest.raises(ModelFileError, match=expected):
            load_classifier(path)
    sidecar.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary")
    with pytest.raises(ModelFileError, match=r"^m\.yaml is not a text YAML file \(byte 0x89"):
        load_classifier(path)


def test_in_channels_of_a_python_model_is_checked_before_its_normalisation(
    tmp_path: Path,
) -> None:
    """A 1-channel network declared with 3 channels and 3 normalisation values."""
    net = _write_net(tmp_path)
    torch.save(fdfe15(num_classes=3).state_dict(), tmp_path / "net.pth")
    (tmp_path / "net.yaml").write_text(
        "patch_size: 15\nin_channels: 3\nnormalisation: {mean: [0.5, 0.5, 0.5], std: 0.2}\n",
        "utf-8",
    )
    with pytest.raises(
        ModelFileError, match=r"in_channels is 3 but the model's first Conv2d takes 1 channel"
    ):
        load_classifier(net, class_name="PatchNet", weights=tmp_path / "net.pth", trust_code=True)
    (tmp_path / "net.yaml").write_text(
        "patch_size: 15\nnormalisation: {mean: [0.5, 0.5, 0.5], std: 0.2}\n", "utf-8"
    )
    with pytest.raises(ModelFileError, match=r"mean has 3 values for a 1-channel model"):
        load_classifier(net, class_name="PatchNet", weights=tmp_path / "net.pth", trust_code=True)
