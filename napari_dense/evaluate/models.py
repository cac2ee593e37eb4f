"""Reference patch classifiers: the three benchmark networks (random weights unless trained).

All are unpadded, so their dense networks are exact.
"""

from __future__ import annotations

from torch import nn

__all__ = ["BENCHMARK_NETS", "fdfe15", "patchnet32", "vgg64"]


def fdfe15(num_classes: int = 113) -> nn.Sequential:
    """The 15×15 one-channel network of the FDFE paper's example (Bailer et al., 2017)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 128, 2), nn.ReLU(),
        nn.Conv2d(128, num_classes, 1),
    )  # fmt: skip


def patchnet32(num_classes: int = 2, in_channels: int = 3) -> nn.Sequential:
    """A 32×32 RGB patch classifier with a flatten + Linear head and softmax output."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128 * 4 * 4, 256), nn.ReLU(),
        nn.Linear(256, num_classes), nn.Softmax(dim=1),
    )  # fmt: skip


def _vgg_block(cin: int, cout: int, kernels: tuple[int, int]) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernels[0]), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, kernels[1]), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.MaxPool2d(2),
    ]  # fmt: skip


def vgg64(num_classes: int = 3, in_channels: int = 3) -> nn.Sequential:
    """A 64×64 VGG-like RGB classifier: four conv-BN-ReLU blocks, then a Linear head.

    The two convolutions of the blocks have kernels (3, 3), (3, 5), (3, 3), (3, 1) (square),
    which reduce the 64×64 patch to a 256×1×1 map: 64→60→30→24→12→8→4→2→1.
    """
    return nn.Sequential(
        *_vgg_block(in_channels, 32, (3, 3)),
        *_vgg_block(32, 64, (3, 5)),
        *_vgg_block(64, 128, (3, 3)),
        *_vgg_block(128, 256, (3, 1)),
        nn.Flatten(),
        nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )  # fmt: skip


#: name -> (constructor, patch size, input channels)
BENCHMARK_NETS = {
    "15x15": (fdfe15, 15, 1),
    "32x32": (patchnet32, 32, 3),
    "64x64": (vgg64, 64, 3),
}
