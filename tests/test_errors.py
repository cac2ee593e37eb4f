"""Bad models and bad input give one clear message that names the fix."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ATOL
from torch import nn

import napari_dense as nd
from napari_dense.evaluate.models import fdfe15, patchnet32
from napari_dense.evaluate.reference import patchwise


def test_wrong_patch_size_names_the_accepted_sizes() -> None:
    with pytest.raises(nd.PatchSizeError, match=r"accepts square patches of size 30-33\.$"):
        nd.densify(patchnet32(), 28)


def test_head_that_does_not_reduce_to_one_vector_names_the_patch_size() -> None:
    # Pooling that drops odd rows makes 14-17 all work for the 15x15 net.
    with pytest.raises(nd.PatchSizeError, match=r"returns \(N, 113, 2, 2\).*size 14-17\.$"):
        nd.densify(fdfe15(), 19)  # a 2x2 output map


def test_padding_converts_with_one_warning_and_exact_false() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding="same"), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 2),
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dense = nd.densify(model, 16)
    assert len(caught) == 1 and "not exact" in str(caught[0].message)
    assert not dense.exact and len(dense.plan.inexact_reasons) == 2
    # Deviation is measurable, and interior pixels far from the border agree less than exactly.
    image = np.random.rand(24, 24, 3).astype(np.float32)
    with pytest.warns(UserWarning):
        out = nd.predict(image, model, 16)
    assert out.shape == (2, 24, 24) and np.isfinite(out).all()
    assert np.abs(out - patchwise(image, model, 16)).max() > ATOL


def test_padded_network_is_still_exact_at_the_first_layer_anchor() -> None:
    # One padded conv followed by a global max: every dense output sees real neighbours
    # where the patch saw zeros, so it can only be >= the per-patch value for ReLU maps.
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1))
    with pytest.warns(UserWarning, match="padding"):
        dense = nd.densify(model, 8)
    x = torch.rand(1, 1, 12, 12)
    with torch.no_grad():
        out = dense(x)
    assert out.shape == (1, 2, 5, 5)


class Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.conv(x), scale_factor=0.5)
        return x.flatten(1)


def test_unsupported_op_names_node_module_and_hint() -> None:
    with pytest.raises(nd.UnsupportedLayerError) as info:
        nd.densify(Upsampler(), 6)
    message = str(info.value)
    assert "interpolate" in message and "node 'interpolate'" in message
    assert "Supported:" in message


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.conv(x).flatten(1)


def test_untraceable_model_gets_a_hint() -> None:
    with pytest.raises(
        nd.UnsupportedLayerError,
        match=r"cannot convert DataDependent: torch.fx cannot trace it.*torch.export fails too.*"
        r"Hint: remove Python control flow",
    ):
        nd.densify(DataDependent(), 3)


class SpatialIndexing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x[:, :, 1:2, 1:2] + x[:, :, 1, 1, None, None]


def test_integer_indexing_of_feature_maps_is_refused_naming_the_node() -> None:
    with pytest.raises(nd.UnsupportedLayerError, match=r"node 'getitem_1'.*only slices"):
        nd.densify(SpatialIndexing(), 5)


def test_constant_crop_of_a_feature_map_is_exact() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    cropped = CentreCrop(model)
    image = np.random.rand(11, 12).astype(np.float32)
    np.testing.assert_allclose(
        nd.predict(image, cropped, 5), patchwise(image, cropped, 5), atol=ATOL
    )


class CentreCrop(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[:, :, 1:2, 1:2]


def test_unknown_sampling_names_list_the_layers() -> None:
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['pool9'\]; striding layers: 2, 5"):
        nd.densify(fdfe15(), 15, sampling={"pool9": "all"})
    with pytest.raises(ValueError, match="must be 'all', 'checkered', 'none'"):
        nd.densify(fdfe15(), 15, sampling="some")


def test_channel_mismatch_names_the_fix() -> None:
    with pytest.raises(nd.InputError, match=r"expects 3 channel.*channel_axis"):
        nd.predict(np.zeros((20, 20)), patchnet32(), 32)
    with pytest.raises(nd.InputError, match=r"expects 1 channel.*rgb2gray"):
        nd.predict(np.zeros((20, 20, 3)), fdfe15(), 15)
    with pytest.raises(nd.InputError, match="expects 3 channel"):
        nd.predict(np.zeros((20, 20, 4)), patchnet32(), 32, channel_axis=-1)
    dense = nd.densify(fdfe15(), 15)
    with pytest.raises(nd.InputError, match="expects 1 channel"):
        dense(torch.zeros(1, 2, 20, 20))
    with pytest.raises(nd.InputError, match="smaller than the 15x15 patch; pad it"):
        dense(torch.zeros(1, 1, 10, 20))


def test_image_smaller_than_the_patch_is_reflected() -> None:
    model = fdfe15(num_classes=3)
    image = np.random.rand(5, 4).astype(np.float32)
    out = nd.predict(image, model, 15)
    assert out.shape == (3, 5, 4)
    np.testing.assert_allclose(out, patchwise(image, model, 15), atol=ATOL)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, bool, np.float64])
def test_integer_images_keep_their_values(dtype: type) -> None:
    model = fdfe15(num_classes=3)
    values = np.random.randint(0, 2 if dtype is bool else 200, (17, 18)).astype(dtype)
    out = nd.predict(values, model, 15)
    np.testing.assert_allclose(out, nd.predict(values.astype(np.float32), model, 15), atol=0)


def test_nan_in_image_is_refused_with_the_fix() -> None:
    image = np.random.rand(20, 20).astype(np.float32)
    image[3, 4] = np.nan
    with pytest.raises(nd.InputError, match=r"1 NaN/infinite value.*nan_to_num"):
        nd.predict(image, fdfe15(), 15)


def test_other_bad_arguments() -> None:
    model = fdfe15()
    with pytest.raises(nd.InputError, match="border must be one of"):
        nd.predict(np.zeros((20, 20)), model, 15, border="wrap")
    with pytest.raises(nd.InputError, match="mode must be"):
        nd.predict(np.zeros((20, 20)), model, 15, mode="fast")
    with pytest.raises(nd.InputError, match="patch_size is required"):
        nd.predict(np.zeros((20, 20)), model)
    with pytest.raises(nd.InputError, match="pass one plane"):
        nd.predict(np.zeros((2, 20, 20, 1)), model, 15)
    with pytest.raises(nd.InputError, match="not numeric"):
        nd.predict(np.array([["a"]]), model, 15)
    with pytest.raises(nd.InputError, match="CUDA is not available"):
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        nd.predict(np.zeros((20, 20)), model, 15, device="cuda")


def test_unknown_activation_names_the_choices() -> None:
    with pytest.raises(nd.InputError, match="'softmax', 'sigmoid' or None"):
        nd.predict(np.zeros((20, 20)), fdfe15(), 15, activation="relu")
