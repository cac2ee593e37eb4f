"""Adversarial suite, the other outcomes: refused with a message naming the node and the fix,
or converted, flagged not exact with one warning and the deviation measured."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ATOL, oracle_valid
from test_adversarial_zoo import Lambda, head, pooled_stem
from torch import nn

import napari_dense as nd


def _se(m: Lambda, x: torch.Tensor) -> torch.Tensor:
    w = torch.sigmoid(m.fc(x.mean((2, 3)))).view(-1, 8, 1, 1)
    return m.h(x * w).flatten(1)


def _coords(m: Lambda, x: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    yy = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(n, 1, h, w)
    return m.h(torch.cat([x, yy, yy.transpose(2, 3)], 1)).flatten(1)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        return (y if float(y.sum()) > 0 else -y).flatten(1)


def _lambda(fn: Callable[..., torch.Tensor], **modules: nn.Module) -> Callable[[], nn.Module]:
    return lambda: Lambda(fn, **modules)


def _const(name: str, value: torch.Tensor) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = Lambda(lambda m, x: m.h(x + getattr(m, name)).flatten(1), h=head(8, 3))
        model.register_buffer(name, value)
        return model

    return make


#: name -> (factory, patch size, error type, message fragment (regex) naming node and fix)
REFUSED: dict[str, tuple[Callable[[], nn.Module], int, type[Exception], str]] = {
    "squeeze_excitation": (
        _lambda(_se, fc=nn.Linear(8, 8), h=head(8, 3)), 5, nd.UnsupportedLayerError,
        r"node 'mul' .*per-patch global value .*squeeze-and-excitation",
    ),
    "minus_global_max": (
        _lambda(lambda m, x: m.h(x - x.amax((2, 3), keepdim=True)).flatten(1), h=head(8, 3)),
        5, nd.UnsupportedLayerError, r"node 'sub' .*broadcasts 'amax'",
    ),
    "softmax_flattened_map": (
        _lambda(lambda m, x: F.softmax(m.h(x).flatten(1), dim=1), h=nn.Conv2d(8, 2, 1)),
        5, nd.UnsupportedLayerError, r"node 'softmax' .*flattened feature map",
    ),
    "batch_norm_training": (
        _lambda(lambda m, x: m.h(F.batch_norm(x, None, None, training=True)).flatten(1),
                h=head(8, 3)),
        5, nd.UnsupportedLayerError, r"node 'batch_norm' .*training=True.*Hint",
    ),
    "interpolate": (
        _lambda(lambda m, x: m.h(F.interpolate(x, scale_factor=2.0)).flatten(1), h=head(8, 6)),
        5, nd.UnsupportedLayerError, r"node 'interpolate' .*no exact dense equivalent",
    ),
    "integer_index": (
        _lambda(lambda m, x: m.h(x)[:, :, 0, 0], h=head(8, 1)), 3, nd.UnsupportedLayerError,
        r"node 'getitem' .*only slices",
    ),
    "strided_slice": (
        _lambda(lambda m, x: m.h(x[:, :, ::2, ::2]).flatten(1), h=head(8, 2)), 6,
        nd.UnsupportedLayerError, r"node 'getitem' .*strided slice.*Hint: use a 1x1 max pool",
    ),
    "transposed_conv": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 2, 2), nn.Conv2d(2, 2, 6)),
        7, nd.UnsupportedLayerError, r"ConvTranspose2d module '1'",
    ),
    "per_column_bias": (
        _const("col", torch.randn(3)), 5, nd.UnsupportedLayerError,
        r"node 'add' .*constant of spatial shape",
    ),
    "spatial_bias_map": (
        _const("bias_map", torch.randn(8, 3, 3)), 5, nd.UnsupportedLayerError,
        r"node 'add' .*constant of spatial shape \(3, 3\)",
    ),
    "coordinate_channels": (
        _lambda(_coords, h=head(10, 3), stem=nn.Identity()), 3, nd.UnsupportedLayerError,
        r"node 'cat' .*concatenates a feature map with a constant",
    ),
    "linear_on_last_axis": (
        _lambda(lambda m, x: m.fc(x).mean((1, 2, 3))[:, None], fc=nn.Linear(3, 2)), 5,
        nd.UnsupportedLayerError, r"Linear module 'fc'.*Hint: flatten the map first",
    ),
    "channel_reduction_without_keepdim": (
        _lambda(lambda m, x: m.h(x.sum(1)[:, None]).flatten(1), h=nn.Conv2d(1, 2, 3)), 5,
        nd.UnsupportedLayerError, r"node 'sum\w*' .*drops dim 1. Hint: pass keepdim=True",
    ),
    "data_dependent_control_flow": (
        Untraceable, 3, nd.UnsupportedLayerError,
        r"cannot convert Untraceable: torch.fx cannot trace it.*torch.export fails too",
    ),
    "uneven_adaptive_pool": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(3), nn.Flatten(),
                              nn.Linear(36, 2)),
        10, nd.UnsupportedLayerError, r"adaptive pooling of a \(8, 8\) map to \(3, 3\).*Hint",
    ),
    "head_not_one_vector": (
        lambda: nn.Sequential(pooled_stem(), nn.Conv2d(8, 2, 1)), 10, nd.PatchSizeError,
        r"returns \(N, 2, 3, 3\).*accepts square patches of size",
    ),
    "permute_spatial_axes": (
        _lambda(lambda m, x: m.h(x.permute(0, 1, 3, 2)).flatten(1), h=head(8, 3)), 5,
        nd.UnsupportedLayerError, r"node 'permute' .*only moving the channels last",
    ),
    "layer_norm_over_the_map": (
        _lambda(lambda m, x: m.h(m.ln(x)).flatten(1), ln=nn.LayerNorm([8, 3, 3]), h=head(8, 3)),
        5, nd.UnsupportedLayerError, r"LayerNorm module 'ln'.*only a LayerNorm over the channels",
    ),
    "float64_model": (
        lambda: nn.Sequential(pooled_stem(), head()).double(), 10, nd.InputError,
        r"weights are torch.float64, not float32: convert model.float\(\)",
    ),
    "bfloat16_model": (
        lambda: nn.Sequential(pooled_stem(), head()).to(torch.bfloat16), 10, nd.InputError,
        r"torch.bfloat16, not float32.*precision='bfloat16'",
    ),
    "no_channels_to_infer": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(7 * 7 * 99, 2)), 7,
        nd.UnsupportedLayerError, r"cannot tell how many input channels.*in_channels=",
    ),
}  # fmt: skip


def _exported(factory: Callable[[], nn.Module], patch: int) -> Callable[[], object]:
    def make() -> object:
        return torch.export.export(factory().eval(), (torch.zeros(1, 3, patch, patch),))

    return make


REFUSED |= {
    "exported_local_response_norm": (
        _exported(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.LocalResponseNorm(3),
                                        nn.Conv2d(8, 2, 3)), 5),
        5, nd.UnsupportedLayerError, r"node 'view' \(operator aten.view.default in module '1'\)",
    ),
    "exported_squeeze_of_the_batch": (
        _exported(lambda: Lambda(lambda m, x: m.fc(m.c(x).squeeze().view(-1, 4)),
                                 c=nn.Conv2d(8, 4, 3), fc=nn.Linear(4, 2)), 5),
        5, nd.UnsupportedLayerError, r"node 'squeeze' .*changing the batch dimension. Hint",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused(name: str) -> None:
    factory, patch, error, fragment = REFUSED[name]
    torch.manual_seed(0)
    with pytest.raises(error, match=fragment) as info:
        model = factory()
        nd.densify(model.eval() if isinstance(model, nn.Module) else model, patch)
    assert "\n" not in str(info.value)  # one line (the CLI prints it as is)


def _resnet_block(channels: int) -> nn.Module:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.b1 = nn.BatchNorm2d(channels)
            self.c2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.b2 = nn.BatchNorm2d(channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))

    return Block()


def resnet18_like() -> nn.Module:
    """ResNet-18's layout (7x7/2 stem, 3x3/2 max pool, four stages) used as a patch classifier."""
    c = 4
    stages: list[nn.Module] = [
        nn.Conv2d(3, c, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
    ]  # fmt: skip
    for i in range(4):
        if i:
            stages += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c)]
            c *= 2
        stages += [_resnet_block(c), _resnet_block(c)]
    return nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))


