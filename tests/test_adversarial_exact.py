"""Adversarial suite, exact outcomes: each dense network equals the oracle within 1e-4.

Every case is converted with the self-check on (``plan.verified`` must pass) and then compared
with :func:`napari_dense.evaluate.reference.patchwise` on a random image of its own (batch of two).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ATOL, oracle_valid, randomize_batchnorm
from test_adversarial_zoo import (
    ACTIVATIONS,
    BRANCHES,
    FUNCTIONAL,
    HEADS,
    IDIOMS,
    POOLS,
    activation_net,
    functional_net,
    janowczyk32,
    simo_serra64,
    uninformed_students,
)
from torch import nn

import napari_dense as nd
from napari_dense.convert.geometry import pair
from napari_dense.evaluate.models import fdfe15, patchnet32

CASES: dict[str, tuple[Callable[[], nn.Module], Any, int]] = {
    "fdfe15": (lambda: fdfe15(num_classes=5), 15, 1),
    "patchnet32": (patchnet32, 32, 3),
    "students17": (lambda: uninformed_students(17), 17, 3),
    "students33": (lambda: uninformed_students(33), 33, 3),
    "students65": (lambda: uninformed_students(65), 65, 3),
    "janowczyk32": (janowczyk32, 32, 3),
    "simo_serra64": (simo_serra64, 64, 1),
    **{f"act_{name}": (lambda n=name: activation_net(n), 10, 3) for name in ACTIVATIONS},
    **{f"fn_{name}": (lambda n=name: functional_net(n), 11, 3) for name in FUNCTIONAL},
    **{f"pool_{name}": (factory, patch, 3) for name, (factory, patch) in POOLS.items()},
    **{f"head_{name}": (factory, 10, 3) for name, factory in HEADS.items()},
    **{f"branch_{name}": (factory, patch, 3) for name, (factory, patch) in BRANCHES.items()},
    **{f"idiom_{name}": (factory, patch, 3) for name, (factory, patch) in IDIOMS.items()},
}


def _check_exact(model: nn.Module | Any, patch: Any, channels: int, *, oracle: Any = None) -> None:
    ph, pw = pair(patch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: no warning at all
        dense = nd.densify(model, patch)
    assert dense.exact and dense.plan.verified is not None and dense.plan.verified.passed
    x = torch.rand(2, channels, ph + 5, pw + 4)
    with torch.no_grad():
        got = dense(x).numpy()
    expected = oracle_valid(oracle if oracle is not None else model, x, (ph, pw))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact(name: str) -> None:
    factory, patch, channels = CASES[name]
    torch.manual_seed(0)
    model = randomize_batchnorm(factory()).eval()
    _check_exact(model, patch, channels)


def test_exported_program_with_fixed_batch_one_and_the_oracle_on_it() -> None:
    model = activation_net("gelu").eval()
    program = torch.export.export(model, (torch.zeros(1, 3, 10, 10),))
    _check_exact(program, 10, 3, oracle=program)  # patchwise runs batches > 1 on it


def test_exported_program_with_dynamic_batch() -> None:
    model = janowczyk32().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    _check_exact(program, 32, 3, oracle=program)


def test_exported_program_of_a_hooked_model() -> None:
    model = IDIOMS["hooks"][0]().eval()
    _check_exact(torch.export.export(model, (torch.zeros(1, 3, 10, 10),)), 10, 3, oracle=model)


def test_rectangular_patch_with_explicit_in_channels() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.MaxPool2d(2), nn.Conv2d(6, 2, (3, 5))).eval()
    dense = nd.densify(model, (9, 13), in_channels=4)
    assert dense.in_channels == 4 and dense.plan.verified is not None
    _check_exact(model, (9, 13), 4)


def test_model_left_in_training_mode_is_converted_in_eval_and_keeps_its_mode() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 3, 4),
    ).train()  # fmt: skip
    randomize_batchnorm(model)
    nd.densify(model, 10)
    assert model.training and model[1].training
    _check_exact(model.eval(), 10, 3)


def test_model_without_conv_gets_its_channels_from_the_graph_input() -> None:
    model = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    assert nd.densify(model, 8).in_channels == 2
    _check_exact(model, 8, 2)


#: Exported as torch.export programs (aten graphs), every op class converts the same, except
#: LocalResponseNorm (aten views it as 5D) and a squeeze() that a batch-1 export applies to the
#: batch too: refused (tests/test_adversarial_refused.py).
EXPORTED = sorted(
    name
    for name in CASES
    if name.split("_")[0] in ("branch", "head", "pool", "idiom")
    and name not in ("branch_normalize_lrn", "head_squeeze_view")
)


@pytest.mark.parametrize("name", EXPORTED)
def test_exact_as_exported_program(name: str) -> None:
    factory, patch, channels = CASES[name]
    torch.manual_seed(0)
    model = randomize_batchnorm(factory()).eval()
    ph, pw = pair(patch)
    program = torch.export.export(model, (torch.zeros(1, channels, ph, pw),))
    _check_exact(program, patch, channels, oracle=model)
