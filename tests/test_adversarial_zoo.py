"""Models a new user brings (no tests here: the zoo the adversarial tests draw from).

Every factory returns a small, unpadded classifier whose dense network must equal per-patch
evaluation (``EXACT``), or one that must be refused with a message naming the node
(``REFUSED``). Weights are random; channels are kept small so that each case runs fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


class Lambda(nn.Module):
    """A stem of convolutions followed by ``fn(self, x)`` (a custom forward)."""

    def __init__(
        self, fn: Callable[..., torch.Tensor], stem: nn.Module | None = None, **modules: nn.Module
    ) -> None:
        super().__init__()
        self.stem = stem if stem is not None else seq(nn.Conv2d(3, 8, 3), nn.ReLU())
        for name, module in modules.items():
            self.add_module(name, module)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, self.stem(x))


def pooled_stem(channels: int = 8) -> nn.Sequential:
    """10x10 -> 3x3 maps: conv 3, max pool 2, conv 2 (one striding layer)."""
    return seq(nn.Conv2d(3, channels, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(channels, 8, 2))


def head(channels: int = 8, size: int = 3, classes: int = 3) -> nn.Conv2d:
    return nn.Conv2d(channels, classes, size)


# -- published patch nets (small-channel versions of their geometry) ---------------------------


def uninformed_students(patch: int) -> nn.Sequential:
    """Teachers of Bergmann et al. (CVPR 2020) for 17, 33 and 65 px patches (LeakyReLU)."""
    c = 8
    if patch == 17:
        body = [
            nn.Conv2d(3, c, 6),
            nn.LeakyReLU(5e-3),
            nn.MaxPool2d(2),  # 12 -> 6
            nn.Conv2d(c, c, 5),
            nn.LeakyReLU(5e-3),
            nn.Conv2d(c, c, 2),
        ]  # 2 -> 1
    elif patch == 33:
        body = [
            nn.Conv2d(3, c, 3),
            nn.LeakyReLU(5e-3),
            nn.MaxPool2d(2),  # 31 -> 15
            nn.Conv2d(c, c, 4),
            nn.LeakyReLU(5e-3),
            nn.MaxPool2d(2),  # 12 -> 6
            nn.Conv2d(c, c, 4),
            nn.LeakyReLU(5e-3),
            nn.Conv2d(c, c, 3),
        ]  # 3 -> 1
    else:
        body = [
            nn.Conv2d(3, c, 5),
            nn.LeakyReLU(5e-3),
            nn.MaxPool2d(2),  # 61 -> 30
            nn.Conv2d(c, c, 5),
            nn.LeakyReLU(5e-3),
            nn.MaxPool2d(2),  # 26 -> 13
            nn.Conv2d(c, c, 2),
            nn.LeakyReLU(5e-3),
            nn.MaxPool2d(2),  # 12 -> 6
            nn.Conv2d(c, c, 4),
            nn.LeakyReLU(5e-3),
            nn.Conv2d(c, c, 3),
        ]  # 3 -> 1
    return seq(*body, nn.Conv2d(c, 4, 1))


def janowczyk32() -> nn.Sequential:
    """Janowczyk & Madabhushi's 32x32 histology net (overlapping 3x3/2 pools), unpadded."""
    return seq(
        nn.Conv2d(3, 8, 5),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),  # 28 -> 13
        nn.Conv2d(8, 8, 5),
        nn.ReLU(),
        nn.AvgPool2d(3, 2),  # 9 -> 4
        nn.Conv2d(8, 16, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


def simo_serra64() -> nn.Sequential:
    """Simo-Serra et al.'s 64x64 descriptor: pools of strides 2, 3 and 4, Tanh."""
    return seq(
        nn.Conv2d(1, 4, 7),
        nn.Tanh(),
        nn.MaxPool2d(2),  # 58 -> 29
        nn.Conv2d(4, 8, 6),
        nn.Tanh(),
        nn.MaxPool2d(3),  # 24 -> 8
        nn.Conv2d(8, 8, 5),
        nn.Tanh(),
        nn.MaxPool2d(4),  # 4 -> 1
        nn.Flatten(),
        nn.Linear(8, 6),
    )


# -- activations and elementwise ops ------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu6": nn.ReLU6,
    "leaky": lambda: nn.LeakyReLU(0.2),
    "elu": nn.ELU,
    "selu": nn.SELU,
    "celu": nn.CELU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU("tanh"),
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "hardtanh": nn.Hardtanh,
    "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid,
    "softplus": nn.Softplus,
    "softsign": nn.Softsign,
    "prelu": lambda: nn.PReLU(8),
    "threshold": lambda: nn.Threshold(0.1, -1),
    "logsigmoid": nn.LogSigmoid,
    "tanhshrink": nn.Tanhshrink,
}


