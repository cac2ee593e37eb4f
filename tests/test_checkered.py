"""Checkered sampling (multisampling): exact where a phase is computed, interpolated elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ATOL, computed_mask, oracle_valid
from torch import nn

import napari_dense as nd
from napari_dense.convert.geometry import checkered_phases
from napari_dense.convert.upsample import fill_pattern, upsample_lattice
from napari_dense.errors import InputError
from napari_dense.evaluate.models import fdfe15, patchnet32
from napari_dense.evaluate.reference import patchwise


def test_checkered_phases_are_a_checkerboard_of_the_phase_grid() -> None:
    assert checkered_phases((2, 2)) == ((0, 0), (1, 1))
    assert checkered_phases((3, 3)) == ((0, 0), (0, 2), (1, 1), (2, 0), (2, 2))
    assert len(checkered_phases((4, 4))) == 8
    assert checkered_phases((3, 1)) == ((0, 0), (2, 0))


@pytest.mark.parametrize(
    ("sampling", "grid", "pattern"),
    [
        # one checkered layer (the last): the diagonal of each 2x2 cell of a stride-2 grid
        ({"2": "none", "5": "checkered"}, (2, 2), ((True, False), (False, True))),
        # one checkered layer (the first), the next one densified: a checkerboard, grid 1
        ({"2": "checkered", "5": "all"}, (1, 1), ((True, False), (False, True))),
        # stacked checkered layers: offsets {0, 1} + 2 * {0, 1} along the diagonal of 4x4
        ("checkered", (1, 1), tuple(tuple(a == b for b in range(4)) for a in range(4))),
    ],
)
def test_computed_samples_equal_the_oracle(sampling, grid, pattern) -> None:
    model = fdfe15(num_classes=4).eval()
    dense = nd.densify(model, 15, sampling=sampling)
    assert dense.output_stride == grid
    assert dense.sample_pattern == pattern
    expected_density = np.mean(pattern) / (grid[0] * grid[1])
    assert dense.plan.density == pytest.approx(expected_density)
    x = torch.rand(2, 1, 15 + 13, 15 + 10)
    with torch.no_grad():
        out = dense(x).numpy()
    reference = oracle_valid(model, x, (15, 15))[:, :, :: grid[0], :: grid[1]]
    assert out.shape == reference.shape
    computed = computed_mask(dense, out.shape[-2:])
    assert computed.sum() >= 0.8 * expected_density * grid[0] * grid[1] * computed.size
    np.testing.assert_allclose(out[..., computed], reference[..., computed], atol=ATOL, rtol=0)
    # Not computed: zeros, to be interpolated (never a stale or made-up value).
    assert np.all(out[..., ~computed] == 0)


def test_checkered_strided_convolution_of_stride_three() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 5, 3, stride=3), nn.ReLU(), nn.Conv2d(5, 3, 3), nn.Flatten()
    ).eval()
    dense = nd.densify(model, 9, sampling="checkered")
    assert np.array(dense.sample_pattern).sum() == 5  # 5 of the 3x3 phases
    x = torch.rand(1, 2, 20, 22)
    with torch.no_grad():
        out = dense(x).numpy()
    reference = oracle_valid(model, x, (9, 9))
    computed = computed_mask(dense, out.shape[-2:])
    np.testing.assert_allclose(out[..., computed], reference[..., computed], atol=ATOL, rtol=0)


def test_explain_reports_every_setting_of_every_layer() -> None:
    plan = nd.explain(patchnet32(), 32, sampling={"2": "checkered", "5": "none"})
    assert plan.sampling == {"2": "checkered", "5": "none"}
    assert plan.density == pytest.approx(0.5 / 4)  # half of the phases, then stride 2
    for layer in plan.layers:
        none, checkered, all_ = (layer.cost(s) for s in ("none", "checkered", "all"))
        assert none.macs_per_pixel < checkered.macs_per_pixel < all_.macs_per_pixel
        assert none.density < checkered.density < all_.density
        assert none.bytes_per_megapixel <= checkered.bytes_per_megapixel
        assert checkered.density == pytest.approx(2 * none.density)
    # The costs of the plan's own choice are the plan's totals.
    assert plan.layers[0].cost("checkered").macs_per_pixel == pytest.approx(plan.macs_per_pixel)
    assert "checkered" in plan.to_markdown() and "12.5% of pixels" in plan.to_markdown()


def test_fill_pattern_with_only_the_corners_is_bilinear() -> None:
    coarse = torch.rand(2, 3, 6, 7)
    bilinear = upsample_lattice(coarse, (4, 4), (21, 25), "bilinear")
    pixels = torch.zeros(2, 3, 21, 25)
    pixels[..., ::4, ::4] = coarse
    corners_only = [[a == 0 and b == 0 for b in range(4)] for a in range(4)]
    torch.testing.assert_close(fill_pattern(pixels, corners_only), bilinear)


def test_fill_pattern_keeps_computed_samples_and_constants() -> None:
    pattern = [[True, False, False], [False, False, True], [False, True, False]]
    samples = torch.rand(1, 2, 10, 13)
    filled = fill_pattern(samples, pattern)
    mask = torch.from_numpy(np.tile(np.array(pattern), (4, 5))[:10, :13])
    assert torch.equal(filled[:, :, mask], samples[:, :, mask])
    assert not torch.equal(filled[:, :, ~mask], samples[:, :, ~mask])
    constant = torch.full((1, 1, 10, 13), 0.25)
    torch.testing.assert_close(fill_pattern(constant * 1, pattern), constant)


def test_predict_is_exact_on_the_pattern_and_between_simple_and_advanced() -> None:
    torch.manual_seed(0)
    model = patchnet32(num_classes=3).eval()
    image = np.random.default_rng(0).random((3, 70, 66), dtype=np.float32)
    advanced = nd.predict(image, model, 32, mode="advanced")
    simple = nd.predict(image, model, 32, mode="simple")
    checkered = nd.predict(image, model, 32, mode="checkered")
    dense = nd.densify(model, 32, sampling="checkered")
    period = dense.period
    pattern = np.array(dense.sample_pattern)
    rows, cols = np.mgrid[:70, :66]
    exact = pattern[rows % period[0], cols % period[1]]
    assert exact.mean() == pytest.approx(dense.plan.density, abs=0.02)
    np.testing.assert_allclose(checkered[:, exact], advanced[:, exact], atol=ATOL, rtol=0)
    # And directly against per-patch evaluation, border pixels included.
    ys, xs = np.nonzero(exact)
    pick = np.random.default_rng(1).choice(len(ys), 300, replace=False)
    positions = np.stack([ys[pick], xs[pick]], axis=1)
    oracle = patchwise(image, model, 32, channel_axis=0, border="reflect", positions=positions)
    np.testing.assert_allclose(
        checkered[:, positions[:, 0], positions[:, 1]], oracle, atol=ATOL, rtol=0
    )
    # More exact pixels than simple: closer to advanced on average.
    assert np.abs(checkered - advanced).mean() < np.abs(simple - advanced).mean()


def test_nearest_interpolation_of_a_pattern_is_refused() -> None:
    with pytest.raises(InputError, match="interpolation='bilinear'"):
        nd.predict(np.zeros((20, 20)), fdfe15(), 15, mode="checkered", interpolation="nearest")


def test_checkered_needs_the_dilated_phase_form() -> None:
    with pytest.raises(nd.UnsupportedLayerError, match="phases='dilated'"):
        nd.densify(fdfe15(), 15, sampling="checkered", phases="batch")
