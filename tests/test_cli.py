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


def test_explain_custom_sampling_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "15x15", "--sampling", "2=advanced", "--json"]) == 0
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