FLAGGED: dict[str, tuple[Callable[[], nn.Module], int, str]] = {
    "resnet18_like": (resnet18_like, 32, "padding"),
    "same_padding": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(4, 2, 4)),
        8, "padding",
    ),
    "reflect_padding": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                              nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
        6, "padding",
    ),
    "ceil_mode_partial_window": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, ceil_mode=True),
                              nn.Conv2d(4, 2, 5)),
        11, "ceil_mode",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FLAGGED))
def test_flagged_not_exact_with_one_warning_and_the_deviation_measured(name: str) -> None:
    factory, patch, reason = FLAGGED[name]
    torch.manual_seed(0)
    model = factory().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dense = nd.densify(model, patch)
    assert len(caught) == 1 and "not exact" in str(caught[0].message)
    assert reason in str(caught[0].message) and "self-check: max |Δ|" in str(caught[0].message)
    verified = dense.plan.verified
    assert not dense.exact and verified is not None and verified.max_abs_diff > ATOL
    # The (N, K, H', W') contract holds, and the deviation is real against the oracle.
    x = torch.rand(2, 3, patch + 3, patch + 2)
    with torch.no_grad():
        got = dense(x).numpy()
    expected = oracle_valid(model, x, (patch, patch))
    assert got.shape == expected.shape and np.isfinite(got).all()
    assert np.abs(got - expected).max() > ATOL
