"""Audit of the wire: a whole fit + test sends only the allowed kinds, with the expected shapes and sizes."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from federated_toys import ToyRegressor, site_data

from neurofed.federated import FedAvg, FedBN, FederatedTrainer
from neurofed.federated.group import LocalGroup, RecordingGroup
from neurofed.federated.wire import ALLOWED_KINDS, MAX_SMALL_ELEMENTS, SITE_NAME_BYTES


@pytest.mark.parametrize("strategy", [FedAvg(), FedBN()], ids=["fedavg", "fedbn"])
def test_fit_and_test_send_only_parameters_and_small_statistics(tmp_path, strategy):
    L.seed_everything(0)
    model = ToyRegressor()
    data = site_data(0, test_roots=2)
    rounds = 3
    trainer = FederatedTrainer(rounds=rounds, strategy=strategy, accelerator="cpu", logger=False,
                               enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.group = RecordingGroup(LocalGroup())
    trainer.fit(model, data)
    trainer.test(model, data)

    sd = model.state_dict()
    keys = list(trainer.global_state)  # what crosses: BatchNorm statistics stay at each site under precise_bn
    n_params = sum(sd[k].numel() for k in keys)
    if isinstance(strategy, FedBN):
        assert not any(k.startswith("bn.") for k in keys)
        assert n_params < sum(v.numel() for v in sd.values() if v.is_floating_point())

    sent = trainer.group.sent
    assert {kind for kind, _, _ in sent} <= ALLOWED_KINDS
    parameters = [(dtype, shape) for kind, dtype, shape in sent if kind == "parameters"]
    # one broadcast of the starting weights, then one aggregation per round; nothing else is that large
    assert parameters == [(torch.float32, (n_params,))] * (rounds + 1)
    for kind, dtype, shape in sent:
        if kind == "site_name":
            assert (dtype, shape) == (torch.uint8, (SITE_NAME_BYTES,))
        elif kind != "parameters":
            assert torch.Size(shape).numel() <= MAX_SMALL_ELEMENTS, (kind, shape)
    # exactly this traffic, in this order: label stats; per round weight, parameters, val loss/count/stats and
    # the statistics of predicting the training mean; at test time the site's name, the number of splits,
    # then each split's loss, statistics and mean-prediction statistics
    per_round = ["example_count", "parameters", "loss_sum", "example_count", "metric_stats", "metric_stats"]
    per_split = ["loss_sum", "metric_stats", "metric_stats"]
    expected = ["label_stats", "parameters"] + per_round * rounds + ["site_name", "control"] + per_split * 2
    assert [kind for kind, _, _ in sent] == expected
    # every payload that crossed is a flat vector: numbers, or the 32 bytes of a dataset name
    assert all(len(shape) == 1 for _, _, shape in sent)
