"""The command line: tables, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from napari_dense.cli import main


def test_explain_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "15x15"]) == 0
    out = capsys.readouterr().out
    assert "| 2 | MaxPool2d | 2x2 | 2x2 | all |" in out and "exact" in out


@pytest.mark.parametrize("option", ["--mode", "--sampling"])  # one option, two spellings
def test_explain_custom_sampling_as_json(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "15x15", option, "2=advanced", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [layer["sampling"] for layer in plan["layers"]] == ["all", "none"]
    assert plan["output_stride"] == [2, 2]


def test_errors_are_one_line_with_exit_status_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "napari_dense.cli", "explain", "15x15", "--sampling", "9=all"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("napari-dense: error: sampling names unknown layer(s)")


def test_unknown_network_names_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "7x7"]) == 2
    err = capsys.readouterr().err
    assert "model file not found: 7x7" in err and "built-in network (15x15, 32x32, 64x64)" in err


def test_debug_shows_the_traceback() -> None:
    with pytest.raises(ValueError, match="unknown layer"):
        main(["--debug", "explain", "15x15", "--sampling", "9=all"])


def test_headless_demo_writes_map_preview_and_table(tmp_path, capsys) -> None:
    assert main(["demo", "--headless", "--output", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "demo_output.zarr").is_dir() and (tmp_path / "demo_overlay.png").is_file()
    table = (tmp_path / "demo_compare.md").read_text()
    assert "| simple |" in table and "| advanced |" in table and "Held-out accuracy" in table
    exact, padded = table.split("## padded model")
    exact_dev = float(exact.split("max abs Δ = ")[1].split()[0])
    padded_dev = float(padded.split("max abs Δ = ")[1].split()[0])
    assert exact_dev < 1e-4 < padded_dev  # the padded model's measured deviation is reported
    assert "probability map:" in out
    # A second run refuses to overwrite without being asked.
    assert main(["demo", "--headless", "--output", str(tmp_path)]) == 2


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "napari_dense.cli", *args], capture_output=True,
                          text=True)  # fmt: skip


def _one_line_error(
    result: subprocess.CompletedProcess[str], *fragments: str, status: int = 2
) -> None:
    assert result.returncode == status, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_predict_bad_inputs_are_one_line_errors(tmp_path) -> None:
    import numpy as np
    from torch import nn

    from napari_dense import ModelMetadata, save_classifier

    grey, rgb = tmp_path / "grey.npy", tmp_path / "rgb.npy"
    np.save(grey, np.zeros((40, 40), np.float32))
    np.save(rgb, np.zeros((40, 40, 3), np.float32))
    np.save(tmp_path / "tiny.npy", np.zeros((3, 3), np.float32))
    unsupported = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Upsample(scale_factor=0.5), nn.Flatten())
    save_classifier(unsupported, tmp_path / "odd.pt2",
                    metadata=ModelMetadata(patch_size=(6, 6), in_channels=1))  # fmt: skip
    out = str(tmp_path / "map.zarr")
    _one_line_error(_run_cli("predict", "15x15", str(tmp_path / "missing.tif"), "-o", out),
                    "image file not found")  # fmt: skip
    _one_line_error(
        _run_cli("predict", "missing.pt2", str(grey), "-o", out), "model file not found"
    )
    _one_line_error(_run_cli("predict", "32x32", str(grey), "-o", out), "expects 3 channel")
    _one_line_error(_run_cli("predict", str(tmp_path / "odd.pt2"), str(grey), "-o", out),
                    "cannot densify")  # fmt: skip
    (tmp_path / "file").write_text("x")
    # A run that fails (here: the output cannot be created) exits with 1, bad input with 2.
    _one_line_error(
        _run_cli("predict", "15x15", str(grey), "-o", str(tmp_path / "file" / "m.zarr")),
        "choose a writable output path",
        status=1,
    )
    # An image smaller than the patch is reflected at its borders: it works.
    small = _run_cli("predict", "15x15", str(tmp_path / "tiny.npy"), "-o", out, "--quiet")
    assert small.returncode == 0, small.stderr
    _one_line_error(_run_cli("predict", "15x15", str(grey), "-o", out), "exists", "--overwrite")


def test_frontier_prints_table_and_pick_and_writes_the_plot(tmp_path, capsys) -> None:
    import numpy as np

    image = tmp_path / "grey.npy"
    np.save(image, np.random.default_rng(0).random((40, 48), dtype=np.float32))
    plot = tmp_path / "frontier.png"
    args = ["frontier", "15x15", str(image), "--region", "0:32,0:40", "--plot", str(plot),
            "--repeats", "1", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| A A |" in out and "| N N |" in out and "on 32x40 px" in out
    assert "picked for class_change <= 0.01:" in out and "x faster" in out
    assert plot.read_bytes().startswith(b"\x89PNG")
    # The plot is not overwritten without being asked, and nothing is measured first.
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err and "--overwrite" in err
    assert main([*args, "--overwrite", "--metric", "mean_abs_diff", "--budget", "0"]) == 0
    assert "picked for mean_abs_diff <= 0: A A" in capsys.readouterr().out


def test_version_and_help_show_examples_and_defaults(capsys) -> None:
    from napari_dense import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"napari-dense {__version__}"
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "--resume   # after Ctrl-C" in text
    assert "(default: reflect)" in text and "(default: None)" not in text
    for command in ("explain", "compare", "frontier", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "examples:" in capsys.readouterr().out


def test_predict_takes_every_run_option_it_documents(tmp_path) -> None:
    import numpy as np

    from napari_dense import ModelMetadata, save_classifier
    from napari_dense.evaluate.models import fdfe15
    from napari_dense.io.store import ProbabilityStore

    model = tmp_path / "two.pt2"
    save_classifier(fdfe15(num_classes=2).eval(), model,
                    metadata=ModelMetadata(patch_size=(15, 15), in_channels=1))  # fmt: skip
    image = tmp_path / "grey.npy"
    np.save(image, np.random.default_rng(0).random((40, 40), dtype=np.float32))
    out = tmp_path / "map.zarr"
    args = ["predict", str(model), str(image), "-o", str(out), "--quiet", "--mode", "2=all"]
    args += ["--interpolation", "nearest", "--memory-budget", "64MiB", "--class-names", "a, b"]
    assert main(args) == 0
    store = ProbabilityStore.open(out)
    assert store.class_names == ["a", "b"] and store.is_complete()
    assert store.attributes["interpolation"] == "nearest"
    assert store.attributes["sampling"] == {"2": "all", "5": "none"}
    # A size it cannot read is a usage error (exit 2) naming the accepted form.
    result = _run_cli("predict", "15x15", str(image), "-o", str(tmp_path / "m.zarr"),
                      "--memory-budget", "lots")  # fmt: skip
    assert result.returncode == 2 and "2GiB or 512MiB" in result.stderr
