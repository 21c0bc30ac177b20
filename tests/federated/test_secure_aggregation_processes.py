"""Secure aggregation across real site processes over gloo: the wire record of a whole fit, what it reveals,
and a malicious site whose residues leave the range honest sites can produce."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from federated_toys import ToyRegressor, free_port, quiet_process, run_processes, site_data
from timeouts import STARTUP_S, scaled

from neurofed.federated import FedAvg, FederatedTrainer, Federation, SecureAggregation
from neurofed.federated.errors import FederationError
from neurofed.federated.group import FederationGroup, RecordingGroup

pytestmark = pytest.mark.slow

ROUNDS = 2
INDIVIDUAL_OK = {"handshake", "public_key", "round_mac", "site_name", "parameters"}


class ValueRecordingGroup(RecordingGroup):
    """Also keeps a copy of every payload: what an observer of this site's traffic would see."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.values: list[torch.Tensor] = []

    def _record(self, kind, t) -> None:
        super()._record(kind, t)
        self.values.append(t.detach().clone())


class ShiftsItsResidues(ValueRecordingGroup):
    """A malicious site: after masking, it adds Δ·2^f to coordinate 0 of what it sends (its clipping is its
    own courtesy; nobody can see its residues)."""

    def __init__(self, inner, delta: float, frac_bits: int) -> None:
        super().__init__(inner)
        self.shift = int(delta * 2**frac_bits)

    def all_reduce_sum(self, t, kind):
        if kind == "masked_parameters":
            t = t.clone()
            t[0] += self.shift
        return super().all_reduce_sum(t, kind)


def _site(rank: int, n: int, port: int, out_dir: str, malicious_delta: float | None = None) -> None:
    quiet_process()
    L.seed_everything(rank)
    strategy = SecureAggregation(FedAvg(), clip_range=16.0)
    inner = FederationGroup("127.0.0.1", port, rank, n, timeout_s=scaled(60))
    frac_bits = 52 - 2 - 4  # FixedPoint(16, 3)'s precision: the attacker knows the public settings
    group = ValueRecordingGroup(inner) if malicious_delta is None else ShiftsItsResidues(inner, malicious_delta, frac_bits)
    trainer = FederatedTrainer(rounds=ROUNDS, strategy=strategy, accelerator="cpu", logger=False, enable_progress_bar=False,
                               default_root_dir=out_dir, run_name=f"run{rank}",
                               federation=Federation(port=port, site_rank=rank, num_sites=n, timeout_s=scaled(60)))
    trainer.group = group
    record: dict = {}
    try:
        trainer.fit(ToyRegressor(bn=False), site_data(rank))
        trainer.test(ToyRegressor(bn=False), site_data(rank), ckpt_path="best")
        record["history"] = trainer.history
    except FederationError as e:
        record["error"] = f"{type(e).__name__}: {e}"
    trainer.close()
    record["wire"] = [[kind, str(dtype), list(shape), op, int(v.numel() * v.element_size())]
                      for (kind, dtype, shape), op, v in zip(group.sent, group.ops, group.values)]
    Path(out_dir, f"site{rank}.json").write_text(json.dumps(record, default=float))


def test_three_sites_send_nothing_individual_in_the_clear_but_handshake_keys_names_and_checks(tmp_path) -> None:
    n, port = 3, free_port()
    run_processes(_site, [(k, n, port, str(tmp_path)) for k in range(n)], timeout=scaled(STARTUP_S + 180))
    records = [json.loads((tmp_path / f"site{k}.json").read_text()) for k in range(n)]
    for rec in records:
        assert "error" not in rec, rec.get("error")
        kinds = {kind for kind, _, _, _, _ in rec["wire"]}
        # every statistic crosses masked and summed; nothing plain: no count, label, loss or metric sum, no norm
        # or direction of an update
        assert not kinds & {"example_count", "label_stats", "loss_sum", "metric_stats", "update_norm",
                            "update_direction", "control"}
        for kind, dtype, shape, op, size in rec["wire"]:
            if op == "sum":
                assert kind in ("masked_parameters", "masked_statistics") and dtype == "torch.int64", (kind, op)
            else:  # what every site receives individually: the handshake, keys, names, round checks, start weights
                assert kind in INDIVIDUAL_OK, (kind, op)
        assert [op for (kind, _, _, op, _) in rec["wire"] if kind == "parameters"] == ["broadcast"]
        assert len(rec["history"]) == ROUNDS


def test_a_malicious_sites_residue_outside_the_range_stops_the_round_at_every_site(tmp_path) -> None:
    """Before, adding Δ·2^f after masking moved a coordinate of the global model by up to ±16,384 (n 3, R 16),
    silently, at every site. Now the decoded weighted mean must lie in [−R, R]: Δ = 100 is caught."""
    n, port = 3, free_port()
    run_processes(_site, [(k, n, port, str(tmp_path), 100.0 if k == 2 else None) for k in range(n)],
                  timeout=scaled(STARTUP_S + 180))
    records = [json.loads((tmp_path / f"site{k}.json").read_text()) for k in range(n)]
    for rec in records:
        assert rec.get("error", "").startswith("FederationIntegrityError"), rec.get("error")
        assert "decoded outside [-16, 16]" in rec["error"] and "round 1" in rec["error"]
    assert all(not (tmp_path / f"run{k}" / f"site-{k}" / "committed").exists() for k in range(n))
