"""A faulty or hostile site against real site processes: what screening leaves out, what the aggregate checks
refuse to commit, who is named when a site leaves, and how such a run resumes. Each protection is shown by the
attack failing."""

from __future__ import annotations

import math
import re
from functools import partial

import pytest
import torch
from test_trust import _join, _results, _start
from timeouts import STARTUP_S, scaled
from trust_sites import real_site

from neurofed.federated import FedAvg, SecureAggregation
from neurofed.federated.commit import committed_rounds, forget_rounds
from neurofed.federated.results import read_json
from neurofed.federated.simulate import free_port
from neurofed.status import read_status

pytestmark = pytest.mark.slow

#: Seconds, on an idle machine, that the sites of one test take to train and fail after starting (a few rounds of a
#: toy model; a survivor's timeout and its look at the heartbeats).
WORK_S = 240
ATTACKS = {1: (-1.0, "weights"), 2: (-5.0, "all"), 3: (8.0, "all")}  # round (0-based) -> factor, entries


def test_flipped_and_scaled_updates_are_left_out_and_only_the_attackers(tmp_path):
    # site 3 sends global + factor × (local − global): its weights' update flipped in round 2 (same norm, BatchNorm
    # statistics honest: only its direction gives it away), ×−5 in round 3, ×8 in round 4. The sites are drawn from one
    # population (no intensity shift between them), so their honest updates agree, and the federation sets the
    # direction threshold that such sites allow (the default leaves room for very unlike sites).
    port = free_port()
    # BatchNorm statistics averaged like weights (precise_bn off), so that ×8 can extrapolate them.
    same = {"rounds": 4, "data": {"shift": 0.0}, "federation": {"min_update_cosine": -0.3}, "precise_bn": False}
    opts = [same] * 3 + [{**same, "alter": ATTACKS}]
    _join([_start(real_site, k, 4, port, str(tmp_path), None, opts[k]) for k in range(4)], work_s=WORK_S)
    sites = _results(tmp_path, 4)
    for s in sites:
        assert "error" not in s, s
        assert [sorted(e) for e in s["excluded"]] == [[], [3], [3], [3]], s["excluded"]
        assert "points away from the other sites'" in s["excluded"][1][3], s["excluded"][1]
        assert "BatchNorm running variance" in s["excluded"][3][3], s["excluded"][3]  # ×8 extrapolates them
        assert [h["rejected"] for h in s["history"]] == [0.0] * 4
        assert all(math.isfinite(h["val/pooled/loss"]) for h in s["history"])
    for k in ("conv.weight", "bn.running_var", "head.weight"):
        assert all(torch.equal(s["final"][k], sites[0]["final"][k]) for s in sites)


@pytest.mark.parametrize("recipe", [{"precise_bn": False}, {"precise_bn": True, "ema_decay": 0.5}],
                         ids=["averaged-statistics", "precise-bn-and-weight-average"])
def test_an_aggregate_that_cannot_be_evaluated_is_never_committed_and_repeated_failures_stop_the_run(tmp_path, recipe):
    # Two sites: no median or direction to compare with, so site 1's weights × 1e30 pass screening, but the
    # mean model's validation loss is not finite. Round 2 fails alone; rounds 4, 5 and 6 fail in a row. With the
    # shipped recipe (site-local BatchNorm statistics, a weight average) the rejected round's aggregate must not
    # survive in the average either: every committed round's validation loss stays finite.
    port = free_port()
    blow_up = (1e30, "weights")
    opts = [{"rounds": 6, **recipe}, {"rounds": 6, "alter": {r: blow_up for r in (1, 3, 4, 5)}, **recipe}]
    _join([_start(real_site, k, 2, port, str(tmp_path), None, opts[k]) for k in range(2)], work_s=WORK_S)
    for k, s in enumerate(_results(tmp_path, 2)):
        assert s["error"] == "FederationAggregateError", s
        message = s["message"]
        assert message.startswith("round 6: the new global model failed its checks 3 rounds in a row"), message
        assert "pooled validation loss is" in message and "caused by site 1 (toy1)" in message, message
        assert "resume with --ckpt_path last" in message
        # round 2 was not committed and round 3 started from round 1's model; round 3 is the last committed
        starts = s["starts"]
        # site-local statistics are re-estimated for whichever model a site holds: compared where they are shared
        keys = ("conv.weight", "head.weight") + (() if recipe["precise_bn"] else ("bn.running_var",))
        for key in keys:
            assert torch.equal(starts[2][key], starts[1][key]) and not torch.equal(starts[1][key], starts[0][key])
            assert torch.equal(starts[5][key], starts[3][key])  # rounds 4 and 5 failed: still round 3's model
        assert committed_rounds(tmp_path / f"run{k}", k) == (3, 1)
    history = read_json(tmp_path / "run0" / "history.json")  # every round that ran, the rejected ones too
    assert [h["rejected"] for h in history] == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert all(h["val/pooled/loss"] is None for h in history if h["rejected"])  # not finite: null in JSON
    assert all(math.isfinite(h["val/pooled/loss"]) for h in history if not h["rejected"])
    lines = read_status(tmp_path / "run0").lines()
    assert "not committed (the new global model failed its checks): round 2, 4, 5" in lines, lines


