"""The speed/accuracy frontier: rows, errors against advanced, pick, Pareto flags, greedy, plot."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from napari_dense import InputError, predict
from napari_dense.evaluate.frontier import (
    LEVELS,
    METRICS,
    Frontier,
    FrontierRow,
    frontier,
    frontier_size,
    iter_frontier,
)
from napari_dense.evaluate.models import fdfe15
from tests.architectures import ConcatNet

LETTER = {"none": "N", "checkered": "C", "all": "A"}


def _image(size: int = 48, channels: int | None = None) -> np.ndarray:
    shape = (size, size) if channels is None else (channels, size, size)
    return np.random.default_rng(1).random(shape, dtype=np.float32)


def three_pools() -> nn.Sequential:
    """30×30 patch, three max pools (three layer groups): 30→28→14→12→6→4→2→1."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 3, 2),
    )  # fmt: skip


@pytest.fixture(scope="module")
def fdfe() -> tuple[nn.Module, np.ndarray, Frontier]:
    torch.manual_seed(0)
    model = fdfe15(num_classes=5).eval()
    image = _image()
    calls: list[tuple[int, int | None]] = []
    result = frontier(
        model, image, 15, device="cpu", repeats=1,
        progress=lambda done, total, row: calls.append((done, total)),
    )  # fmt: skip
    n = len(LEVELS) ** 2
    assert calls == [(done, n) for done in range(1, n + 1)]
    return model, image, result


def test_exhaustive_search_measures_every_combination(fdfe) -> None:
    model, _, result = fdfe
    n = len(LEVELS) ** 2
    assert result.search == "exhaustive" and result.layers == ("2", "5")
    assert len(result.rows) == n == frontier_size(model, 15)
    labels = {f"{LETTER[a]} {LETTER[b]}" for a, b in itertools.product(LEVELS, repeat=2)}
    assert {row.label for row in result.rows} == labels
    for row in result.rows:
        assert row.label == " ".join(LETTER[row.sampling[name]] for name in ("2", "5"))
        assert row.seconds > 0 and row.macs_per_pixel > 0 and 0 < row.density <= 1
    assert [row.seconds for row in result.rows] == sorted(row.seconds for row in result.rows)
    assert result.image_shape == (48, 48) and result.device == "cpu"


def test_advanced_is_the_zero_error_reference(fdfe) -> None:
    _, _, result = fdfe
    advanced = result.advanced
    assert advanced.label == "A A" and advanced.sampling == {"2": "all", "5": "all"}
    assert advanced.density == 1.0
    assert advanced.mean_abs_diff == advanced.p99_abs_diff == advanced.class_change == 0
    assert result.speedup(advanced) == 1.0
    # More exact pixels cost more multiply-adds.
    by_label = {row.label: row for row in result.rows}
    assert by_label["N N"].density < 1 and by_label["N N"].macs_per_pixel < advanced.macs_per_pixel


def test_errors_are_measured_against_advanced(fdfe) -> None:
    model, image, result = fdfe
    simple = next(row for row in result.rows if row.label == "N N")
    # Recomputed independently: probabilities (as the engine computes them) of simple and
    # advanced predictions.
    p_simple = torch.from_numpy(predict(image, model, 15, mode="simple", activation="softmax"))
    p_advanced = torch.from_numpy(predict(image, model, 15, activation="softmax"))
    diff = (p_simple - p_advanced).abs().numpy()
    changed = (p_simple.argmax(0) != p_advanced.argmax(0)).float().mean().item()
    assert simple.mean_abs_diff > 1e-5  # interpolation is not exact on a random image
    assert simple.mean_abs_diff == pytest.approx(float(diff.mean()), rel=1e-4)
    assert simple.p99_abs_diff == pytest.approx(float(np.percentile(diff, 99)), rel=1e-4)
    assert simple.class_change == pytest.approx(changed)


def test_checkered_lies_between_none_and_all(fdfe) -> None:
    _, _, result = fdfe
    by_label = {row.label: row for row in result.rows}
    none, checkered, full = by_label["N N"], by_label["C C"], by_label["A A"]
    assert none.density < checkered.density < full.density
    assert none.macs_per_pixel < checkered.macs_per_pixel < full.macs_per_pixel


def test_pick_is_the_fastest_row_within_the_budget(fdfe) -> None:
    _, _, result = fdfe
    for metric in METRICS:
        for budget in (0.0, 1e-4, 1e-3, 1e-2, 1.0):
            fastest = min(
                (row for row in result.rows if getattr(row, metric) <= budget),
                key=lambda row: row.seconds,
            )
            assert result.pick(budget, metric) == fastest
    zero = result.pick(0.0)
    assert zero.class_change == 0
    assert result.pick(1.0) == result.rows[0]  # everything qualifies: the fastest


