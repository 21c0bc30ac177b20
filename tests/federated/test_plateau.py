"""torch's ReduceLROnPlateau, as the trainer configures it, takes the decisions of the rule it replaced."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau


def _reference_rule(losses: list[float], lr: float, patience: int, factor: float, min_lr: float) -> list[float]:
    """The hand-written rule: after ``patience`` rounds without a strictly lower loss, lr ← max(lr·factor, min_lr)."""
    best, bad, out = math.inf, 0, []
    for loss in losses:
        if loss < best:
            best, bad = loss, 0
        else:
            bad += 1
        if bad >= patience:
            bad = 0
            if lr > min_lr:
                lr = max(lr * factor, min_lr)
        out.append(lr)
    return out


def _torch_rule(losses: list[float], lr: float, patience: int, factor: float, min_lr: float) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    # What FederatedTrainer._plateau_scheduler builds.
    scheduler = ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience - 1, threshold=0.0,
                                  min_lr=min_lr)
    out = []
    for loss in losses:
        scheduler.step(loss)
        out.append(optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("patience", [1, 2, 4])
def test_same_decisions_on_random_loss_curves(seed: int, patience: int) -> None:
    rng = np.random.default_rng(seed)
    # Noisy, slowly improving curves with exact ties and NaN rounds, as small federations produce.
    losses = (10 - 0.05 * np.arange(40) + rng.normal(0, 0.5, 40)).round(1).tolist()
    losses[rng.integers(0, 40)] = math.nan
    args = dict(lr=0.1, patience=patience, factor=0.5, min_lr=1e-3)
    assert _torch_rule(losses, **args) == pytest.approx(_reference_rule(losses, **args), rel=1e-12)
    assert len(set(_reference_rule(losses, **args))) > 1  # the curve did trigger reductions


def test_a_rule_that_reduced_one_round_early_would_be_caught() -> None:
    losses = [5.0, 5.0, 5.0, 5.0]
    wrong = ReduceLROnPlateau(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), patience=2, threshold=0.0)
    wrong_lrs = []
    for loss in losses:
        wrong.step(loss)
        wrong_lrs.append(wrong.optimizer.param_groups[0]["lr"])
    assert wrong_lrs != _reference_rule(losses, lr=0.1, patience=2, factor=0.1, min_lr=0.0)
