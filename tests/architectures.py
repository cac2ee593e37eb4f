"""Patch classifiers covering what the converter must handle (random weights, all unpadded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_dense.evaluate.models import fdfe15, patchnet32, vgg64


class FunctionalNet(nn.Module):
    """A custom forward with functional calls and x.view(x.size(0), -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.fc = nn.Linear(8 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(torch.tanh(self.conv2(x)), kernel_size=2, stride=2)
        x = x.view(x.size(0), -1)
        return torch.sigmoid(self.fc(x))


class ResidualAddNet(nn.Module):
    """Two branches joined by add, after a strided conv; a global-average-pooling head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.a1 = nn.Conv2d(8, 8, 3)
        self.a2 = nn.Conv2d(8, 8, 3)
        self.b = nn.Conv2d(8, 8, 5)
        self.pool = nn.MaxPool2d(3, stride=2)  # overlapping
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.a2(F.relu(self.a1(x))) + self.b(x)
        x = self.pool(x)
        x = x.mean((2, 3))
        return F.log_softmax(self.head(x), dim=-1)


class ConcatNet(nn.Module):
    """Two strided branches (max pool, strided conv) joined by concat, amax head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3)
        self.branch_pool = nn.MaxPool2d(2)
        self.branch_conv = nn.Conv2d(4, 4, 2, stride=2)
        self.conv = nn.Conv2d(8, 6, 3, groups=2)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.cat([self.branch_pool(x), self.branch_conv(x)], dim=1)
        x = self.conv(x).amax(dim=(2, 3), keepdim=True)
        return self.out(x)


def strided_convs() -> nn.Sequential:
    """Strided convolutions of stride 2 and 3, a dilated conv, adaptive max pooling head."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=3), nn.ReLU(),
        nn.Conv2d(8, 8, 2, dilation=2), nn.GELU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip


def avg_pool_drops_rows() -> nn.Sequential:
    """Rectangular patch 12×17: avg pools that drop an odd row/column, a 2×3 Linear head."""
    return nn.Sequential(
        nn.Conv2d(2, 6, 3), nn.ReLU(), nn.AvgPool2d(2),  # 10x15 -> 5x7 (drops a column)
        nn.Conv2d(6, 6, 2), nn.ELU(), nn.AvgPool2d(2),  # 4x6 -> 2x3
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(6 * 2 * 3, 3),
    )  # fmt: skip


def batchnorm_linear_head() -> nn.Sequential:
    """BatchNorm2d and BatchNorm1d, two Linear layers, LogSoftmax; overlapping avg pool."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
        nn.AvgPool2d(3, stride=2),  # 14 -> 6
        nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.SiLU(),  # 6 -> 4
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 4), nn.LogSoftmax(dim=1),
    )  # fmt: skip


def global_avg_head() -> nn.Sequential:
    """Even patch with a global average pooling head and 1×1 output."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2, stride=2),
        nn.Conv2d(4, 4, 3), nn.Sigmoid(), nn.AdaptiveAvgPool2d((1, 1)), nn.Conv2d(4, 3, 1),
    )  # fmt: skip


#: name -> (factory, patch size, input channels, image size (H, W))
ARCHITECTURES = {
    "fdfe15": (lambda: fdfe15(num_classes=7), (15, 15), 1, (27, 33)),
    "patchnet32": (patchnet32, (32, 32), 3, (37, 41)),
    "vgg64": (lambda: vgg64(), (64, 64), 3, (69, 67)),
    "functional": (FunctionalNet, (14, 14), 2, (21, 19)),
    "residual_add": (ResidualAddNet, (21, 21), 3, (29, 26)),
    "concat": (ConcatNet, (10, 10), 1, (17, 23)),
    "strided_convs": (strided_convs, (19, 19), 3, (27, 30)),
    "avg_drops_rows": (avg_pool_drops_rows, (12, 17), 2, (19, 25)),
    "batchnorm_linear": (batchnorm_linear_head, (16, 16), 3, (23, 21)),
    "global_avg": (global_avg_head, (12, 12), 1, (19, 15)),
}
