"""Train the demo patch classifiers on scikit-image's IHC image (offline, 2 CPU cores, < 5 min).

``python -m napari_dense.demo.train [--out napari_dense/demo/models]`` writes, for each model,
a ``.pt2`` (torch.export) with its metadata sidecar ``.yaml`` (patch size, channels, class names,
normalisation, activation, held-out accuracy, training command):

- ``ihc_patchnet``: no padding, so its dense network is exact.
- ``ihc_selecsls``: a small SelecSLS-style network with "same" padding (strided 3×3 convolutions,
  concatenation skips, global pooling): the not-exact path, whose deviation the Compare panel
  measures.

Labels come from colour deconvolution (:func:`napari_dense.demo.labels.ihc_labels`) on the left
part of the image; the right part (after a gap of one patch, so no training patch overlaps it) is
held out for the accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data
from torch import nn

from napari_dense.demo.labels import CLASS_NAMES, ihc_labels
from napari_dense.evaluate.reference import patchwise

__all__ = ["IhcPatchNet", "IhcSelecSLS", "main", "train"]

PATCH = 24
TRAIN_COLUMNS = 300  # columns [0, 300) train; [300 + PATCH, 512) are held out


class IhcPatchNet(nn.Sequential):
    """Unpadded 24×24 RGB patch classifier: 24 → 22 → 11 → 9 → 4 → 2 → 1."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__(
            nn.Conv2d(3, 16, 3),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.Conv2d(64, 64, 2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, classes),
        )


class _SelecBlock(nn.Module):
    """A SelecSLS-style block: two convs (the first strided) and a concatenation skip."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(2 * cout, cout, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down(x)
        return self.fuse(torch.cat([down, self.conv(down)], dim=1))


class IhcSelecSLS(nn.Module):
    """ "Same"-padded 24×24 classifier (not exact densely): stem, two blocks, global pooling."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.block1 = _SelecBlock(8, 16)
        self.block2 = _SelecBlock(16, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def _patches(image: np.ndarray, centres: np.ndarray) -> torch.Tensor:
    """(N, 3, PATCH, PATCH) patches centred (FDFE convention) at ``centres`` of a padded image."""
    half = PATCH // 2
    padded = np.pad(
        image, ((half, PATCH - 1 - half), (half, PATCH - 1 - half), (0, 0)), mode="reflect"
    )
    rows = centres[:, 0, None] + np.arange(PATCH)
    cols = centres[:, 1, None] + np.arange(PATCH)
    batch = padded[rows[:, :, None], cols[:, None, :]]  # (N, P, P, 3)
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))


def _balanced_centres(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` training pixels, the same number from each class."""
    per_class = count // len(CLASS_NAMES)
    picks = []
    for k in range(len(CLASS_NAMES)):
        ys, xs = np.nonzero(labels[:, :TRAIN_COLUMNS] == k)
        chosen = rng.choice(len(ys), per_class, replace=len(ys) < per_class)
        picks.append(np.stack([ys[chosen], xs[chosen]], axis=1))
    return np.concatenate(picks)


def normalisation_of(image: np.ndarray) -> dict[str, object]:
    """``(x * scale - mean) / std`` per channel, from the training region."""
    region = image[:, :TRAIN_COLUMNS].reshape(-1, 3) / 255.0
    return {
        "scale": 1 / 255,
        "mean": region.mean(0).round(4).tolist(),
        "std": region.std(0).round(4).tolist(),
    }


def train(
    model: nn.Module, *, samples: int = 30000, epochs: int = 4, seed: int = 0
) -> tuple[nn.Module, dict[str, float]]:
    """Train ``model`` on IHC patches; returns it (eval mode) and held-out accuracy figures."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    image = data.immunohistochemistry()
    labels = ihc_labels(image)
    norm = normalisation_of(image)
    normalised = ((image / 255.0 - norm["mean"]) / norm["std"]).astype(np.float32)
    centres = _balanced_centres(labels, samples, rng)
    inputs = _patches(normalised, centres)
    targets = torch.from_numpy(labels[centres[:, 0], centres[:, 1]])
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=4e-3, total_steps=epochs * (-(-samples // 256))
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs))
        for start in range(0, len(inputs), 256):
            batch = order[start : start + 256]
            loss = nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    model.eval()
    # Held-out accuracy on 6000 random pixels of the right part, by per-patch evaluation.
    ys = rng.integers(0, image.shape[0], 6000)
    xs = rng.integers(TRAIN_COLUMNS + PATCH, image.shape[1], 6000)
    positions = np.stack([ys, xs], axis=1)
    scores = patchwise(normalised, model, PATCH, channel_axis=-1, positions=positions)
    predicted = scores.argmax(0)
    truth = labels[ys, xs]
    accuracy = float((predicted == truth).mean())
    per_class = {
        CLASS_NAMES[k]: float((predicted[truth == k] == k).mean()) for k in range(len(CLASS_NAMES))
    }
    return model, {
        "held_out_accuracy": accuracy,
        **{f"recall_{k}": v for k, v in per_class.items()},
    }


def main(argv: list[str] | None = None) -> None:
    """Train both demo models and write them to ``--out``."""
    from napari_dense.model_files import ModelMetadata, save_classifier

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "models")
    parser.add_argument("--samples", type=int, default=30000)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    image = data.immunohistochemistry()
    command = "python -m napari_dense.demo.train " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    for name, factory, description in (
        ("ihc_patchnet", IhcPatchNet, "unpadded 24x24 patch classifier (exact dense network)"),
        ("ihc_selecsls", IhcSelecSLS, "'same'-padded SelecSLS-style network (not exact)"),
    ):
        start = time.perf_counter()
        model, scores = train(factory(), samples=args.samples, epochs=args.epochs)
        seconds = time.perf_counter() - start
        metadata = ModelMetadata(
            name=name,
            description=f"{description}; trained on scikit-image's immunohistochemistry image "
            "with colour-deconvolution labels",
            patch_size=(PATCH, PATCH),
            in_channels=3,
            class_names=list(CLASS_NAMES),
            normalisation=normalisation_of(image),
            activation="softmax",
            accuracy=scores,
            training_command=command.strip(),
        )
        save_classifier(model, args.out / f"{name}.pt2", metadata=metadata, sidecar=True)
        print(
            f"{name}: held-out accuracy {scores['held_out_accuracy']:.3f} "
            f"({', '.join(f'{k} {v:.3f}' for k, v in scores.items() if k.startswith('recall'))}) "
            f"in {seconds:.0f} s -> {args.out / (name + '.pt2')}"
        )


if __name__ == "__main__":
    main()