def test_a_survivor_names_only_the_site_that_left(tmp_path):
    port = free_port()
    opts = [{"rounds": 4, "timeout": scaled(20)}] * 4
    opts[2] = {"rounds": 4, "timeout": scaled(20), "kill_at": 1}
    procs = [_start(real_site, k, 4, port, str(tmp_path), None, opts[k]) for k in range(4)]
    procs[2].join(scaled(STARTUP_S + WORK_S))
    assert procs[2].exitcode == -9  # killed, no clean-up
    _join(procs[:2] + procs[3:], work_s=WORK_S)
    for k in (0, 1, 3):
        s = torch.load(tmp_path / f"site{k}.pt", weights_only=False)
        assert s["error"] == "FederationTimeoutError", s
        named = re.search(r"site ([\d, ]+) left the federation", s["message"])
        assert named and named.group(1) == "2" and "during round 2" in s["message"], s["message"]


def test_sites_that_committed_different_first_rounds_start_round_1_again(tmp_path):
    port = free_port()
    full = tmp_path / "full"
    full.mkdir()
    _join([_start(real_site, k, 2, port, str(full), None, {"rounds": 3}) for k in range(2)], work_s=WORK_S)
    # a run stopped between the sites' commits of round 1: site 0 committed it, site 1 nothing
    port = free_port()
    _join([_start(real_site, k, 2, port, str(tmp_path), None, {"rounds": 1}) for k in range(2)], work_s=WORK_S)
    forget_rounds(tmp_path / "run1", 1)
    assert committed_rounds(tmp_path / "run0", 0) == (1, -1) and committed_rounds(tmp_path / "run1", 1) is None
    port = free_port()
    _join([_start(real_site, k, 2, port, str(tmp_path), None, {"rounds": 3, "ckpt_path": "last"}) for k in range(2)],
          work_s=WORK_S)
    for k, s in enumerate(_results(tmp_path, 2)):
        reference = torch.load(full / f"site{k}.pt", weights_only=False)
        assert "error" not in s, s
        assert [h["round"] for h in s["history"]] == [1.0, 2.0, 3.0]
        for key, value in reference["final"].items():  # the same run as one never stopped
            assert torch.equal(s["final"][key], value), key
        assert committed_rounds(tmp_path / f"run{k}", k) == (3, 2)


def test_under_secure_aggregation_no_single_sites_screening_numbers_or_direction_are_sent(tmp_path):
    # Nothing of a single site's update crosses in the clear: not its screening numbers (which nobody could check
    # against an update nobody sees), not its direction (the direction check's all_reduce would expose partial sums
    # of single sites' updates), and no site is named by re-aggregating without it; the aggregate checks still run
    # on the (masked) sum.
    port = free_port()
    opts = {"rounds": 2, "record_wire": True, "strategy": partial(SecureAggregation, FedAvg())}
    _join([_start(real_site, k, 3, port, str(tmp_path), None, opts) for k in range(3)], work_s=WORK_S)
    for s in _results(tmp_path, 3):
        assert "error" not in s, s
        assert not {"update_norm", "update_direction"} & set(s["wire"]), s["wire"]
        assert s["wire"].count("masked_parameters") == 2, s["wire"]
        assert s["cosines"] == [[], []] and s["excluded"] == [{}, {}]  # no screening ran
        assert [h["rejected"] for h in s["history"]] == [0.0, 0.0]
