"""Round hooks: called in order with the round's objects, able to alter a round; one metric path in the logs."""

from __future__ import annotations

import csv

import lightning as L
import torch
from federated_toys import ToyRegressor, site_data

from neurofed.federated import Callback, FederatedTrainer
from neurofed.federated.params import flatten


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_fit_start(self, trainer):
        self.calls.append(("fit_start",))

    def on_round_start(self, trainer, round):
        self.calls.append(("round_start", round))

    def on_local_train_end(self, trainer, round, result):
        self.calls.append(("local_train_end", round, result.steps))

    def on_aggregate_end(self, trainer, round, global_params):
        # the aggregated entries (BatchNorm statistics stay local under precise_bn) are what the model holds now
        keys = list(trainer.global_state)
        assert keys and torch.equal(global_params, flatten(trainer.site.model.state_dict(), keys))
        self.calls.append(("aggregate_end", round))

    def on_validation_end(self, trainer, round, metrics):
        self.calls.append(("validation_end", round, sorted(k for k in metrics if k.startswith("val/pooled/"))))

    def on_round_end(self, trainer, round, metrics):
        self.calls.append(("round_end", round, metrics["round"]))

    def on_fit_end(self, trainer):
        self.calls.append(("fit_end",))


def test_hooks_are_called_in_order_every_round(tmp_path) -> None:
    L.seed_everything(0)
    recorder = Recorder()
    trainer = FederatedTrainer(rounds=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                               default_root_dir=str(tmp_path), callbacks=[recorder])
    trainer.fit(ToyRegressor(), site_data(0))
    pooled = ["val/pooled/baseline_mae", "val/pooled/loss", "val/pooled/mae", "val/pooled/n", "val/pooled/r"]
    per_round = lambda r: [("round_start", r), ("local_train_end", r, 3), ("aggregate_end", r),  # noqa: E731
                           ("validation_end", r, pooled), ("round_end", r, float(r + 1))]
    assert recorder.calls == [("fit_start",), *per_round(0), *per_round(1), ("fit_end",)]


class ZeroTheLocalModel(Callback):
    """Alters what the site contributes: a one-site federation then ends with exactly zero weights."""

    def on_local_train_end(self, trainer, round, result):
        with torch.no_grad():
            for p in trainer.site.model.parameters():
                p.zero_()


def test_a_hook_can_alter_the_contribution(tmp_path) -> None:
    L.seed_everything(0)
    model = ToyRegressor(bn=False)
    FederatedTrainer(rounds=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                     default_root_dir=str(tmp_path), callbacks=[ZeroTheLocalModel()]).fit(model, site_data(0))
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters())


def test_site_and_pooled_curves_have_distinct_names_and_monotonic_steps(tmp_path) -> None:
    L.seed_everything(0)
    trainer = FederatedTrainer(rounds=3, accelerator="cpu", enable_progress_bar=False, default_root_dir=str(tmp_path),
                               run_name="m")
    trainer.fit(ToyRegressor(log_steps=False), site_data(0))
    trainer.test(ToyRegressor(log_steps=False), site_data(0), ckpt_path="best")
    path = next((tmp_path / "m" / "site-0").glob("version_*/metrics.csv"))
    rows = list(csv.DictReader(path.open()))
    header = set(rows[0])
    assert {"val/site/loss", "val/site/mae", "val/pooled/loss", "val/pooled/mae", "train/site/loss"} <= header
    assert not {"val/loss", "val/mae", "val/r", "train/loss"} & header  # no name shared by two quantities
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and steps[0] == 1
    assert [int(r["step"]) for r in rows if r["val/pooled/loss"]] == [1, 2, 3]
