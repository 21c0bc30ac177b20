"""The weight average over rounds: its arithmetic, what the trainer evaluates and keeps, and resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from federated_toys import CrashAfter, ToyRegressor, site_data
from torch import nn

from neurofed.federated import FederatedTrainer
from neurofed.federated.weight_average import WeightAverage


def test_average_is_the_exponential_moving_average_and_swaps_cleanly():
    model = nn.Linear(1, 1, bias=False)
    average = WeightAverage(0.5, ["weight"])
    for value in (4.0, 8.0, 0.0):
        model.weight.data.fill_(value)
        average.update(model)
    assert float(average.average["weight"]) == pytest.approx(0.25 * 4 + 0.25 * 8 + 0.5 * 0)  # ((4·½ + 8·½)·½ + 0·½)
    saved = average.swap_in(model)
    assert float(model.weight.detach()) == pytest.approx(3.0)
    average.swap_out(model, saved)
    assert float(model.weight.detach()) == 0.0
    restored = WeightAverage(0.5, ["weight"])
    restored.load_state_dict(average.state_dict())
    assert torch.equal(restored.average["weight"], average.average["weight"])
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(1.0, ["weight"])


class _Globals:
    """Keeps the site's model after each aggregation (the round's own weights)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_aggregate_end(self, trainer, round, global_params) -> None:
        self.states.append({k: v.detach().clone() for k, v in trainer.site.model.state_dict().items()})


def _fit(tmp_path, name, callbacks=(), ckpt_path=None, rounds=4):
    L.seed_everything(0)
    model = ToyRegressor()
    trainer = FederatedTrainer(rounds=rounds, accelerator="cpu", enable_progress_bar=False, logger=False,
                               default_root_dir=str(tmp_path), run_name=name, ema_decay=0.5, precise_bn=False,
                               callbacks=list(callbacks))
    trainer.fit(model, site_data(0), ckpt_path=ckpt_path)
    return model, trainer


def test_the_trainer_evaluates_keeps_and_returns_the_average(tmp_path):
    globals_ = _Globals()
    model, trainer = _fit(tmp_path, "avg", [globals_])
    weights = [0.5 ** (len(globals_.states) - 1)] + [0.5 ** (len(globals_.states) - i) for i in range(1, len(globals_.states))]
    for k in ("conv.weight", "head.weight", "bn.running_mean"):
        expected = sum(w * s[k].double() for w, s in zip(weights, globals_.states))
        torch.testing.assert_close(model.state_dict()[k].double(), expected, rtol=1e-6, atol=1e-7)
        # ... and the round's own weights moved on: training did not start from the average
        assert not torch.equal(model.state_dict()[k], globals_.states[-1][k])
    best = torch.load(trainer.best_model_path, weights_only=True)["state_dict"]
    rows = trainer.validate(model, site_data(0), ckpt_path="best")
    assert rows["pooled"]["mae"] == pytest.approx(trainer.state.best_val_loss, rel=1e-6)
    assert set(best) == set(model.state_dict())


def test_a_resumed_run_with_an_average_repeats_the_uninterrupted_one(tmp_path):
    full, _ = _fit(tmp_path, "full")
    with pytest.raises(RuntimeError, match="crash"):
        _fit(tmp_path, "crashed", [CrashAfter(2)])
    resumed, _ = _fit(tmp_path, "crashed", ckpt_path="last")
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
