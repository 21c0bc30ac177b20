"""Update screening's numbers and rules at several sites in threads, against independent numpy references;
the vector layout and the aggregate checks' certain checks. Real processes attack in test_poisoned_sites.py."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from federated_toys import ToyRegressor
from threaded_sites import ThreadGroup, _Board
from timeouts import scaled

from neurofed.federated import ClipUpdates, DPFedAvg, FedAvg, FedMedian, SecureAggregation
from neurofed.federated.aggregate_checks import check_parameters
from neurofed.federated.config import Federation
from neurofed.federated.params import flatten, float_keys
from neurofed.federated.screening import individual_updates_hidden, screen_update
from neurofed.federated.site_link import SiteLink
from neurofed.federated.vector_layout import VectorLayout


class _Recording(ThreadGroup):
    def __init__(self, board, k, kinds):
        super().__init__(board, k)
        self.kinds = kinds

    def all_reduce_sum(self, t, kind):
        self.kinds.append(kind)
        return super().all_reduce_sum(t, kind)

    def all_gather(self, t, kind):
        self.kinds.append(kind)
        return super().all_gather(t, kind)


def _screen(params: list[torch.Tensor], start: torch.Tensor, layout: VectorLayout, directions: bool = True,
            **federation):
    """``screen_update`` at ``len(params)`` sites at once; every site's result and payload kinds."""
    n, board = len(params), _Board(len(params))
    out, kinds = [None] * n, [[] for _ in range(n)]

    def site(k: int) -> None:
        link = SiteLink(SimpleNamespace(global_rank=0, world_size=1, device=torch.device("cpu")),
                        Federation(site_rank=k, num_sites=n, **federation), group=_Recording(board, k, kinds[k]))
        out[k] = screen_update(link, params[k], start, 10.0, [10.0] * n, 0, [f"s{j}" for j in range(n)], layout,
                               directions)

    threads = [threading.Thread(target=site, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(scaled(30))
    return out, kinds


def _layout(weights: int, variances: int) -> VectorLayout:
    mask = torch.tensor([True] * weights + [False] * variances)
    return VectorLayout(mask, (("bn.running_var", weights, weights + variances),) if variances else ())


def test_the_layout_finds_the_weights_and_the_batchnorm_variances():
    model = ToyRegressor()
    keys = float_keys(model.state_dict())
    layout = VectorLayout.of(model, keys)
    vec = flatten(model.state_dict(), keys)
    trained = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(layout.weight_values(vec), trained)
    assert torch.equal(layout.variance_values(vec), model.bn.running_var)
    assert layout.nonpositive_variances(vec) is None and check_parameters(vec, layout) is None
    vec[layout.variances[0][1] + 2] = -0.1
    assert layout.nonpositive_variances(vec) == "BatchNorm running variances at or below zero, or not finite: " \
                                                "bn.running_var (1 of 4)"
    vec[0] = float("nan")
    assert check_parameters(vec, layout).startswith(f"the aggregate is not finite (1 of {vec.numel()} values")


def test_cosines_are_each_sites_direction_against_the_sum_of_the_others_unit_updates():
    rng = np.random.default_rng(3)
    start = torch.ones(8, dtype=torch.float32)
    updates = rng.normal(size=(4, 8)).astype(np.float32)
    updates[:, 6:] = 0.01  # the variances move a little
    out, kinds = _screen([start + torch.from_numpy(u) for u in updates], start, _layout(6, 2))
    w = updates[:, :6].astype(np.float64)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    for k in range(4):
        others = unit.sum(0) - unit[k]
        expected = w[k] @ others / (np.linalg.norm(w[k]) * np.linalg.norm(others))
        assert out[0].stats[k].cosine == pytest.approx(expected, abs=1e-6)
        assert out[0].stats[k].variance_ratio_min == pytest.approx(1.01, abs=1e-6)
    assert kinds[0] == ["update_direction", "update_norm"]


def test_a_flipped_update_is_left_out_by_its_direction_and_a_scaled_one_by_its_norm():
    rng = np.random.default_rng(4)
    start = torch.zeros(20)
    common = rng.normal(size=20)
    honest = [common + 0.3 * rng.normal(size=20) for _ in range(4)]
    sent = [torch.from_numpy(u).float() for u in honest[:3]] + [torch.from_numpy(-1.0 * honest[3]).float()]
    out, _ = _screen(sent, start, _layout(20, 0), min_update_cosine=-0.2)
    assert list(out[0].excluded) == [3] and "points away from the other sites'" in out[0].excluded[3]
    assert out[3].weight == 0.0 and torch.equal(out[3].params, start)  # the left-out site sends the global model
    assert all(torch.equal(out[k].params, sent[k]) for k in range(3))
    sent[3] = torch.from_numpy(4.0 * honest[3]).float()
    out, _ = _screen(sent, start, _layout(20, 0), min_update_cosine=-0.2, update_norm_factor=3.0)
    assert list(out[0].excluded) == [3] and "exceeds 3 x the median" in out[0].excluded[3]


def test_a_variance_at_or_below_zero_is_left_out_even_between_two_sites():
    start = torch.tensor([0.5, 0.5, 1.0, 1.0])
    out, kinds = _screen([start + 0.1, torch.tensor([0.6, 0.4, 1.1, -0.2])], start, _layout(2, 2))
    assert list(out[0].excluded) == [1] and "at or below zero" in out[0].excluded[1]
    assert kinds[0] == ["update_norm"]  # two sites: no direction to compare with


@pytest.mark.parametrize(("variance", "left_out"), [(2.8, False), (3.0, True), (0.36, False), (0.33, True)])
def test_a_variance_far_from_the_global_one_is_left_out(variance, left_out):
    start = torch.tensor([0.5, 0.5, 1.0, 1.0])
    out, _ = _screen([start + 0.1, torch.tensor([0.6, 0.4, variance, 1.1])], start, _layout(2, 2))
    assert bool(out[0].excluded) == left_out, out[0].excluded
    if left_out:
        assert "times the global ones, outside 1/2.9 to 2.9" in out[0].excluded[1]  # the default max_variance_ratio


def test_without_directions_no_single_sites_direction_is_sent():
    start = torch.zeros(6)
    out, kinds = _screen([start + k + 1 for k in range(3)], start, _layout(6, 0), directions=False,
                         min_update_cosine=0.5)
    assert all(k == ["update_norm"] for k in kinds) and np.isnan(out[0].stats[0].cosine) and not out[0].excluded


def test_secure_aggregation_and_dp_fedavg_hide_single_sites_updates_from_screening():
    assert individual_updates_hidden(SecureAggregation(FedAvg()))
    assert individual_updates_hidden(ClipUpdates(DPFedAvg(FedAvg(), noise_multiplier=1.0, clip_norm=1.0), 2.0))
    assert not individual_updates_hidden(ClipUpdates(FedMedian(), 1.0)) and not individual_updates_hidden(FedAvg())
