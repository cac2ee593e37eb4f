"""Physical space read from the image's metadata: OME-Zarr, OME-TIFF, ImageJ TIFF, URLs."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_dense.errors import InputError
from napari_dense.io.physical import PhysicalSpace, unit_name
from napari_dense.io.sources import open_image


def _ome_zarr(path: Path, data: list[np.ndarray], scales, translations, unit="micrometer"):
    """An OME-Zarr 0.5 image written through ome-zarr-models (not by hand)."""
    from ome_zarr_models.v05.axes import Axis
    from ome_zarr_models.v05.image import Image
    from pydantic_zarr.v3 import ArraySpec

    axes = [
        Axis(name="c", type="channel"),
        Axis(name="y", type="space", unit=unit),
        Axis(name="x", type="space", unit=unit),
    ]
    specs = [ArraySpec.from_array(d, dimension_names=("c", "y", "x")) for d in data]
    image = Image.new(
        array_specs=specs,
        paths=[str(i) for i in range(len(data))],
        axes=axes,
        scales=scales,
        translations=translations,
        name="input",
    )
    group = image.to_zarr(zarr.storage.LocalStore(path), path="")
    for i, d in enumerate(data):
        group[str(i)][:] = d
    return path


def test_ome_zarr_scale_translation_and_units_of_each_level(tmp_path) -> None:
    data = [np.ones((3, 64, 64), np.uint8), np.ones((3, 32, 32), np.uint8)]
    path = _ome_zarr(
        tmp_path / "in.zarr", data, [[1, 0.25, 0.25], [1, 0.5, 0.5]],
        [[0, 10, 20], [0, 10.125, 20.125]],
    )  # fmt: skip
    full = open_image(str(path), channels=3)
    assert full.space.scale == (0.25, 0.25) and full.space.translation == (10.0, 20.0)
    assert full.space.units == ("micrometer", "micrometer")
    coarse = open_image(str(path), channels=3, level=1)
    assert coarse.plane_shape == (32, 32) and coarse.space.scale == (0.5, 0.5)
    assert coarse.space.translation == (10.125, 20.125)
    # The level below is the full level downsampled 2x by block means.
    assert full.space.downsampled(2) == coarse.space
    with pytest.raises(InputError, match="level 2 does not exist"):
        open_image(str(path), channels=3, level=2)


def test_a_zarr_group_that_is_not_ome_zarr_names_the_fix(tmp_path) -> None:
    zarr.create_group(str(tmp_path / "g.zarr")).create_array("a", shape=(8, 8), dtype="u1")
    with pytest.raises(InputError, match=r"not a valid OME-Zarr image.*path of an array inside"):
        open_image(str(tmp_path / "g.zarr"))


def test_ome_tiff_physical_size_channel_names_and_axes(tmp_path) -> None:
    # (C, Y, X) with C = 3 and X = 3: guessing from the shape would take the last axis.
    data = np.arange(3 * 50 * 3, dtype=np.uint16).reshape(3, 50, 3)
    path = tmp_path / "in.ome.tif"
    tifffile.imwrite(
        path, data, ome=True, photometric="minisblack",
        metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5,
                  "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm",
                  "Channel": {"Name": ["DAPI", "GFP", "RFP"]}},
    )  # fmt: skip
    source = open_image(str(path), channels=3)
    assert source.space.scale == (0.5, 0.5)
    assert source.space.units == ("micrometer", "micrometer")
    assert source.space.channel_names == ("DAPI", "GFP", "RFP")
    assert source.plane_shape == (50, 3)
    np.testing.assert_array_equal(source.array.compute(), data)


def test_imagej_tiff_unit_and_resolution(tmp_path) -> None:
    path = tmp_path / "ij.tif"
    data = np.zeros((30, 40), np.uint8)
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.3, 1 / 0.3),
                     metadata={"unit": "micron"})  # fmt: skip
    space = open_image(str(path), channels=1).space
    assert space.units == ("micrometer", "micrometer")
    np.testing.assert_allclose(space.scale, (0.3, 0.3), rtol=1e-6)


def test_plain_tiff_resolution_in_centimetres(tmp_path) -> None:
    path = tmp_path / "cm.tif"
    tifffile.imwrite(path, np.zeros((20, 20), np.uint8), resolution=(40000, 40000),
                     resolutionunit="CENTIMETER")  # fmt: skip
    space = open_image(str(path), channels=1).space
    np.testing.assert_allclose(space.scale, (0.25, 0.25), rtol=1e-6)
    assert space.units == ("micrometer", "micrometer")


def test_arrays_and_bare_files_have_the_default_space(tmp_path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((8, 8), np.float32))
    assert open_image(str(tmp_path / "a.npy")).space.is_default
    assert open_image(np.zeros((8, 8))).space == PhysicalSpace()
    assert PhysicalSpace(scale=(0.0, float("nan"))).scale == (1.0, 1.0)  # nonsense ignored
    assert unit_name("µm") == unit_name("micron") == "micrometer" and unit_name(None) is None


@pytest.fixture
def http_folder(tmp_path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1 (a thread; stopped after the test)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_ome_zarr_over_http(http_folder) -> None:
    folder, url = http_folder
    data = [np.arange(3 * 32 * 32, dtype=np.uint16).reshape(3, 32, 32)]
    _ome_zarr(folder / "remote.zarr", data, [[1, 0.25, 0.25]], [None])
    source = open_image(f"{url}/remote.zarr", channels=3)
    assert source.space.scale == (0.25, 0.25) and source.path == f"{url}/remote.zarr"
    np.testing.assert_array_equal(source.array.compute(), data[0])
    with pytest.raises(InputError, match="cannot open"):
        open_image(f"{url}/missing.zarr", channels=3)
