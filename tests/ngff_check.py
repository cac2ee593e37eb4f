"""Strict NGFF 0.5 validation, through ome-zarr-models, of every probability map a test writes.

``assert_valid_ngff(path)`` validates one store; the ``every_store_is_valid_ngff`` fixture (used
autouse by the store tests) validates, after each test, every store napari-dense wrote under the
test's ``tmp_path`` (found by its ``napari_dense`` attribute), so none escapes unchecked.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zarr


def assert_valid_ngff(path: str | Path) -> Any:
    """Validate the store at ``path`` as NGFF 0.5 (warnings are failures); return the model."""
    from ome_zarr_models.common.omero import Omero
    from ome_zarr_models.v05.image import Image

    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ome-zarr-models' ValidationWarning fails the test
        image = Image.from_zarr(group)
        ome = group.attrs.asdict()["ome"]
        omero = Omero.model_validate(ome["omero"])
    assert ome["version"] == "0.5" and "version" not in ome["multiscales"][0]
    (multiscale,) = image.attributes.ome.multiscales
    axes = tuple(axis.name for axis in multiscale.axes)
    for dataset in multiscale.datasets:
        array = group[dataset.path]
        assert isinstance(array, zarr.Array) and array.metadata.dimension_names == axes
    channels = axes.index("c")
    assert len(omero.channels) == group["0"].shape[channels]
    assert all(isinstance(getattr(channel, "label", None), str) for channel in omero.channels)
    return image


def stores_under(folder: Path) -> list[Path]:
    """Folders under ``folder`` holding a Zarr group with napari-dense's provenance."""
    found = []
    for metadata in folder.rglob("zarr.json"):
        try:
            document = json.loads(metadata.read_text())
        except (OSError, ValueError):
            continue
        attributes = document.get("attributes") or {}
        if document.get("node_type") == "group" and "napari_dense" in attributes:
            found.append(metadata.parent)
    return sorted(found)


@pytest.fixture
def every_store_is_valid_ngff(tmp_path: Path) -> Iterator[None]:
    """After the test: every store it wrote under ``tmp_path`` is valid NGFF 0.5."""
    yield
    for store in stores_under(tmp_path):
        assert_valid_ngff(store)
