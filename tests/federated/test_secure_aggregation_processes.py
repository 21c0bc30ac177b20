"""Secure aggregation across real site processes over gloo: the wire record and what it reveals."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from timeouts import STARTUP_S, scaled
from federated_toys import free_port, quiet_process, run_processes

from neurofed.federated.collectives import Collectives
from neurofed.federated.config import Federation
from neurofed.federated.group import FederationGroup, RecordingGroup
from neurofed.federated.site_link import SiteLink
from neurofed.federated.strategies import Contribution, FedAvg, RoundContext, SecureAggregation

DIM, ROUNDS = 1000, 2


class ValueRecordingGroup(RecordingGroup):
    """Also keeps a copy of every payload: what an observer of this site's traffic would see."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.values: list[torch.Tensor] = []

    def _record(self, kind, t) -> None:
        super()._record(kind, t)
        self.values.append(t.detach().clone())


def _update(rank: int, r: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng([rank, r]).normal(0, 0.05, DIM).astype(np.float32))


def _site(rank: int, n: int, port: int, out_dir: str) -> None:
    quiet_process()
    group = ValueRecordingGroup(FederationGroup("127.0.0.1", port, rank, n, timeout_s=scaled(60)))
    fed = Federation(site_rank=rank, num_sites=n)
    link = SiteLink(SimpleNamespace(global_rank=0, world_size=1, device=torch.device("cpu")), fed, group=group)
    strategy = SecureAggregation(FedAvg())
    g = torch.zeros(DIM)
    results = []
    for r in range(ROUNDS):
        ctx = RoundContext(round=r, seed=0, site_rank=rank, num_sites=n)
        params = g + _update(rank, r)
        sent = strategy.client_update(params, g, ctx)
        g = strategy.aggregate(Contribution(sent, g, float(10 + rank)), Collectives(link, r), ctx)
        results.append(g.tolist())
    group.close()
    masked = [v for (kind, _, _), v in zip(group.sent, group.values) if kind == "masked_parameters"]
    record = {"kinds": [[k, str(d), list(s)] for k, d, s in group.sent], "results": results,
              "masked": [m.tolist() for m in masked]}
    with open(f"{out_dir}/site{rank}.json", "w") as f:
        json.dump(record, f)


@pytest.mark.slow
def test_three_site_processes_send_keys_once_then_only_masked_integers(tmp_path) -> None:
    n = 3
    port = free_port()
    run_processes(_site, [(k, n, port, str(tmp_path)) for k in range(n)], timeout=scaled(STARTUP_S + 60))
    records = [json.loads((tmp_path / f"site{k}.json").read_text()) for k in range(n)]
    # the wire: one public key per run (32 bytes) and its MAC under the federation secret (32), then per round
    # the example count and one masked int64 vector
    expected = [["public_key", "torch.uint8", [32]], ["handshake", "torch.uint8", [32]]] + [["example_count", "torch.float64", [1]],
                                                        ["masked_parameters", "torch.int64", [DIM]]] * ROUNDS
    for rec in records:
        assert rec["kinds"] == expected
    # every site decodes the same aggregate, equal to the plain weighted mean
    g = np.zeros(DIM)
    weights = np.array([10.0 + k for k in range(n)])
    for r in range(ROUNDS):
        plain = g + sum(w * _update(k, r).double().numpy() for k, w in enumerate(weights)) / weights.sum()
        for rec in records:
            np.testing.assert_allclose(rec["results"][r], plain, rtol=0, atol=1e-6)
        g = np.asarray(records[0]["results"][r], dtype=np.float32).astype(np.float64)
    # what site 0 put on the wire is uncorrelated with its true weighted update, round after round
    for r in range(ROUNDS):
        sent = np.asarray(records[0]["masked"][r], dtype=np.float64)
        truth = _update(0, r).double().numpy()
        assert abs(np.corrcoef(sent, truth)[0, 1]) < 4 / np.sqrt(DIM)