def activation_net(name: str) -> nn.Sequential:
    return seq(nn.Conv2d(3, 8, 3), ACTIVATIONS[name](), nn.MaxPool2d(2), nn.Conv2d(8, 3, 4))


FUNCTIONAL: dict[str, Callable[[Any, torch.Tensor], torch.Tensor]] = {
    "erf": lambda m, x: m.h(torch.erf(x)),
    "where": lambda m, x: m.h(torch.where(x > 0, x, 0.1 * x)),
    "comparison_mask": lambda m, x: m.h(x * (x > 0.1).float()),
    "clone_to": lambda m, x: m.h(x.clone().to(torch.float32)),
    "clamp_pow": lambda m, x: m.h(x.clamp(-1, 1).pow(2) + x.abs().sqrt()),
    "scalar_arith": lambda m, x: m.h(2 - x / 3 + x * x),
    "exp_log": lambda m, x: m.h(torch.log1p(torch.exp(-x.abs()))),
    "max_min_branches": lambda m, x: m.h(torch.maximum(x, -x) - torch.minimum(x, x * 0.5)),
    "rsqrt": lambda m, x: m.h(torch.rsqrt(x * x + 1)),
    "in_place": lambda m, x: m.h(F.relu(x, inplace=True).add_(1)),
}


def functional_net(name: str) -> Lambda:
    """An op of ``FUNCTIONAL`` between a pooled stem and the head (11x11 patches)."""
    return Lambda(
        lambda m, x: FUNCTIONAL[name](m, m.p(x)).flatten(1), p=nn.MaxPool2d(2), h=head(8, 4)
    )


# -- pooling corner cases -----------------------------------------------------------------------

POOLS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "overlapping_max": (lambda: seq(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2), head(4, 3)), 9),
    "avg_stride3": (lambda: seq(nn.Conv2d(3, 4, 3), nn.AvgPool2d(3), head(4, 2)), 8),
    "rect_kernel": (lambda: seq(nn.Conv2d(3, 4, 3), nn.MaxPool2d((2, 3)), head(4, (3, 2))), 8),
    "dilated_max": (
        lambda: seq(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, 2, dilation=2), head(4, 3)),
        9,
    ),
    "divisor_override": (
        lambda: seq(nn.Conv2d(3, 4, 3), nn.AvgPool2d(2, divisor_override=3), head(4, 3)),
        8,
    ),
    "lazy_odd_rows": (lambda: seq(nn.Conv2d(3, 4, 2), nn.MaxPool2d(2), head(4, 3)), 8),
    "adaptive_regular": (
        lambda: seq(nn.Conv2d(3, 4, 3), nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)),
        7,
    ),  # 5 -> 2: windows of 3, stride 2
    "adaptive_avg_even": (lambda: seq(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(3), head(4, 3)), 8),
    "global_sum": (
        lambda: Lambda(
            lambda m, x: m.h(x.sum((2, 3), keepdim=True)).flatten(1), h=nn.Conv2d(8, 3, 1)
        ),
        6,
    ),
    "global_size_arg": (
        lambda: Lambda(
            lambda m, x: m.h(F.avg_pool2d(x, x.size()[2:])).flatten(1), h=nn.Conv2d(8, 3, 1)
        ),
        7,
    ),
    "repeated_axis_max_mean": (
        lambda: Lambda(lambda m, x: m.fc(x.amax(-1).mean(-1)), fc=nn.Linear(8, 3)),
        6,
    ),
    "axis_reductions_keepdim": (
        lambda: Lambda(
            lambda m, x: m.h(x.mean(3, keepdim=True).amax(2, keepdim=True)).flatten(1),
            h=nn.Conv2d(8, 3, 1),
        ),
        6,
    ),
    "lp_pool": (lambda: seq(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.LPPool2d(2, 2), head(4, 3)), 8),
    "lp_pool_3_overlapping": (
        lambda: seq(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.LPPool2d(3, 3, stride=2), head(4, 2)),
        8,
    ),
    "strided_conv_3": (lambda: seq(nn.Conv2d(3, 4, 3, stride=3), nn.ReLU(), head(4, 3)), 9),
    "stride_one_axis": (lambda: seq(nn.Conv2d(3, 4, 3, stride=(2, 1)), head(4, (3, 6))), (7, 8)),
}


# -- heads --------------------------------------------------------------------------------------