def test_pick_refuses_unknown_metric_and_negative_budget(fdfe) -> None:
    _, _, result = fdfe
    with pytest.raises(InputError, match="metric must be one of class_change"):
        result.pick(0.01, "accuracy")
    with pytest.raises(InputError, match="error_budget must be a number >= 0"):
        result.pick(-0.1)


def test_pareto_flags_match_the_definition(fdfe) -> None:
    _, _, result = fdfe

    def dominated(row: FrontierRow) -> bool:
        return any(
            (other.seconds, other.class_change) != (row.seconds, row.class_change)
            and other.seconds <= row.seconds
            and other.class_change <= row.class_change
            for other in result.rows
        )

    assert [row.pareto for row in result.rows] == [not dominated(row) for row in result.rows]
    assert result.pareto_front() == tuple(row for row in result.rows if row.pareto)
    assert result.rows[0].pareto  # the fastest row is never dominated
    assert result.pick(1.0).pareto


def test_greedy_path_upgrades_the_best_group_until_advanced() -> None:
    torch.manual_seed(0)
    model = three_pools().eval()
    image = _image(32)
    rows: list[FrontierRow] = []  # in the order measured, as iter_frontier yields them
    result = frontier(
        model, image, 30, device="cpu", repeats=1, max_exhaustive=1,
        progress=lambda done, total, row: rows.append(row),
    )  # fmt: skip
    assert frontier_size(model, 30, max_exhaustive=1) == (None if len(LEVELS) == 3 else 7)
    names = ["2", "5", "8"]
    rank = {level: i for i, level in enumerate(LEVELS)}
    # Replay the greedy rule on the measured rows: the order they came in is the path.
    assert rows[0].label == "A A A" and rows[1].label == "N N N"
    by_label = {row.label: row for row in rows}
    assert len(by_label) == len(rows)  # nothing measured twice
    state, expected = rows[1], ["A A A", "N N N"]
    while state.label != "A A A":
        candidates = []
        for name in names:
            if state.sampling[name] != "all":
                sampling = dict(state.sampling, **{name: LEVELS[rank[state.sampling[name]] + 1]})
                label = " ".join(LETTER[sampling[n]] for n in names)
                candidates.append(by_label[label])
                if label != "A A A":
                    expected.append(label)

        def gain(row: FrontierRow, state: FrontierRow = state) -> tuple[float, float]:
            added = max(row.macs_per_pixel - state.macs_per_pixel, 1e-9)
            return (
                (state.class_change - row.class_change) / added,
                (state.mean_abs_diff - row.mean_abs_diff) / added,
            )

        state = max(candidates, key=gain)
    assert [row.label for row in rows] == expected
    assert result.search == "greedy" and result.advanced.class_change == 0
    assert len(result.rows) < len(LEVELS) ** 3


def test_tied_layers_share_one_group() -> None:
    torch.manual_seed(0)
    model = ConcatNet().eval()
    result = frontier(model, _image(24), 10, device="cpu", repeats=1, activation=None)
    assert result.layers == ("branch_pool+branch_conv",)
    assert len(result.rows) == len(LEVELS)
    for row in result.rows:
        assert row.sampling["branch_pool"] == row.sampling["branch_conv"]
        assert row.label == LETTER[row.sampling["branch_pool"]]


def test_region_and_argument_checks() -> None:
    torch.manual_seed(0)
    model = ConcatNet().eval()
    image = _image(40)
    result = frontier(model, image, 10, region=(4, 28, 8, 40), device="cpu", repeats=1)
    assert result.image_shape == (24, 32)
    with pytest.raises(InputError, match="region"):
        iter_frontier(model, image, 10, region=(0, 50, 0, 10))
    with pytest.raises(InputError, match="includes 'all'"):
        iter_frontier(model, image, 10, levels=("none",))
    with pytest.raises(InputError, match="activation"):
        iter_frontier(model, image, 10, activation="relu")
    with pytest.raises(InputError, match="patch_size is required"):
        iter_frontier(model, image)


def test_plot_writes_a_png(fdfe, tmp_path) -> None:
    from matplotlib.figure import Figure

    _, _, result = fdfe
    path = tmp_path / "frontier.png"
    figure = result.plot(path, picked=result.pick(0.01))
    assert isinstance(figure, Figure)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000
    ax = figure.axes[0]
    assert "class" in ax.get_xlabel() and "(s)" in ax.get_ylabel()
    # Into given axes (the napari panel draws into its own canvas).
    other = Figure()
    assert result.plot(ax=other.add_subplot()) is other
    assert "| A A |" in result.to_markdown()
