"""The sidecar schema: pydantic models, their JSON Schema as shipped, one-line errors."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import yaml

from napari_dense.errors import NapariDenseError
from napari_dense.model_files import ModelFileError, ModelMetadata, sidecar_schema
from napari_dense.model_files.sidecar import read_sidecar

jsonschema = pytest.importorskip("jsonschema")

DEMO_MODELS = Path(__file__).resolve().parents[1] / "napari_dense" / "demo" / "models"


def _shipped_schema() -> dict[str, Any]:
    text = (files("napari_dense.model_files") / "sidecar.schema.json").read_text("utf-8")
    return dict(json.loads(text))


def _validator() -> Any:
    schema = _shipped_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_shipped_schema_is_the_models_schema() -> None:
    assert _shipped_schema() == sidecar_schema(), (
        "sidecar.schema.json is stale: python -c 'from napari_dense.model_files.sidecar "
        "import write_schema; write_schema()'"
    )


def test_the_demo_sidecars_validate_against_the_shipped_schema() -> None:
    sidecars = sorted(DEMO_MODELS.glob("*.yaml"))
    assert [p.name for p in sidecars] == ["ihc_patchnet.yaml", "ihc_selecsls.yaml"]
    validator = _validator()
    for path in sidecars:
        data = yaml.safe_load(path.read_text("utf-8"))
        assert list(validator.iter_errors(data)) == [], path.name
        assert read_sidecar(path)["patch_size"] == (24, 24)


GOOD = [
    {"patch_size": 24},
    {"patch_size": [24]},
    {"patch_size": [24, 32], "in_channels": 3, "class_names": ["a", "b"]},
    {"normalisation": {"mean": 0.5, "std": 0.25}},
    {"normalisation": {"scale": 0.00392156862745098, "mean": [0.1, 0.2], "std": [1, 2]}},
    {"accuracy": 0.93},
    {"accuracy": {"held_out": 0.93, "recall_tumour": 0.9}},
    {"format_version": 1, "python_file": "net.py", "class_name": "Net", "init_args": [3]},
    {"model_file": "m.pt2", "activation": "sigmoid", "name": "n", "training_command": "t"},
]


@pytest.mark.parametrize("data", GOOD, ids=[", ".join(d) for d in GOOD])
def test_good_sidecars_pass_both_the_json_schema_and_the_loader(
    data: dict[str, Any], tmp_path: Path
) -> None:
    assert list(_validator().iter_errors(data)) == []
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data), "utf-8")
    assert set(read_sidecar(path)) == set(data)


BAD = [
    ({"patch_size": [15, 15, 3]}, "patch_size must be a positive whole number (square patches)"),
    ({"patch_size": 0}, "patch_size must be a positive whole number"),
    ({"patch_size": 24.5}, "patch_size must be a positive whole number (square patches) or [heig"),
    ({"in_channels": "two"}, "in_channels must be a positive whole number (the image channels"),
    ({"activation": "relu"}, "activation must be one of softmax, sigmoid, none"),
    ({"class_names": "abc"}, "class_names must be a list of names, one per output class"),
    ({"normalisation": {"std": -1}}, "normalisation std must be a positive number or one per"),
    ({"normalisation": {"mean": []}}, "normalisation mean must be a number or one per channel"),
    ({"normalisation": {"sd": 1}}, "unknown field(s) ['sd'] in normalisation; known: mean, "),
    ({"normalisation": [0.5]}, "normalisation must be a mapping {scale, mean, std}"),
    ({"accuracy": "high"}, "accuracy must be a number or named numbers"),
    ({"init_args": 3}, "init_args must be the class's keyword arguments (a mapping) or"),
    ({"pach_size": 15}, "unknown field(s) ['pach_size']; known: accuracy, activation, "),
]


@pytest.mark.parametrize(("data", "expected"), BAD, ids=[e for _, e in BAD])
def test_bad_sidecars_fail_both_and_the_loader_names_the_field_and_the_fix(
    data: dict[str, Any], expected: str, tmp_path: Path
) -> None:
    assert list(_validator().iter_errors(data)) != []
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data), "utf-8")
    with pytest.raises(ModelFileError) as info:
        read_sidecar(path)
    message = str(info.value)
    assert message.startswith(expected) and message.endswith(" (in m.yaml)")
    assert "\n" not in message and "pydantic" not in message


def test_the_python_constructor_raises_one_line_naming_the_fix() -> None:
    with pytest.raises(NapariDenseError, match=r"^activation must be one of softmax, sigmoid, "):
        ModelMetadata(activation="relu")  # type: ignore[arg-type]
    with pytest.raises(ModelFileError) as info:
        ModelMetadata(patch_size="big", in_channels=0, accuracy="a")  # type: ignore[arg-type]
    assert str(info.value) == (
        "patch_size must be a positive whole number (square patches) or [height, width], got "
        "'big' (and 2 more fields to fix)"
    )
    with pytest.raises(ModelFileError, match=r"^normalisation mean has 2 values for a 3-channel"):
        ModelMetadata(in_channels=3, normalisation={"mean": [0.1, 0.2]})
    with pytest.raises(ModelFileError, match=r"^normalisation scale must be a finite non-zero"):
        ModelMetadata(normalisation={"scale": 0})
    # replace() validates again, as the constructor does.
    one_channel = ModelMetadata(normalisation={"mean": [0.1, 0.2]})
    with pytest.raises(ModelFileError, match=r"mean has 2 values for a 1-channel model"):
        one_channel.replace(in_channels=1)


def test_values_are_normalised_and_round_trip_as_plain_data() -> None:
    import numpy as np

    metadata = ModelMetadata.from_dict(
        {
            "patch_size": np.int64(24),
            "in_channels": 3,
            "class_names": ["a", 2, "c"],
            "normalization": {"mean": 0.5},  # the other spelling
            "activation": "Softmax",
            "name": None,  # not given
            "accuracy": {"held_out": 1},
        }
    )
    assert metadata.patch_size == (24, 24) and metadata.class_names == ["a", "2", "c"]
    assert metadata.normalisation == {"scale": 1.0, "mean": [0.5], "std": [1.0]}
    assert metadata.activation == "softmax" and metadata.name == ""
    assert metadata.accuracy == {"held_out": 1.0}
    plain = metadata.as_dict()
    assert plain["patch_size"] == [24, 24] and json.loads(json.dumps(plain)) == plain
    assert ModelMetadata.from_dict(plain) == metadata
    for refused in (True, 24.0, "24"):
        with pytest.raises(ModelFileError, match="patch_size must be"):
            ModelMetadata(patch_size=refused)  # type: ignore[arg-type]
