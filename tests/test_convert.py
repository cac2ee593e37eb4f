"""densify / predict equal the per-patch oracle on many architectures (the core promise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from architectures import ARCHITECTURES, ConcatNet
from conftest import ATOL, oracle_valid, randomize_batchnorm

import napari_dense as nd
from napari_dense.evaluate.reference import patchwise


def _model(name: str) -> tuple[torch.nn.Module, tuple[int, int], int, tuple[int, int]]:
    factory, patch, channels, size = ARCHITECTURES[name]
    return randomize_batchnorm(factory()), patch, channels, size


@pytest.mark.parametrize("phases", ["dilated", "batch"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_densify_equals_oracle(name: str, batch: int, phases: str) -> None:
    model, patch, channels, size = _model(name)
    dense = nd.densify(model, patch, phases=phases)
    assert dense.exact and dense.output_stride == (1, 1)
    x = torch.rand(batch, channels, *size)
    with torch.no_grad():
        out = dense(x).numpy()
    expected = oracle_valid(model, x, patch)
    assert (
        out.shape
        == expected.shape
        == (batch, dense.num_classes, size[0] - patch[0] + 1, size[1] - patch[1] + 1)
    )
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_predict_advanced_equals_oracle(name: str) -> None:
    model, patch, channels, _ = _model(name)
    shape = (13, 16, channels)  # odd and even, smaller than some patches (reflected), channel-last
    image = np.random.rand(*shape).astype(np.float32)
    if channels == 1:
        image = image[..., 0]
    out = nd.predict(image, model, patch, mode="advanced", device="cpu")
    expected = patchwise(image, model, patch)
    assert out.shape == expected.shape == (expected.shape[0], *shape[:2])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("border", ["reflect", "edge", "constant"])
def test_predict_border_modes_match_oracle(border: str) -> None:
    model, patch, _, _ = _model("fdfe15")
    image = np.random.rand(20, 17).astype(np.float32)
    out = nd.predict(image, model, patch, border=border)
    np.testing.assert_allclose(out, patchwise(image, model, patch, border=border), atol=ATOL)


@pytest.mark.parametrize("name", ["fdfe15", "residual_add", "strided_convs", "avg_drops_rows"])
def test_simple_equals_advanced_on_the_lattice(name: str) -> None:
    model, patch, channels, size = _model(name)
    image = np.random.rand(channels, size[0] + 6, size[1] + 5).astype(np.float32)
    advanced = nd.predict(image, model, patch, channel_axis=0)
    simple_net = nd.densify(model, patch, sampling="none")
    sy, sx = simple_net.output_stride
    assert (sy, sx) != (1, 1)
    for interpolation in ("bilinear", "nearest"):
        simple = nd.predict(image, simple_net, channel_axis=0, interpolation=interpolation)
        assert simple.shape == advanced.shape
        np.testing.assert_allclose(simple[:, ::sy, ::sx], advanced[:, ::sy, ::sx], atol=1e-5)
    # Between lattice points simple interpolates: it differs from the exact output.
    assert np.abs(simple - advanced).max() > 1e-3


def test_simple_bilinear_interpolates_between_lattice_points() -> None:
    model, patch, _, _ = _model("fdfe15")
    image = np.random.rand(30, 30).astype(np.float32)
    simple = nd.predict(image, model, patch, mode="simple", interpolation="bilinear")
    # Pixel 2 lies halfway between lattice samples 0 and 4 (stride 4).
    np.testing.assert_allclose(simple[:, 2, 0], (simple[:, 0, 0] + simple[:, 4, 0]) / 2, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "densified"),
    [
        ("fdfe15", ["2"]),
        ("fdfe15", ["5"]),
        ("residual_add", ["pool"]),
        ("vgg64", ["6", "20"]),
        ("strided_convs", ["2"]),
    ],
)
def test_custom_sampling_is_exact_on_its_lattice(name: str, densified: list[str]) -> None:
    model, patch, channels, size = _model(name)
    plan = nd.explain(model, patch)
    names = [layer.name for layer in plan.layers]
    sampling = {layer: ("all" if layer in densified else "none") for layer in names}
    dense = nd.densify(model, patch, sampling=sampling)
    expected_stride = np.prod(
        [lay.stride for lay in plan.layers if lay.name not in densified], axis=0
    )
    assert dense.output_stride == tuple(expected_stride)
    x = torch.rand(2, channels, size[0] + 7, size[1] + 4)
    with torch.no_grad():
        out = dense(x).numpy()
    sy, sx = dense.output_stride
    expected = oracle_valid(model, x, patch)[:, :, ::sy, ::sx]
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=ATOL)


def test_layers_not_named_in_a_mapping_are_not_densified() -> None:
    model, patch, _, _ = _model("fdfe15")
    assert nd.densify(model, patch, sampling={"2": "all"}).output_stride == (2, 2)
    assert nd.densify(model, patch, sampling={}).output_stride == (4, 4)


def test_branches_sampled_differently_are_refused_with_a_hint() -> None:
    with pytest.raises(nd.UnsupportedLayerError, match="densify the striding layers of all"):
        nd.densify(ConcatNet(), 10, sampling={"branch_pool": "all", "branch_conv": "none"})


def test_plan_lists_striding_layers_and_costs() -> None:
    model, patch, _, _ = _model("vgg64")
    plan = nd.explain(model, patch)
    # The last pool (2x2 -> 1x1) is the head: its stride never applies, so it is no choice.
    assert [layer.name for layer in plan.layers] == ["6", "13", "20"]
    assert all(layer.op == "MaxPool2d" and layer.stride == (2, 2) for layer in plan.layers)
    assert all(layer.added_macs_per_pixel > 0 for layer in plan.layers)
    assert plan.exact and plan.receptive_field == (64, 64)
    simple = nd.explain(model, patch, sampling="none")
    assert simple.output_stride == (8, 8)
    assert simple.macs_per_pixel < plan.macs_per_pixel / 10
    # With everything densified each weight is used once per pixel: MACs/px == sum of weights.
    weights = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    )
    assert plan.macs_per_pixel == weights
    assert "MaxPool2d" in str(plan) and plan.as_dict()["patch_size"] == (64, 64)


def test_receptive_field_smaller_than_patch_when_pooling_drops_rows() -> None:
    model, patch, _, _ = _model("avg_drops_rows")
    plan = nd.explain(model, patch)
    assert plan.receptive_field[0] == 12 and plan.receptive_field[1] < 17


def test_the_callers_model_is_unchanged() -> None:
    model, patch, _, _ = _model("batchnorm_linear")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = nd.densify(model, patch)
    nd.predict(np.random.rand(20, 20, 3), model, patch)
    patchwise(np.random.rand(18, 18, 3), model, patch)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p is not q for p, q in zip(model.parameters(), dense.parameters(), strict=False))


def test_dense_classifier_is_a_module_that_moves_and_prints() -> None:
    model, patch, _, _ = _model("fdfe15")
    dense = nd.densify(model, patch)
    assert isinstance(dense, torch.nn.Module)
    assert "output_stride=(1, 1)" in repr(dense)
    assert dense.output_offset == (7, 7)
    assert dense.output_shape(100, 40) == (86, 26)
    assert "dense_conv2d" in dense.network.code
    assert len(list(dense.parameters())) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["fdfe15", "residual_add", "avg_drops_rows"])
def test_shift_and_stitch_baseline_equals_oracle(name: str) -> None:
    from napari_dense.evaluate.baselines import shift_and_stitch

    model, patch, channels, _ = _model(name)
    image = np.random.rand(channels, 19, 22).astype(np.float32)
    out = shift_and_stitch(image, model, patch, channel_axis=0)
    np.testing.assert_allclose(out, patchwise(image, model, patch, channel_axis=0), atol=ATOL)


def test_phase_batch_form_refuses_strided_after_densified() -> None:
    model, patch, _, _ = _model("fdfe15")
    with pytest.raises(nd.UnsupportedLayerError, match="phases='dilated'"):
        nd.densify(model, patch, sampling={"2": "all"}, phases="batch")
    # Strided first, densified after: still a lattice, still exact.
    dense = nd.densify(model, patch, sampling={"5": "all"}, phases="batch")
    x = torch.rand(1, 1, 30, 27)
    with torch.no_grad():
        out = dense(x).numpy()
    assert dense.output_stride == (2, 2)
    np.testing.assert_allclose(out, oracle_valid(model, x, patch)[:, :, ::2, ::2], atol=ATOL)
