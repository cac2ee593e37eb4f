"""Every sample opens through napari's own sample API; the large ones are lazy pyramids."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_dense._napari.sample_data import MOSAIC_SIZE, SAMPLE_KEYS, SLIDE_SIZE
from napari_dense.io.virtual_slide import VirtualSlide


@pytest.mark.parametrize("key", SAMPLE_KEYS)
def test_every_sample_opens_through_napari(make_napari_viewer, key) -> None:
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-dense", key)
    [layer] = layers
    assert layer.rgb
    expected = {"ihc": 512, "ihc_mosaic": MOSAIC_SIZE, "ihc_virtual_slide": SLIDE_SIZE}[key]
    level0 = layer.data[0] if layer.multiscale else layer.data
    assert level0.shape == (expected, expected, 3) and level0.dtype == np.uint8
    assert layer.multiscale == (key != "ihc")
    if layer.multiscale:  # a pyramid whose smallest level is screen-sized
        assert max(layer.data[-1].shape[:2]) <= 512


def test_virtual_slide_levels_are_means_of_level_0_and_reads_are_exact() -> None:
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    slide = VirtualSlide(tile, (700, 900), levels=3, block=128, seed=3)
    level0 = np.asarray(slide.level(0))
    assert level0.shape == (700, 900, 3)
    # Every pixel is a pixel of the mirrored tile (some copy, some shift).
    mirrored = np.concatenate([tile, tile[::-1]], axis=0)
    base = np.concatenate([mirrored, mirrored[:, ::-1]], axis=1)
    colours = {tuple(p) for p in base.reshape(-1, 3)}
    assert {tuple(p) for p in level0[::37, ::41].reshape(-1, 3)} <= colours
    # Neighbouring blocks are shifted copies, not the same copy.
    assert not np.array_equal(level0[:128, :128], level0[:128, 128:256])
    for level in (1, 2, 3):
        factor = 2**level
        coarse = np.asarray(slide.level(level)).astype(float)
        h, w = 700 // factor, 900 // factor
        mean = level0[: h * factor, : w * factor].astype(float)
        mean = mean.reshape(h, factor, w, factor, 3).mean(axis=(1, 3))
        np.testing.assert_array_equal(coarse[:h, :w], np.rint(mean))
    # A read across blocks equals the same pixels of the whole level.
    np.testing.assert_array_equal(
        slide.read(0, slice(100, 300), slice(50, 400)), level0[100:300, 50:400]
    )


def test_levels_that_do_not_divide_the_tile_are_refused() -> None:
    with pytest.raises(ValueError, match="use fewer levels"):
        VirtualSlide(np.zeros((24, 24, 3), np.uint8), (100, 100), levels=5)