HEADS: dict[str, Callable[[], nn.Module]] = {
    "flatten_linear": lambda: seq(pooled_stem(), nn.Flatten(), nn.Linear(72, 3)),
    "view_size0": lambda: Lambda(
        lambda m, x: m.fc(m.s(x).view(x.size(0), -1)),
        stem=nn.Identity(),
        s=pooled_stem(),
        fc=nn.Linear(72, 3),
    ),
    "squeeze_view": lambda: Lambda(
        lambda m, x: m.fc(m.c(m.s(x)).squeeze().view(-1, 16)),
        stem=nn.Identity(),
        s=pooled_stem(),
        c=nn.Conv2d(8, 16, 3),
        fc=nn.Linear(16, 3),
    ),
    "unsqueeze_head": lambda: Lambda(
        lambda m, x: m.fc(m.s(x).flatten(1))[:, :, None, None],
        stem=nn.Identity(),
        s=pooled_stem(),
        fc=nn.Linear(72, 3),
    ),
    "unsqueeze_method": lambda: Lambda(
        lambda m, x: m.fc(m.s(x).flatten(1)).unsqueeze(-1).unsqueeze(-1),
        stem=nn.Identity(),
        s=pooled_stem(),
        fc=nn.Linear(72, 3),
    ),
    "bn1d_mlp": lambda: seq(
        pooled_stem(),
        nn.Flatten(),
        nn.Linear(72, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 3),
        nn.Softmax(dim=1),
    ),
    "log_softmax_vector": lambda: Lambda(
        lambda m, x: F.log_softmax(m.h(m.s(x)).flatten(1), -1),
        stem=nn.Identity(),
        s=pooled_stem(),
        h=head(),
    ),
    "gap_linear_sigmoid": lambda: seq(
        pooled_stem(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3), nn.Sigmoid()
    ),
    "softmax2d_map_head": lambda: seq(pooled_stem(), head(), nn.Softmax2d()),
}


# -- branches, crops and channel ops -------------------------------------------------------------


def _crop_residual(m: Any, x: torch.Tensor) -> torch.Tensor:
    y = m.b(F.relu(m.a(x)))
    return m.h(y + x[:, :, 2:-2, 2:-2]).flatten(1)


def _crop_cat(m: Any, x: torch.Tensor) -> torch.Tensor:
    y = m.a(x)
    return m.h(torch.cat([x[..., 1:-1, 1:-1], y], dim=1)).flatten(1)


def _channel_slice(m: Any, x: torch.Tensor) -> torch.Tensor:
    return m.h(x[:, :4] * torch.sigmoid(x[:, 4:])).flatten(1)


def _chunk_glu(m: Any, x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return m.h(torch.cat([F.glu(x, dim=1), a - b], 1)).flatten(1)


def _split(m: Any, x: torch.Tensor) -> torch.Tensor:
    a, b = torch.split(x, [3, 5], dim=1)
    return m.h(torch.cat([b, a], 1)).flatten(1)


def _channel_stats(m: Any, x: torch.Tensor) -> torch.Tensor:
    mu = x.mean(1, keepdim=True)
    sd = (x - mu).pow(2).mean(dim=1, keepdim=True).add(1e-5).sqrt()
    return m.h((x - mu) / sd + x.amax(1, keepdim=True) + x.sum(1, keepdim=True)).flatten(1)


def _normalize(m: Any, x: torch.Tensor) -> torch.Tensor:
    return m.h(F.normalize(x, dim=1) + m.lrn(x)).flatten(1)


def _multi_depth(m: Any, x: torch.Tensor) -> torch.Tensor:
    deep = m.d(m.p(x))
    return m.fc(torch.cat([x.mean((2, 3)), deep.amax((2, 3))], 1))


def _hypercolumn_sum(m: Any, x: torch.Tensor) -> torch.Tensor:
    deep = m.d(m.p(x))
    return m.fc(x.mean((2, 3)) + deep.mean((2, 3)))


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt block: depthwise conv, LayerNorm and Linears channels last, residual crop."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.ln = nn.LayerNorm(8)
        self.pw1 = nn.Linear(8, 16)
        self.pw2 = nn.Linear(16, 8)
        self.h = nn.Conv2d(8, 3, 3)
        self.out_norm = nn.LayerNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.ln(y)))).softmax(-1).permute(0, 3, 1, 2)
        return self.out_norm(self.h(y + x[:, :, 1:-1, 1:-1]).flatten(1))


def _layer_norm_functional(m: Any, x: torch.Tensor) -> torch.Tensor:
    y = F.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)
    return m.h(y).flatten(1)


