"""Resuming from the round checkpoint ends bit-identical to an uninterrupted run (on CPU)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from federated_toys import ToyRegressor, assert_identical, site_data, state_of

from neurofed.federated import FedAdam, FederatedTrainer, FedProx
from neurofed.federated.checkpoint_io import CheckpointError, load
from neurofed.federated.results import read_json


def _fit(tmp_path, run_name: str, rounds: int, strategy_cls, ckpt_path: str | None = None):
    L.seed_everything(0)
    model = ToyRegressor()  # a resumed run starts from a fresh model: everything comes from the checkpoint
    strategy = strategy_cls()
    trainer = FederatedTrainer(rounds=rounds, strategy=strategy, accelerator="cpu", enable_progress_bar=False,
                               default_root_dir=str(tmp_path), run_name=run_name, lr_plateau_patience=1)
    trainer.fit(model, site_data(0), ckpt_path=ckpt_path)
    optimizer = trainer.site.optimizer
    return model, trainer, optimizer


@pytest.mark.parametrize("strategy_cls", [FedAdam, FedProx])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, strategy_cls):
    full, full_trainer, full_opt = _fit(tmp_path, "full", 4, strategy_cls)
    _fit(tmp_path, "split", 2, strategy_cls)
    torch.manual_seed(12345)  # disturb the global RNG: the resumed run must not depend on it
    resumed, resumed_trainer, resumed_opt = _fit(tmp_path, "split", 4, strategy_cls, ckpt_path="last")

    assert [h["round"] for h in resumed_trainer.history] == [3.0, 4.0]
    assert_identical(state_of(full), state_of(resumed))
    a, b = full_opt.state_dict(), resumed_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        assert_identical(a["state"][i], b["state"][i])
    sa, sb = full_trainer.strategy.state_dict(), resumed_trainer.strategy.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k]
    assert full_trainer.state == resumed_trainer.state
    for h_full, h_res in zip(full_trainer.history[2:], resumed_trainer.history):
        assert h_full["val/pooled/loss"] == h_res["val/pooled/loss"] and h_full["train/site/loss"] == h_res["train/site/loss"]

    # what the round file holds: global weights, strategy state, counters, lr, sampling rule
    shared = load(tmp_path / "split" / "round-last.pt")
    assert shared["round"] == 4 and set(shared["global"]) <= set(full.state_dict())
    assert shared["lr"] == [g["lr"] for g in b["param_groups"]]
    local = load(tmp_path / "split" / "site-0" / "local-last.pt")
    assert {"model", "optimizer", "rng", "global_step", "round"} <= set(local)
    assert {"torch", "numpy", "python"} <= set(local["rng"])

    # history.json keeps the rounds run before the interruption, then the resumed ones
    history = read_json(tmp_path / "split" / "history.json")
    assert [h["round"] for h in history] == [1.0, 2.0, 3.0, 4.0]
    assert [h["val/pooled/loss"] for h in history] == [h["val/pooled/loss"] for h in full_trainer.history]


def test_resume_refuses_mismatched_files(tmp_path):
    _fit(tmp_path, "run", 1, FedAdam)
    round_file = tmp_path / "run" / "round-last.pt"
    shared = load(round_file)
    shared["round"] = 7
    torch.save(shared, round_file)
    with pytest.raises(CheckpointError, match="round 1 but .* from round 7"):
        _fit(tmp_path, "run", 3, FedAdam, ckpt_path="last")
