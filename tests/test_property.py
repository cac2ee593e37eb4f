"""Property-based: random architectures, random per-layer sampling (all / checkered / none):
every computed sample equals the oracle."""

from __future__ import annotations

import numpy as np
import torch
from conftest import ATOL, computed_mask, oracle_valid, randomize_batchnorm
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import napari_dense as nd

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.GELU, nn.Identity]


class Branches(nn.Module):
    """Two convolutions with the same footprint, joined by add or concat."""

    def __init__(self, channels: int, out: int, kernel: int, stride: int, join: str) -> None:
        super().__init__()
        self.a = nn.Conv2d(channels, out, kernel, stride=stride)
        self.b1 = nn.Conv2d(channels, out, 1)
        self.b2 = nn.MaxPool2d(kernel, stride=stride)
        self.join = join

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        other = self.b2(self.b1(x))
        a = self.a(x)
        return a + other if self.join == "add" else torch.cat([a, other], dim=1)


class CropJoin(nn.Module):
    """A convolution joined (add or concat) with a crop of its own input of the same size."""

    def __init__(self, channels: int, kernel: tuple[int, int], offset: tuple[int, int], join: str):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel)
        self.kernel, self.offset, self.join = kernel, offset, join

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (a, b) = self.kernel, self.offset
        h, w = x.shape[2] - kh + 1, x.shape[3] - kw + 1
        crop = x[:, :, a : a + h, b : b + w]
        y = self.conv(x)
        return y + crop if self.join == "add" else torch.cat([y, crop], dim=1)


class ChannelOp(nn.Module):
    """An op over the channels of each pixel (per-pixel rule)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "normalize":
            return nn.functional.normalize(x, dim=1)
        if self.kind == "centre":
            return x - x.mean(1, keepdim=True) + x.amax(dim=1, keepdim=True)
        if self.kind == "layer_norm_last":  # channels last and back (ConvNeXt)
            y = nn.functional.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],))
            return y.permute(0, 3, 1, 2)
        if self.kind == "chunk":
            a, b = torch.cat([x, x], 1).chunk(2, dim=1)
            return a * torch.sigmoid(b)
        return x[:, : max(1, x.shape[1] // 2)] if self.kind == "slice" else x.clone()


@st.composite
def layer(draw: st.DrawFn, channels: int) -> tuple[list[nn.Module], int]:
    kind = draw(st.sampled_from(["conv", "pool", "branches", "bn", "crop", "channels"]))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    act = draw(st.sampled_from(ACTIVATIONS))()
    if kind == "conv":
        out = draw(st.integers(1, 6))
        groups = draw(st.sampled_from([g for g in (1, 2) if channels % g == 0 and out % g == 0]))
        dilation = draw(st.integers(1, 2))
        return [
            nn.Conv2d(channels, out, kernel, stride, dilation=dilation, groups=groups),
            act,
        ], out
    if kind == "pool":
        pool = nn.MaxPool2d if draw(st.booleans()) else nn.AvgPool2d
        return [pool(kernel, stride), act], channels
    if kind == "branches":
        out = draw(st.integers(1, 4))
        join = draw(st.sampled_from(["add", "cat"]))
        size, step = kernel[0], stride[0]
        return [Branches(channels, out, size, step, join), act], out * (2 if join == "cat" else 1)
    if kind == "crop":
        offset = (draw(st.integers(0, kernel[0] - 1)), draw(st.integers(0, kernel[1] - 1)))
        join = draw(st.sampled_from(["add", "cat"]))
        return [CropJoin(channels, kernel, offset, join), act], channels * (
            2 if join == "cat" else 1
        )
    if kind == "channels":
        op = draw(
            st.sampled_from(["normalize", "centre", "chunk", "slice", "clone", "layer_norm_last"])
        )
        return [ChannelOp(op), act], max(1, channels // 2) if op == "slice" else channels
    return [nn.BatchNorm2d(channels)], channels


@st.composite
def architecture(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, int], int]:
    channels = in_channels = draw(st.integers(1, 3))
    body: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 4))):
        layers, channels = draw(layer(channels))
        body.extend(layers)
    patch = (draw(st.integers(4, 26)), draw(st.integers(4, 26)))
    trunk = nn.Sequential(*body).eval()
    try:
        with torch.no_grad():
            features = trunk(torch.zeros(1, in_channels, *patch))
    except RuntimeError:
        features = None
    assume(features is not None and min(features.shape[2:]) >= 1)
    assert features is not None
    _, c, h, w = features.shape
    classes = draw(st.integers(1, 4))
    head = draw(st.sampled_from(["linear", "global_avg", "global_max_conv"]))
    if head == "linear":
        tail: list[nn.Module] = [
            nn.Flatten(),
            nn.Linear(c * h * w, 5),
            nn.ReLU(),
            nn.Linear(5, classes),
        ]
    elif head == "global_avg":
        tail = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes), nn.Softmax(dim=1)]
    else:
        tail = [nn.AdaptiveMaxPool2d(1), nn.Conv2d(c, classes, 1)]
    model = randomize_batchnorm(nn.Sequential(*body, *tail), seed=draw(st.integers(0, 99)))
    return model.eval(), patch, in_channels


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=architecture(), data=st.data())
def test_random_architectures_equal_the_oracle(spec: tuple, data: st.DataObject) -> None:
    model, patch, channels = spec
    plan = nd.explain(model, patch, in_channels=channels)  # some draws have no Conv2d
    # A random subset of the striding layers densified; tied (joined) layers move together.
    sampling: dict[str, str] = {}
    for layer in plan.layers:
        if layer.name not in sampling:
            choice = data.draw(
                st.sampled_from(["all", "checkered", "none"]), label=f"sampling {layer.name}"
            )
            sampling.update(dict.fromkeys((layer.name, *layer.tied_with), choice))
    dense = nd.densify(model, patch, sampling=sampling, in_channels=channels)
    assert dense.exact
    extra = (data.draw(st.integers(0, 7), label="extra rows"), data.draw(st.integers(0, 7)))
    batch = data.draw(st.integers(1, 2), label="batch")
    x = torch.rand(batch, channels, patch[0] + extra[0], patch[1] + extra[1])
    with torch.no_grad():
        out = dense(x).numpy()
    sy, sx = dense.output_stride
    expected = oracle_valid(model, x, patch)[:, :, ::sy, ::sx]
    assert out.shape == expected.shape
    computed = computed_mask(dense, out.shape[-2:])  # all True without checkered layers
    np.testing.assert_allclose(out[..., computed], expected[..., computed], atol=ATOL, rtol=0)
