"""``benchmarks.demo_training.train_baseline``: the in-run baseline loop every demo driver shares."""

from __future__ import annotations

import pytest

from benchmarks import demo_training


@pytest.fixture
def clock(monkeypatch):
    """A clock that only the training steps advance, one second each, so the budget is counted in steps."""
    now = [100.0]
    monkeypatch.setattr(demo_training.time, "perf_counter", lambda: now[0])
    return now


def test_train_baseline_stops_at_its_budget_validates_and_keeps_the_best(clock):
    val_scores = iter([5.0, 7.0, 6.0])
    saved, steps = [], []

    def step(batch):
        clock[0] += 1.0
        steps.append(batch)
        return 0.5

    curve = demo_training.train_baseline(loader=range(8), step=step, validate=lambda: next(val_scores),
                                         save=saved.append, budget_s=25.0, val_every=10, name="unit")
    # 25 one-second steps over an 8-batch loader (restarted when exhausted), then the budget stops it
    assert curve["iterations"] == 25 and steps == (list(range(8)) * 4)[:25]
    # every val_every iterations and once more when the budget is spent
    assert curve["val_iteration"] == [10, 20, 25] and curve["val_psnr"] == [5.0, 7.0, 6.0]
    assert saved == [10, 20] and curve["best_val_psnr"] == 7.0  # saved only when validation improved
    assert curve["iteration"] == [10, 20] and curve["loss"] == [0.5, 0.5] and curve["wall_s"] == 25.0


def test_train_baseline_counts_the_budget_from_the_given_start(clock):
    """A driver that built its data first passes its own start: the setup is part of the budget."""
    def step(batch):
        clock[0] += 1.0
        return 1.0

    curve = demo_training.train_baseline(range(4), step, lambda: 1.0, lambda it: None, budget_s=10.0, val_every=100,
                                         name="unit", started=clock[0] - 7.0)
    assert curve["iterations"] == 3 and curve["val_iteration"] == [3] and curve["wall_s"] == 10.0
