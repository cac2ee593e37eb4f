"""Shared test helpers: every exactness check goes through napari_dense.reference.patchwise."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

# napari's settings file for this test session only (read when napari is first imported):
# the writer's reader preferences and the plugin's configurations never reach the user's.
os.environ["NAPARI_CONFIG"] = str(Path(tempfile.mkdtemp(prefix="napari-dense-tests-")) / "s.yaml")

import numpy as np
import pytest
import torch

from napari_dense.evaluate.reference import patchwise

ATOL = 1e-4  # float32, as the issue asks


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BatchNorm layers non-trivial statistics so that eval mode really matters."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(n, generator=generator))
            module.bias.data.copy_(torch.randn(n, generator=generator))
    return model


def oracle_valid(model: torch.nn.Module, x: torch.Tensor, patch: tuple[int, int]) -> np.ndarray:
    """The classifier on every full patch of each image of ``x`` (N, C, H, W) -> (N, K, H', W').

    Taken from the oracle's centre convention: the patch with top-left (i, j) is centred at
    (i + Ph // 2, j + Pw // 2).
    """
    ph, pw = patch
    height, width = x.shape[-2:]
    rows, cols = np.mgrid[: height - ph + 1, : width - pw + 1]
    centres = np.stack([rows.ravel() + ph // 2, cols.ravel() + pw // 2], axis=1)
    results = [
        patchwise(image, model, patch, channel_axis=0, border="constant", positions=centres)
        for image in x.numpy()
    ]
    return np.stack(results).reshape(len(x), -1, *rows.shape)


def computed_mask(dense: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Which points of a dense network's output grid (``shape``) hold computed samples."""
    if dense.sample_pattern is None:
        return np.ones(shape, dtype=bool)
    pattern = np.array(dense.sample_pattern)
    reps = (-(-shape[0] // pattern.shape[0]), -(-shape[1] // pattern.shape[1]))
    return np.tile(pattern, reps)[: shape[0], : shape[1]]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A two-class 15×15 FDFE net with fixed weights: the store and run tests' model (a test
    module may define its own)."""
    from napari_dense.evaluate.models import fdfe15

    torch.manual_seed(3)
    return fdfe15(num_classes=2).eval()


def saved_model_file(
    tmp_path_factory: Any,
    build: Any,
    patch: int,
    in_channels: int,
    class_names: list[str],
    **metadata: Any,
) -> tuple[torch.nn.Module, Path]:
    """A patch classifier built with seed 0 (``build()``), in eval mode, saved as ``.pt2`` with
    its metadata in a fresh folder: the model and its path (the GUI tests' model files)."""
    from napari_dense.model_files import ModelMetadata, save_classifier

    torch.manual_seed(0)
    model = build().eval()
    name = metadata.setdefault("name", "model")
    path = tmp_path_factory.mktemp("model") / f"{name}.pt2"
    info = ModelMetadata(
        patch_size=(patch, patch), in_channels=in_channels, class_names=class_names, **metadata
    )
    save_classifier(model, path, metadata=info)
    return model, path
