"""Packaging: a pure core (no Qt/napari imports), a valid napari manifest, public API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_core_imports_no_gui_packages() -> None:
    # Every module outside napari_dense._napari is the pure core: importing all of them
    # loads no GUI package (ARCHITECTURE.md's one rule).
    code = (
        "import sys, pkgutil, importlib, napari_dense\n"
        "names = [m.name for m in pkgutil.walk_packages(napari_dense.__path__, 'napari_dense.')"
        " if not m.name.startswith('napari_dense._napari')]\n"
        "for name in names: importlib.import_module(name)\n"
        "assert len(names) > 40, names\n"
        "bad = [m for m in ('qtpy', 'napari', 'magicgui', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6',"
        " 'superqt', 'vispy') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_manifest_is_symlinked_into_the_package() -> None:
    link = ROOT / "napari_dense" / "napari.yaml"
    assert link.is_symlink() and link.resolve() == (ROOT / "napari.yaml").resolve()
    assert (ROOT / "napari_dense" / "py.typed").exists()


def test_manifest_validates_and_every_python_name_imports() -> None:
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_file(ROOT / "napari.yaml")
    for command in manifest.contributions.commands or []:
        assert command.python_name is not None
        module_name, _, attribute = command.python_name.partition(":")
        module = __import__(module_name, fromlist=[attribute])
        assert callable(getattr(module, attribute))
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-dense"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_sample_data_is_the_bundled_ihc_image() -> None:
    from napari_dense._napari.sample_data import immunohistochemistry

    [(data, meta, kind)] = immunohistochemistry()
    assert data.shape == (512, 512, 3) and meta["rgb"] and kind == "image"


def test_public_api() -> None:
    import napari_dense as nd

    for name in nd.__all__:
        assert getattr(nd, name) is not None
    assert nd.densify.__doc__ and nd.predict.__doc__ and nd.explain.__doc__
