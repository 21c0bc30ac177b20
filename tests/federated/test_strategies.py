"""Aggregation rules against numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neurofed.federated.params import flatten, float_keys
from neurofed.federated.strategies import STRATEGIES, FedAdam, FedAvg, FedBN, FedProx, Strategy, weighted_mean


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(1)
    ).eval()


def _materialized() -> nn.Module:
    model = _tiny_model()
    model(torch.zeros(1, 1, 4, 4, 4))
    return model


def test_fedavg_weighted_and_unweighted_mean_of_three_sites() -> None:
    vectors = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 6.0]), torch.tensor([5.0, -3.0])]
    counts = [10, 30, 60]
    weighted = FedAvg()
    mean = weighted_mean(vectors, [weighted.site_weight(c) for c in counts])
    # (10*1 + 30*3 + 60*5) / 100 = 4.0 ; (0 + 180 - 180) / 100 = 0.0
    torch.testing.assert_close(mean, torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(weighted.server_update(torch.zeros(2), mean), mean)

    plain = FedAvg(weighted=False)
    mean = weighted_mean(vectors, [plain.site_weight(c) for c in counts])
    torch.testing.assert_close(mean, torch.tensor([3.0, 1.0]))
    assert mean.dtype == torch.float32


def test_weighted_mean_rejects_bad_weights() -> None:
    with pytest.raises(ValueError):
        weighted_mean([torch.zeros(2)], [0.0])
    with pytest.raises(ValueError):
        weighted_mean([torch.zeros(2), torch.zeros(2)], [1.0])


def test_fedadam_one_step_matches_hand_computation() -> None:
    s = FedAdam(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    new = s.server_update(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.0]))
    # delta = [0.5, -1]; m = [0.05, -0.1]; v = [0.0025, 0.01]; sqrt(v) = [0.05, 0.1]
    expected = torch.tensor([1.0 + 0.1 * 0.05 / 0.051, 2.0 - 0.1 * 0.1 / 0.101])
    torch.testing.assert_close(new, expected)
    torch.testing.assert_close(s.m, torch.tensor([0.05, -0.1]))
    torch.testing.assert_close(s.v, torch.tensor([0.0025, 0.01]))
    assert s.step == 1


def test_fedadam_state_dict_round_trip_continues_identically() -> None:
    a = FedAdam()
    g = a.server_update(torch.zeros(3), torch.tensor([0.1, -0.2, 0.3]))
    b = FedAdam()
    b.load_state_dict(a.state_dict())
    assert b.step == 1
    mean2 = torch.tensor([0.3, 0.1, -0.4])
    torch.testing.assert_close(a.server_update(g, mean2), b.server_update(g, mean2))
    assert a.state_dict()["step"] == b.state_dict()["step"] == 2
    with pytest.raises(ValueError):
        b.load_state_dict({"moments": 1})


def test_fedprox_loss_and_gradient() -> None:
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    global_params = {k: v.detach() + torch.randn_like(v) for k, v in model.state_dict().items()}
    mu = 0.5
    loss = FedProx(mu=mu).local_loss(model, global_params)
    expected = sum(((p - global_params[n]) ** 2).sum() for n, p in model.named_parameters()) * mu / 2
    torch.testing.assert_close(loss, expected.detach())
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, mu * (p.detach() - global_params[name]))


def test_fedprox_skips_frozen_parameters_and_rejects_mismatched_names() -> None:
    model = nn.Linear(2, 1)
    model.bias.requires_grad_(False)
    g = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    loss = FedProx(mu=2.0).local_loss(model, g)
    torch.testing.assert_close(loss, (model.weight.detach() ** 2).sum())
    with pytest.raises(ValueError, match="global_params"):
        FedProx().local_loss(model, {"module.weight": torch.zeros(1, 2)})


def test_base_aggregates_float_entries_but_never_integer_buffers() -> None:
    sd = _materialized().state_dict()
    keys = FedAvg().aggregated_keys(sd)
    assert "1.num_batches_tracked" not in keys
    assert {"0.weight", "1.weight", "1.running_mean", "1.running_var", "4.weight"} <= set(keys)
    assert keys == float_keys(sd)
    assert flatten(sd, keys).numel() == sum(sd[k].numel() for k in keys)


@pytest.mark.parametrize("with_model", [True, False])
def test_fedbn_excludes_every_batchnorm_entry(with_model: bool) -> None:
    model = _materialized()
    sd = model.state_dict()
    keys = FedBN().aggregated_keys(sd, model if with_model else None)
    assert keys == ["0.weight", "0.bias", "4.weight", "4.bias"]
    assert not any("num_batches_tracked" in k for k in keys)


def test_fedbn_name_heuristic_without_running_stats() -> None:
    sd = {
        "enc.conv.weight": torch.zeros(2),
        "enc.bn1.weight": torch.zeros(2),
        "enc.bn1.bias": torch.zeros(2),
        "head.weight": torch.zeros(2),
    }
    assert FedBN().aggregated_keys(sd) == ["enc.conv.weight", "head.weight"]


def test_registry_repr_and_stateless_strategies() -> None:
    assert set(STRATEGIES) == {"fedavg", "fedprox", "fedadam", "fedbn"}
    assert all(issubclass(c, Strategy) for c in STRATEGIES.values())
    assert repr(FedProx(mu=0.1)) == "FedProx(mu=0.1, weighted=True)"
    assert "eta=0.01" in repr(FedAdam()) and "tau=0.001" in repr(FedAdam())
    s = FedAvg()
    assert s.state_dict() == {} and s.local_loss(nn.Linear(1, 1), {}) is None
    s.load_state_dict({})
    with pytest.raises(ValueError):
        s.load_state_dict({"m": 1})
