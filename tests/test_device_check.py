"""benchmarks/device_check.sh: its CPU dry run (every step, tiny sizes) and its usage errors.

The dry run exercises what the GPU run does (versions, ``pytest -m cuda`` collecting and
skipping, the engine end to end, bench_modes in two precisions, the anchor where it is beside the
checkout) so that the script cannot rot between GPU runs. ``make rehearse-device`` rehearses the
install step from a wheel folder (too slow for the test suite).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
ANCHOR = ROOT.parent / "shared" / "gpu_anchor" / "bench_anchor.py"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def check(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, **env},
    )  # fmt: skip


def test_the_dry_run_runs_every_step(tmp_path) -> None:
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    result = check("--dry-run", "--python", sys.executable, str(out), timeout=290,
                   TMPDIR=str(scratch))  # fmt: skip
    summary = (out / "summary.md").read_text()
    assert result.returncode == 0, summary + result.stderr[-2000:]
    rows = dict(re.findall(r"^\| (\w+) \| (\S+)", summary, re.MULTILINE))
    assert {k: rows.get(k) for k in ("env", "pytest", "bench_engine", "bench_modes")} == {
        "env": "0", "pytest": "0", "bench_engine": "0", "bench_modes": "0",
    }  # fmt: skip
    assert rows.get("anchor") == ("0" if ANCHOR.exists() else "skipped")
    env = json.loads((out / "env.log").read_text()[(out / "env.log").read_text().index("{") :])
    assert env["torch"] and env["gpus"] == 0 and "napari-dense" in env
    # pytest -m cuda: every CUDA test collected, each skipped on this machine.
    suite = ET.parse(out / "pytest.xml").getroot().find("testsuite")
    assert suite is not None and int(suite.get("tests")) == int(suite.get("skipped")) >= 8
    modes = json.loads((out / "bench_modes.json").read_text())
    runs = modes["nets"]["15x15"]["runs"]
    assert {(r["method"], r["precision"]) for r in runs if "median_s" in r} == {
        ("advanced", "float32"), ("advanced", "bfloat16"),
    }  # fmt: skip
    assert set(modes["nets"]["15x15"]["summaries"]) == {"float32", "bfloat16"}
    (engine,) = json.loads((out / "bench_engine.json").read_text())["runs"]
    assert engine["store_dtype"] == "uint8" and engine["precision"] == "bfloat16"
    assert engine["mpx_per_s"] > 0
    assert not list(scratch.glob("napari-dense-check.*"))  # its scratch folder is gone
    if ANCHOR.exists():
        assert json.loads((out / "anchor" / "results.json").read_text())["verify"]


def test_usage_errors_are_one_line_naming_the_fix(tmp_path) -> None:
    result = check("--bogus")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "unknown option --bogus; see --help" in result.stderr
    result = check("--wheels", str(tmp_path / "none"), str(tmp_path / "out"))
    assert result.returncode == 2 and "fill it with make rehearse-device" in result.stderr
    assert not (tmp_path / "out" / "summary.md").exists()
    # What --wheels must hold: pyproject's dependencies but torch, skimage, matplotlib.
    names = {re.split(r"[\[<>=]", dep)[0] for dep in check("--print-deps").stdout.split()}
    assert {"zarr", "dask", "distributed", "numpy", "pytest"} <= names
    assert not names & {"torch", "scikit-image", "matplotlib"}
