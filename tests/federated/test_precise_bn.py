"""Precise BatchNorm: statistics re-estimated on a site's training scans, for evaluation only."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from federated_toys import ToyRegressor, site_data
from torch import nn

from neurofed.federated import FederatedTrainer
from neurofed.federated.precise_bn import batchnorm_layers, recompute_batchnorm, statistics_loader


def _batches(n_batches: int = 3, size: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(size, 2, 4, 4, 4, generator=g) * 3 + 5} for _ in range(n_batches)]


def test_statistics_are_the_average_of_the_batches_whatever_came_before():
    model = nn.Sequential(nn.BatchNorm3d(2), nn.Dropout(0.5))
    model.train()
    for batch in _batches(seed=9):  # stale statistics from other data, and a step count
        model(batch["image"] * 10)
    batches = _batches()
    used = recompute_batchnorm(model, batches)
    bn = model[0]
    assert used == 3
    # equal batch sizes: the mean of the batch means is the mean of all voxels; the variance is the mean of
    # the batches' unbiased variances (what BatchNorm keeps with momentum=None)
    images = torch.stack([b["image"] for b in batches])  # [batches, B, C, D, H, W]
    per_channel = images.permute(2, 0, 1, 3, 4, 5).reshape(2, 3, -1)  # [C, batches, values]
    torch.testing.assert_close(bn.running_mean, per_channel.mean(dim=(1, 2)))
    torch.testing.assert_close(bn.running_var, per_channel.var(dim=2, unbiased=True).mean(dim=1))
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3  # restored: the pass is not training
    assert model.training and bn.training and model[1].training


def test_a_batch_of_one_scan_with_one_voxel_per_channel_is_skipped_not_fatal():
    # a shard of one scan (a site's ranks under DDP) reaching a layer whose maps shrank to one voxel: BatchNorm
    # cannot compute a variance there; that batch is left out, the others are used
    model = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.BatchNorm3d(2))
    two, one = _batches(1, size=2, seed=1)[0], _batches(1, size=1, seed=2)[0]
    assert recompute_batchnorm(model, [two, one]) == 1
    expected = two["image"].mean(dim=(2, 3, 4)).reshape(2, 2)
    torch.testing.assert_close(model[1].running_mean, expected.mean(dim=0))
    assert recompute_batchnorm(model, [one]) == 0  # nothing usable: the statistics stay as they were
    torch.testing.assert_close(model[1].running_mean, expected.mean(dim=0))


def test_only_batchnorm_runs_in_training_mode_during_the_pass():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x

    model = nn.Sequential(nn.BatchNorm3d(2), Probe())
    model.eval()
    recompute_batchnorm(model, _batches(1))
    assert seen == [False]
    assert not model.training and not model[0].training  # the model's own mode comes back


def test_nothing_changes_without_batchnorm_or_without_batches():
    plain = nn.Sequential(nn.Conv3d(2, 2, 1))
    assert recompute_batchnorm(plain, _batches()) == 0
    model = nn.Sequential(nn.BatchNorm3d(2))
    before = copy.deepcopy(model.state_dict())
    assert recompute_batchnorm(model, []) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_training_augmentation_is_left_out():
    class Augmenting:
        def on_after_batch_transfer(self, batch, dataloader_idx):
            if "augment" in batch:
                batch = dict(batch, image=batch.pop("augment") * 0 + batch["image"] + 100.0)
            return batch

    flagged = [dict(b, augment=torch.ones(1)) for b in _batches()]
    a, b = nn.Sequential(nn.BatchNorm3d(2)), nn.Sequential(nn.BatchNorm3d(2))
    recompute_batchnorm(a, flagged, datamodule=Augmenting())
    recompute_batchnorm(b, _batches())
    assert torch.equal(a[0].running_mean, b[0].running_mean)


def test_statistics_loader_keeps_order_and_drops_a_lone_trailing_scan():
    data = site_data(0, n_train=9, batch_size=4)
    data.setup("fit")
    loader = statistics_loader(data.train_dataloader())
    assert [len(batch["target"]) for batch in loader] == [4, 4]  # 9 = 4 + 4 + 1: the lone scan is left out
    assert torch.equal(next(iter(loader))["target"], data.train.targets[:4])


def _fit(tmp_path, precise_bn: bool, name: str):
    L.seed_everything(0)
    model = ToyRegressor()
    data = site_data(0)
    trainer = FederatedTrainer(rounds=3, accelerator="cpu", enable_progress_bar=False, logger=False,
                               default_root_dir=str(tmp_path), run_name=name, precise_bn=precise_bn)
    trainer.fit(model, data)
    return model, trainer, data


def test_the_trainer_evaluates_with_precise_statistics_and_trains_as_without_them(tmp_path):
    plain, plain_trainer, _ = _fit(tmp_path, False, "plain")
    precise, precise_trainer, data = _fit(tmp_path, True, "precise")
    # the statistics stay local; every learned weight trains as without them: the same global weights
    assert "bn.running_mean" in plain_trainer.global_state and "bn.running_mean" not in precise_trainer.global_state
    for k, v in precise_trainer.global_state.items():
        assert torch.equal(v, plain_trainer.global_state[k]), k
    # evaluation is not: the validation loss of at least one round changed
    assert [h["val/pooled/loss"] for h in plain_trainer.history] != [h["val/pooled/loss"] for h in precise_trainer.history]
    # and the statistics the site evaluated with are those of its training scans under the last weights
    reference = copy.deepcopy(precise)
    recompute_batchnorm(reference, statistics_loader(data.train_dataloader()))
    assert batchnorm_layers(precise)
    torch.testing.assert_close(precise.bn.running_mean, reference.bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(precise.bn.running_var, reference.bn.running_var, rtol=0, atol=0)
    assert not torch.equal(precise.bn.running_mean, plain.bn.running_mean)


@pytest.mark.parametrize("precise_bn", [True, False])
def test_the_best_checkpoint_holds_the_statistics_the_site_validated_with(tmp_path, precise_bn):
    model, trainer, _ = _fit(tmp_path, precise_bn, f"best{precise_bn}")
    best = torch.load(trainer.best_model_path, weights_only=True)["state_dict"]
    last = trainer.history[-1]["val/pooled/loss"] == min(h["val/pooled/loss"] for h in trainer.history)
    if last:  # the last round is the best one: the model still holds what the checkpoint saved
        assert torch.equal(best["bn.running_mean"], model.bn.running_mean)
    rows = trainer.validate(model, site_data(0), ckpt_path="best")
    assert rows["pooled"]["mae"] == pytest.approx(trainer.state.best_val_loss, rel=1e-6)
