"""The self-check every conversion runs: it catches what would otherwise be silently wrong."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import ATOL, oracle_valid
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import napari_dense as nd
from napari_dense.convert import ConversionError, _ops
from napari_dense.convert.cover import phase_cover
from napari_dense.convert.dense import DenseClassifier
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
    # Two 2x2 pools (input lattices 1 and 2): phases met within 2 px of the origin, so the
    # images are 15 + 2 px; 5 positions cover them (the first, the last and 3 more), and a
    # few random ones more (a cheap net).
    assert 5 <= verified.positions <= 5 + 4 and verified.input_size == (17, 17)
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


def _stack(strides: list[tuple[int, int]]) -> list[tuple[tuple[int, int], tuple[int, int], list]]:
    """Sequential striding layers, every phase computed: (input lattice, stride, phases)."""
    layers, lattice = [], (1, 1)
    for s in strides:
        layers.append((lattice, s, [(a, b) for a in range(s[0]) for b in range(s[1])]))
        lattice = (lattice[0] * s[0], lattice[1] * s[1])
    return layers


def _met(layers: list, positions: list[tuple[int, int]]) -> set:
    """Every (layer, phase) the positions meet, counted here independently of the cover."""
    return {
        (k, ((y // c[0]) % s[0], (x // c[1]) % s[1]))
        for y, x in positions
        for k, (c, s, _) in enumerate(layers)
    }


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 4), st.integers(1, 4)).filter(lambda s: s != (1, 1)),
        min_size=1,
        max_size=4,
    )
)
def test_phase_cover_meets_every_phase_of_random_stride_stacks(strides: list) -> None:
    layers = _stack(strides)
    positions, grid, covered = phase_cover(layers)
    needed = {(k, ph) for k, (_, _, phases) in enumerate(layers) for ph in phases}
    assert covered and _met(layers, positions) == needed
    # The grid is the smallest that holds every digit: max((s - 1) * c) + 1 per axis.
    for axis in (0, 1):
        assert grid[axis] == max(2, max((s[axis] - 1) * c[axis] for c, s, _ in layers) + 1)
    assert all(0 <= i < grid[0] and 0 <= j < grid[1] for i, j in positions)
    assert positions[0] == (0, 0) and positions[1] == (grid[0] - 1, grid[1] - 1)
    # One position meets a phase of every layer at once: about max(sy) * max(sx) positions
    # (the first and the last, then the greedy cover), not the product of the strides.
    largest = max(s[0] for s in strides) * max(s[1] for s in strides)
    assert len(positions) <= largest + 2


@pytest.mark.parametrize(
    ("strides", "side"), [((2, 3, 4), 3 * 6 + 1), ((2, 2, 2, 2), 1 * 8 + 1), ((3, 3), 2 * 3 + 1)]
)
def test_phase_cover_of_the_named_stacks_is_small(strides: tuple[int, ...], side: int) -> None:
    layers = _stack([(s, s) for s in strides])
    positions, grid, covered = phase_cover(layers)
    assert covered and grid == (side, side)
    assert len(positions) <= max(strides) ** 2 + 2  # the product would be 576, 256, 81


def _strided_net(strides: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    """Conv-pool stages with the given pool strides, reduced to 1x1; and its patch size."""
    layers: list[nn.Module] = []
    for k, s in enumerate(strides):
        layers += [nn.Conv2d(1 if k == 0 else 3, 3, 2), nn.ReLU(), nn.MaxPool2d(s)]
    layers.append(nn.Conv2d(3, 2, 2))
    size = 2  # from the 1x1 output back to the patch
    for s in reversed(strides):
        size = size * s + 1
    torch.manual_seed(0)
    return nn.Sequential(*layers).eval(), size


@pytest.mark.parametrize("strides", [(2, 3, 4), (2, 2, 2, 2), (3, 3)])
def test_a_wrong_output_at_any_single_phase_is_caught(
    strides: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Corrupt the dense output only where one layer is at one phase: every such bug is caught."""
    model, patch = _strided_net(strides)
    plan = nd.densify(model, patch).plan
    assert plan.verified is not None and plan.verified.phases_covered
    real = DenseClassifier.forward
    lattice = 1
    for s in strides:
        for a, b in [(0, 0), (s - 1, 0), (s - 1, s - 1), (1, s - 2)]:

            def wrong(self: DenseClassifier, x: torch.Tensor, c=lattice, s=s, a=a, b=b):
                out = real(self, x).clone()
                ys = (torch.arange(out.shape[2]) // c) % s == a
                xs = (torch.arange(out.shape[3]) // c) % s == b
                out[:, :, ys[:, None] & xs[None, :]] += 0.5
                return out

            monkeypatch.setattr(DenseClassifier, "forward", wrong)
            with pytest.raises(ConversionError, match="not exact although"):
                nd.densify(model, patch)
            monkeypatch.setattr(DenseClassifier, "forward", real)
        lattice *= s
