"""The learning rate across rounds: warm-up, cosine and step decay, set identically at every round and resume."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from federated_toys import CrashAfter, ToyRegressor, site_data

from neurofed.federated import FederatedTrainer
from neurofed.federated.errors import SettingsError
from neurofed.federated.lr_schedule import RoundSchedule, apply_round_lr


def test_warmup_rises_linearly_then_cosine_falls_to_the_final_factor():
    schedule = RoundSchedule("cosine", warmup_rounds=2, final_factor=0.1)
    factors = [schedule.factor(r, 10) for r in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    after = factors[2:]
    assert all(a > b for a, b in zip(after, after[1:]))  # strictly falling after the warm-up
    # half a cosine over the 8 rounds after the warm-up: round 2 + k has progress k / 8
    assert factors[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert factors[-1] > 0.1 and schedule.factor(10, 10) == pytest.approx(0.1)


def test_step_decay_and_constant():
    step = RoundSchedule("step", warmup_rounds=1, step_rounds=3, step_factor=0.5)
    assert [step.factor(r, 12) for r in range(8)] == pytest.approx([0.5, 1, 1, 1, 0.5, 0.5, 0.5, 0.25])
    assert [RoundSchedule("constant").factor(r, 5) for r in range(5)] == [1.0] * 5


@pytest.mark.parametrize("kwargs", [dict(kind="linear"), dict(warmup_rounds=-1), dict(final_factor=1.5),
                                    dict(step_factor=0.0), dict(step_rounds=0)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(SettingsError, match="RoundSchedule"):
        RoundSchedule(**kwargs)


def test_apply_keeps_the_initial_rate_and_honours_scale_and_floor():
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params, "lr": 0.1}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01}])
    schedule = RoundSchedule("step", step_rounds=1, step_factor=0.1)
    apply_round_lr(opt, schedule, 0, 5, scale=0.5, min_lr=1e-6)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.005])
    apply_round_lr(opt, schedule, 4, 5, scale=1.0, min_lr=1e-6)  # 0.1 * 1e-4 = 1e-5; 0.01 * 1e-4 floors at 1e-6
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5, 1e-6])
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.01]


def _fit(tmp_path, ckpt_path=None, run_name="run", callbacks=()):
    L.seed_everything(0)
    model = ToyRegressor(lr=0.05)
    trainer = FederatedTrainer(rounds=4, accelerator="cpu", enable_progress_bar=False, logger=False,
                               default_root_dir=str(tmp_path), run_name=run_name, callbacks=list(callbacks),
                               lr_schedule=RoundSchedule("cosine", warmup_rounds=1))
    trainer.fit(model, site_data(0), ckpt_path=ckpt_path)
    return model, trainer


def test_each_round_trains_at_the_scheduled_rate_and_a_resume_continues_the_curve(tmp_path):
    model, trainer = _fit(tmp_path)
    schedule = RoundSchedule("cosine", warmup_rounds=1)
    assert [h["lr"] for h in trainer.history] == pytest.approx([0.05 * schedule.factor(r, 4) for r in range(4)])
    with pytest.raises(RuntimeError, match="crash"):
        _fit(tmp_path, run_name="crashed", callbacks=[CrashAfter(2)])
    resumed, resumed_trainer = _fit(tmp_path, ckpt_path="last", run_name="crashed")
    assert [h["lr"] for h in resumed_trainer.history] == [h["lr"] for h in trainer.history[2:]]
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
