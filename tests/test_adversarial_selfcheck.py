"""The self-check every conversion runs: it catches what would otherwise be silently wrong."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import ATOL, oracle_valid
from torch import nn

import napari_dense as nd
from napari_dense.convert import ConversionError, _ops
from napari_dense.evaluate.models import fdfe15


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 2),
    )  # fmt: skip


def _double_conv_outputs(module: nn.Module, inputs: object, output: torch.Tensor) -> object:
    return output * 2 if isinstance(module, nn.Conv2d) else None


def test_global_forward_hook_is_caught_by_the_self_check_and_names_the_node() -> None:
    model = _net().eval()
    handle = nn.modules.module.register_module_forward_hook(_double_conv_outputs)
    try:
        first = r"first map that differs is node '_0' \(module '0', Conv2d\)"
        with pytest.raises(ConversionError, match=first):
            nd.densify(model, 14)
        # Without the self-check the same conversion is silently wrong.
        dense = nd.densify(model, 14, verify=False)
        x = torch.rand(1, 1, 18, 18)
        with torch.no_grad():
            got = dense(x).numpy()
        assert np.abs(got - oracle_valid(model, x, (14, 14))).max() > 10 * ATOL
    finally:
        handle.remove()


def test_converter_bug_in_a_dense_op_is_caught_and_localised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = _ops.dense_pool2d

    def off_by_a_bit(x: torch.Tensor, kind: str, *args: object) -> torch.Tensor:
        return real(x, kind, *args) + 0.01  # type: ignore[arg-type]

    monkeypatch.setattr(_ops, "dense_pool2d", off_by_a_bit)
    with pytest.raises(ConversionError, match=r"node '_2' \(module '2', MaxPool2d\)"):
        nd.densify(_net(), 14)
    dense = nd.densify(_net(), 14, verify=False)  # unchecked: returned, wrong
    assert dense.plan.verified is None and dense.exact


def test_verified_plan_records_max_deviation_and_positions() -> None:
    dense = nd.densify(fdfe15(num_classes=5), 15)
    verified = dense.plan.verified
    assert verified is not None and verified.passed and verified.phases_covered
    assert verified.max_abs_diff <= 1e-5 and verified.batch == 2
    # Two 2x2 pools: 4 phases each, first and last positions, a few random ones.
    assert 6 <= verified.positions <= 40 and verified.input_size == (19, 19)
    text = str(nd.explain(fdfe15(num_classes=5), 15))
    assert "self-check: max |Δ|" in text and "every phase of every striding layer" in text
    assert dense.plan.as_dict()["verified"]["positions"] == verified.positions


def test_verify_false_skips_the_check_and_says_so() -> None:
    plan = nd.explain(_net(), 14, verify=False)
    assert plan.verified is None and "self-check: not run (verify=False)" in str(plan)


def test_padded_model_records_the_measured_deviation_in_its_one_warning() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dense = nd.densify(model, 8)
    assert len(caught) == 1 and "self-check: max |Δ|" in str(caught[0].message)
    assert dense.plan.verified is not None and not dense.plan.verified.passed
    assert not dense.exact


@pytest.mark.parametrize("sampling", ["none", "checkered", {"2": "all", "5": "none"}])
def test_every_sampling_is_certified(sampling: object) -> None:
    plan = nd.densify(_net(), 14, sampling=sampling).plan  # type: ignore[arg-type]
    assert plan.verified is not None and plan.verified.passed
