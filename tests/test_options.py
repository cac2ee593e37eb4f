"""One run configuration (RunOptions), one activation table, one normalisation, one
channel-axis rule."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

import napari_dense as nd
from napari_dense.cli import _run_options, build_parser
from napari_dense.convert import upsample
from napari_dense.evaluate.models import fdfe15, patchnet32
from napari_dense.evaluate.reference import patchwise
from napari_dense.io import image as image_module
from napari_dense.io import sources
from napari_dense.io.image import as_batch, normalise
from napari_dense.model_files import ACTIVATIONS as SIDECAR_ACTIVATIONS
from napari_dense.model_files import ModelMetadata
from napari_dense.run import options as options_module
from napari_dense.run.engine import iter_predict
from napari_dense.run.options import RunOptions

PACKAGE = Path(nd.__file__).parent
NORM = {"scale": 1 / 255, "mean": [0.5], "std": [0.25]}


def _assemble(results, shape) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    for result in results:
        y0, y1, x0, x1 = result.tile.box
        out[:, y0:y1, x0:x1] = result.probabilities
    return out


# -- RunOptions ---------------------------------------------------------------------------------


def test_keywords_and_options_are_the_same_run() -> None:
    image = np.random.default_rng(0).random((40, 36), dtype=np.float32)
    model = fdfe15()
    by_keywords = nd.predict(image, model, 15, mode="simple", border="edge", device="cpu")
    options = RunOptions(mode="simple", border="edge", device="cpu")
    by_options = nd.predict(image, model, 15, options=options)
    np.testing.assert_array_equal(by_keywords, by_options)
    # Keywords win over options; the result is that of the keyword's value.
    mixed = nd.predict(image, model, 15, options=options, mode="advanced")
    np.testing.assert_array_equal(mixed, nd.predict(image, model, 15, border="edge"))
    assert not np.array_equal(mixed, by_options)


def test_merge_overrides_and_keeps_the_rest() -> None:
    base = RunOptions(tile=64, device="cpu")
    merged = RunOptions.merge(base, precision="float32", output_dtype="uint8")
    assert (merged.tile, merged.device, merged.precision, merged.dtype) == (
        64,
        "cpu",
        "float32",
        "uint8",
    )
    assert base.precision == "auto"  # frozen: merge makes a new one
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.tile = 32  # type: ignore[misc]


def test_an_unknown_keyword_names_the_options_that_exist() -> None:
    names = r"run options are mode, channel_axis, level, device.*compile"
    with pytest.raises(nd.InputError, match=r"predict\(\) got unknown option\(s\) tyle; " + names):
        nd.predict(np.zeros((20, 20)), fdfe15(), 15, tyle=64)
    with pytest.raises(nd.InputError, match="unknown option"):
        next(iter_predict(np.zeros((20, 20)), fdfe15(), 15, normalization=NORM))


def test_an_option_a_function_does_not_use_is_refused_by_name() -> None:
    with pytest.raises(nd.InputError, match=r"predict\(\) does not use precision, tile; its run"):
        nd.predict(np.zeros((20, 20)), fdfe15(), 15, tile=64, precision="float32")
    with pytest.raises(nd.InputError, match=r"frontier\(\) does not use mode"):
        nd.frontier(fdfe15(), np.zeros((20, 20)), 15, options=RunOptions(mode="simple"))


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("mode", "fast", "mode must be 'advanced', 'checkered', 'simple'"),
        ("channel_axis", 1.5, "channel_axis must be a whole number"),
        ("level", -1, "level must be a whole number >= 0"),
        ("device", "gpu0", "unknown device 'gpu0'; use 'auto', 'cpu'"),
        ("precision", "int8", "precision must be one of"),
        ("border", "wrap", "border must be one of"),
        ("interpolation", "cubic", "interpolation must be 'bilinear' or 'nearest'"),
        ("tile", 8, "tile sides must be whole numbers of at least 16 px"),
        ("tile", (64, 64, 64), "tile sides must be"),
        ("memory_budget", 0, "memory_budget must be a number of bytes > 0"),
        ("normalisation", {"scale": 0}, "normalisation scale must be a finite non-zero"),
        ("normalisation", {"mena": [0.5]}, "mena"),
        ("activation", "relu", "activation must be 'softmax', 'sigmoid' or None"),
        ("class_names", "tumour", "class_names must be a list of names"),
        ("dtype", "int16", "dtype must be one of float32, float16, uint8"),
        ("non_finite", "ignore", "non_finite must be one of"),
        ("compile", "fastest", "compile must be True, False or a torch.compile mode"),
    ],
)
def test_every_option_is_checked_in_one_line_naming_it(name, value, message) -> None:
    with pytest.raises(nd.InputError, match=message) as raised:
        RunOptions(**{name: value})
    assert "\n" not in str(raised.value)
    with pytest.raises(nd.InputError, match=message):
        RunOptions.merge(None, **{name: value})  # the keyword path checks the same way


def test_every_option_has_a_check_and_canonical_values() -> None:
    names = [f.name for f in dataclasses.fields(RunOptions)]
    assert set(options_module._CHECKS) == set(names)
    checked = RunOptions(tile=np.int64(64), class_names=["a", "b"], mode={"2": "all"})
    assert checked.tile == 64 and type(checked.tile) is int
    assert checked.class_names == ("a", "b")
    assert checked.mode_name == "custom" and RunOptions().mode_name == "advanced"
    assert RunOptions(tile=[32, 48]).tile == (32, 48)


def test_options_is_exported_and_refuses_other_types() -> None:
    assert "RunOptions" in nd.__all__ and nd.RunOptions is RunOptions
    with pytest.raises(nd.InputError, match=r"options must be a napari_dense\.RunOptions"):
        nd.predict(np.zeros((20, 20)), fdfe15(), 15, options={"mode": "simple"})


def test_the_cli_builds_one_run_options_from_its_arguments() -> None:
    parser = build_parser()
    flags = ["--precision", "float32", "--dtype", "uint8", "--non-finite", "zero", "--compile"]
    args = parser.parse_args(
        [
            "predict",
            "15x15",
            "image.npy",
            "-o",
            "map.zarr",
            "--tile",
            "64",
            "--mode",
            "2=none",
            *flags,
        ]
    )
    options = _run_options(args)
    assert options == RunOptions(
        mode={"2": "none"},
        tile=64,
        precision="float32",
        dtype="uint8",
        non_finite="zero",
        compile=True,
    )
    compare = parser.parse_args(["compare", "15x15", "image.npy", "--device", "cpu"])
    assert _run_options(compare, activation="softmax") == RunOptions(
        device="cpu", activation="softmax"
    )


# -- one activation table ------------------------------------------------------------------------


def test_one_activation_table_for_sidecar_engine_and_frontier() -> None:
    table = upsample.ACTIVATIONS
    assert SIDECAR_ACTIVATIONS is table
    assert options_module.ACTIVATIONS is table
    assert get_args(ModelMetadata.model_fields["activation"].annotation) == table
    for name in table:  # every name is accepted everywhere
        assert ModelMetadata(activation=name).activation == name
        assert RunOptions(activation=name).activation == name
        assert upsample.check_activation(name) == name
    schema = ModelMetadata.model_json_schema()["properties"]["activation"]
    assert tuple(schema.get("enum", ())) == table or str(list(table)) in str(schema)


def _string_collections(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            values = {e.value for e in node.elts if isinstance(e, ast.Constant)}
            yield node, values


def test_no_second_activation_table_in_the_package() -> None:
    """A literal collection naming both softmax and sigmoid is a second table, except the one
    in convert/upsample.py."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node, values in _string_collections(ast.parse(path.read_text())):
            if {"softmax", "sigmoid"} <= values:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert found == ["convert/upsample.py:" + str(_table_line())], found