def _centre_crop_input(m: Any, x: torch.Tensor) -> torch.Tensor:
    return m.h(x).flatten(1)


BRANCHES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "crop_residual": (
        lambda: Lambda(_crop_residual, a=nn.Conv2d(8, 8, 3), b=nn.Conv2d(8, 8, 3), h=head(8, 3)),
        9,
    ),
    "crop_cat": (lambda: Lambda(_crop_cat, a=nn.Conv2d(8, 4, 3), h=head(12, 3)), 7),
    "channel_slice": (lambda: Lambda(_channel_slice, h=head(4, 3)), 5),
    "chunk_glu": (lambda: Lambda(_chunk_glu, h=head(8, 3)), 5),
    "split_sizes": (lambda: Lambda(_split, h=head(8, 3)), 5),
    "channel_stats": (lambda: Lambda(_channel_stats, h=head(8, 3)), 5),
    "normalize_lrn": (lambda: Lambda(_normalize, lrn=nn.LocalResponseNorm(3), h=head(8, 3)), 5),
    "multi_depth_heads": (
        lambda: Lambda(_multi_depth, p=nn.MaxPool2d(2), d=nn.Conv2d(8, 8, 2), fc=nn.Linear(16, 3)),
        8,
    ),
    "hypercolumn_sum": (
        lambda: Lambda(
            _hypercolumn_sum, p=nn.MaxPool2d(2), d=nn.Conv2d(8, 8, 2), fc=nn.Linear(8, 3)
        ),
        8,
    ),
    "centre_crop_input": (lambda: Lambda(_centre_crop_input, stem=CropInput(2), h=head(3, 5)), 9),
    "convnext_block": (ConvNeXtBlock, 10),
    "layer_norm_functional": (lambda: Lambda(_layer_norm_functional, h=head(8, 3)), 5),
    "channel_shuffle": (lambda: seq(nn.Conv2d(3, 8, 3), nn.ChannelShuffle(2), head(8, 3)), 5),
}


class CropInput(nn.Module):
    def __init__(self, margin: int) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.margin
        return x[:, :, m:-m, m:-m]


# -- forward-time idioms the front end must follow ----------------------------------------------


class Hooked(nn.Module):
    """A forward hook on a submodule and a pre-hook on the model."""

    def __init__(self) -> None:
        super().__init__()
        self.body = pooled_stem()
        self.h = head()
        self.body[1].register_forward_hook(lambda m, i, o: o * 0.5 + 0.1)
        self.register_forward_pre_hook(lambda m, i: (i[0] * 2,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(self.body(x)).flatten(1)


class Asserting(nn.Module):
    """Shape assertions in forward (Python assert and torch._assert)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = pooled_stem()
        self.h = head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == 10, "expects 10x10 patches"
        torch._assert(x.shape[1] == 3, "RGB")
        return self.h(self.body(x)).flatten(1)


class FunctionalConv(nn.Module):
    """F.conv2d with positional, keyword and string-padding argument styles."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(4))
        self.w2 = nn.Parameter(torch.randn(4, 4, 2, 2) * 0.3)
        self.w3 = nn.Parameter(torch.randn(3, 4, 3, 3) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.w1, self.b1, 1, 0, 1, 1))
        x = F.max_pool2d(F.conv2d(input=x, weight=self.w2, stride=1), 2)
        return F.conv2d(x, self.w3, padding="valid").flatten(1)


class Spellings(nn.Module):
    """Ops that each front end spells its own way, all resolved from one op-table entry: the
    function torch.sin, the method x.erfc(), F.tanhshrink, and channel reductions whose dim
    follows self (logsumexp, amin; aten's too)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(10, 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = torch.sin(x) + x.erfc() + F.tanhshrink(x)
        x = torch.cat([x, torch.logsumexp(x, 1, keepdim=True), torch.amin(x, 1, keepdim=True)], 1)
        return self.conv2(F.max_pool2d(x, 2)).flatten(1)


def weight_normed() -> nn.Sequential:
    model = seq(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 3, 4))
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        model[0] = nn.utils.weight_norm(model[0])  # the old API: a forward pre-hook
    return model


def parametrized() -> nn.Sequential:
    model = seq(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 3, 4))
    nn.utils.parametrizations.weight_norm(model[3])
    return model


IDIOMS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "hooks": (Hooked, 10),
    "shape_asserts": (Asserting, 10),
    "functional_conv": (FunctionalConv, 10),
    "old_weight_norm": (weight_normed, 10),
    "parametrization": (parametrized, 10),
    "spellings": (Spellings, 10),
}
