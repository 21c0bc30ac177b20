"""Shallow SDMT transfer: the frozen backbone normalises with its own site's statistics, fixed while the head trains.

With ``precise_bn`` (the trainer's default) a site re-estimates every BatchNorm layer's running statistics on its
training scans before the first round and after each aggregation. A shallow model's backbone is frozen and in
evaluation mode, so those statistics are what it normalises with during local training too: the site's own
scanner, not the brain-age cohort's.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
from federated_toys import site_data

from neurofed.federated import FederatedTrainer
from neurofed.federated.precise_bn import batchnorm_layers, recompute_batchnorm, statistics_loader
from neurofed.models import SDMTModule

TINY = [4, 4, 4]  # two pooling blocks: 8^3 toy volumes -> 2^3


def _statistics(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.running_mean.clone(), m.running_var.clone()) for m in batchnorm_layers(model.backbone)]


class BackboneStatistics:
    """The frozen backbone's BatchNorm statistics when local training starts and when it ends, per round."""

    def __init__(self) -> None:
        self.at_start: list = []
        self.at_end: list = []

    def on_round_start(self, trainer, round) -> None:
        self.at_start.append(_statistics(trainer.site.model))

    def on_local_train_end(self, trainer, round, result) -> None:
        assert result.steps > 0  # the head did train this round
        self.at_end.append(_statistics(trainer.site.model))


def _fit(tmp_path, precise_bn: bool):
    L.seed_everything(0)
    model = SDMTModule(channels=TINY, transfer="shallow", dropout=0.0, channels_last=False, lr=0.01)
    brain_age_statistics = _statistics(model)
    data = site_data(1)  # intensities shifted from the backbone's initial statistics, as another scanner's
    observer = BackboneStatistics()
    trainer = FederatedTrainer(rounds=3, accelerator="cpu", enable_progress_bar=False, logger=False,
                               default_root_dir=str(tmp_path), run_name=f"shallow_{precise_bn}",
                               precise_bn=precise_bn, callbacks=[observer])
    head_before = model.head.weight.detach().clone()
    trainer.fit(model, data)
    assert not torch.equal(model.head.weight, head_before)
    return model, data, observer, brain_age_statistics


def _assert_equal(a, b) -> None:
    assert len(a) == len(b) > 0
    for (mean_a, var_a), (mean_b, var_b) in zip(a, b):
        torch.testing.assert_close(mean_a, mean_b, rtol=0, atol=0)
        torch.testing.assert_close(var_a, var_b, rtol=0, atol=0)


def test_frozen_backbone_uses_the_site_statistics_and_keeps_them_during_local_training(tmp_path):
    model, data, observer, brain_age_statistics = _fit(tmp_path, precise_bn=True)
    reference = copy.deepcopy(model)
    recompute_batchnorm(reference, statistics_loader(data.train_dataloader()), data)
    site_statistics = _statistics(reference)
    assert len(observer.at_start) == 3
    for start, end in zip(observer.at_start, observer.at_end):
        _assert_equal(start, site_statistics)  # re-estimated on the site's training split before the round
        _assert_equal(end, site_statistics)  # and left alone by the head's training steps
    assert not torch.equal(site_statistics[0][0], brain_age_statistics[0][0])


def test_without_precise_bn_the_backbone_keeps_the_brain_age_statistics(tmp_path):
    _, _, observer, brain_age_statistics = _fit(tmp_path, precise_bn=False)
    for start, end in zip(observer.at_start, observer.at_end):
        _assert_equal(start, brain_age_statistics)
        _assert_equal(end, brain_age_statistics)