def _table_line() -> int:
    source = (PACKAGE / "convert" / "upsample.py").read_text()
    return next(
        n for n, line in enumerate(source.splitlines(), 1) if "Activation = Literal[" in line
    )


# -- one normalisation ---------------------------------------------------------------------------


def test_one_normalisation_in_engine_predict_and_the_oracle() -> None:
    model = fdfe15()
    image = np.random.default_rng(2).integers(0, 256, (44, 40)).astype(np.uint8)
    normalised = normalise(as_batch(image, channel_axis=None, channels=1)[0], NORM)
    expected = (image.astype(np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(normalised[0], expected, rtol=1e-6, atol=1e-6)
    oracle = patchwise(normalised, model, 15, channel_axis=0)
    in_memory = nd.predict(image, model, 15, normalisation=NORM, device="cpu")
    tiled = _assemble(
        iter_predict(image, model, 15, normalisation=NORM, tile=16, device="cpu"), oracle.shape
    )
    np.testing.assert_allclose(in_memory, oracle, atol=1e-5, rtol=0)
    np.testing.assert_allclose(tiled, oracle, atol=1e-5, rtol=0)


def test_a_normalisation_that_does_not_fit_the_channels_is_refused() -> None:
    with pytest.raises(nd.InputError, match="normalisation mean/std must have 1 or 3 values"):
        nd.predict(np.zeros((3, 40, 40)), patchnet32(), 32, normalisation={"mean": [0, 0]})


# -- one channel-axis rule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "channels", "axis"),
    [
        ((20, 24, 3), 3, 2),
        ((3, 20, 24), 3, 0),
        ((20, 24, 1), 1, 2),
        ((1, 20, 24), 1, None),
        ((20, 24, 3), None, 2),
        ((6, 20, 24), None, 0),
    ],
)
def test_one_channel_axis_rule_for_arrays_and_files(shape, channels, axis) -> None:
    assert sources.guess_channel_axis is image_module.guess_channel_axis
    assert image_module.guess_channel_axis(shape, channels) == axis
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    lazy = sources.open_image(array, channels=channels).array.compute()
    batch = as_batch(array, channel_axis=None, channels=channels)
    np.testing.assert_array_equal(lazy.reshape(batch.shape[1:]), batch[0])


def test_no_channel_axis_of_the_model_size_names_the_fix() -> None:
    for shape in ((5, 20, 20), (20, 20, 5)):
        with pytest.raises(nd.InputError, match=r"expects 3 channel.*channel_axis"):
            image_module.guess_channel_axis(shape, 3)
