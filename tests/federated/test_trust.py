"""The trust layer against real processes: an outsider, an altered contribution, poisoned sites, disagreeing
sites. Each protection is shown by the attack failing."""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch
from timeouts import STARTUP_S, scaled
from trust_sites import outsider, real_site

from neurofed.federated.commit import committed_rounds
from neurofed.federated.simulate import free_port

pytestmark = pytest.mark.slow

#: The federation's timeout_s in the tests whose sites must meet before they can fail (a mismatch, an outsider).
MEET_S = scaled(10)


def _start(target, *args):
    p = mp.get_context("spawn").Process(target=target, args=args)
    p.start()
    return p


def _join(procs) -> None:
    # every process imports torch and Lightning, then meets the others within its timeout_s and trains a toy
    deadline = time.monotonic() + scaled(STARTUP_S + 60)
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _secret(tmp_path: Path, name: str = "secret", value: str = "x" * 32) -> str:
    path = tmp_path / name
    path.write_text(value)
    return str(path)


def _results(tmp_path: Path, n: int) -> list[dict]:
    return [torch.load(tmp_path / f"site{k}.pt", weights_only=False) for k in range(n)]


def test_an_outsider_without_the_secret_is_refused_before_anything_is_sent(tmp_path):
    port, secret = free_port(), _secret(tmp_path)
    site0 = _start(real_site, 0, 2, port, str(tmp_path), secret, {"timeout": MEET_S})
    # the real site 1 is ready and joins the moment the outsider has taken its seat
    site1 = _start(real_site, 1, 2, port, str(tmp_path), secret, {"timeout": MEET_S,
                                                                  "wait_for": str(tmp_path / "seat-taken")})
    time.sleep(3.0)  # site 0 hosts the rendezvous
    attacker = _start(outsider, port, 1, 2, str(tmp_path))
    _join([site0, attacker, site1])

    s0, s1 = _results(tmp_path, 2)
    assert s0.get("error") == "FederationAuthError", s0
    assert "seat 1" in s0["message"] and "failed authentication" in s0["message"], s0
    # the real site 1 is told its seat is taken, or (if site 0 already left) that site 0 is gone; never a hang
    assert s1["error"] in ("FederationConfigError", "FederationTimeoutError") and s1["seconds"] < MEET_S + scaled(5), s1
    assert ("already taken" in s1["message"]) or ("site 0" in s1["message"]), s1
    # everything the outsider received: nonces and a host name (64 bytes), tags (64) and a verdict (2) — no
    # parameter, no label statistic, no site name; its claim of 1e9 examples never reached an all_reduce
    received = torch.load(tmp_path / "outsider.pt", weights_only=False)
    assert [(t.dtype, t.numel()) for t in received[:3]] == [(torch.uint8, 64), (torch.uint8, 64), (torch.uint8, 2)]
    assert len(received) == 4 and received[3].tolist() == [-1.0]
    assert committed_rounds(tmp_path / "run0", 0) is None and not (tmp_path / "run0" / "history.json").exists()


def test_a_wrong_secret_is_named_at_every_site(tmp_path):
    port = free_port()
    procs = [_start(real_site, 0, 2, port, str(tmp_path), _secret(tmp_path, "a"), {}),
             _start(real_site, 1, 2, port, str(tmp_path), _secret(tmp_path, "b", "y" * 32), {})]
    _join(procs)
    s0, s1 = _results(tmp_path, 2)
    assert s0["error"] == s1["error"] == "FederationAuthError"
    assert "seat 1" in s0["message"] and "seat 0" in s1["message"]


def test_a_contribution_altered_after_the_handshake_stops_the_round_before_commit(tmp_path):
    port, secret = free_port(), _secret(tmp_path)
    # site 2 receives an altered parameter sum in round 2 (its second aggregation)
    opts = [{"rounds": 3}, {"rounds": 3}, {"rounds": 3, "alter_at": 2}]
    procs = [_start(real_site, k, 3, port, str(tmp_path), secret, opts[k]) for k in range(3)]
    _join(procs)
    for k, s in enumerate(_results(tmp_path, 3)):
        assert s["error"] == "FederationIntegrityError", s
        assert "round 2" in s["message"] and "site(s) 2" in s["message"]
        assert committed_rounds(tmp_path / f"run{k}", k)[0] == 1  # round 2 was never written


def test_non_finite_and_outsized_updates_are_left_out_and_training_goes_on(tmp_path):
    port, secret = free_port(), _secret(tmp_path)
    opts = [{"rounds": 3}, {"rounds": 3, "poison": (1, "nan")}, {"rounds": 3, "poison": (1, "huge")},
            {"rounds": 3}]
    procs = [_start(real_site, k, 4, port, str(tmp_path), secret, opts[k]) for k in range(4)]
    _join(procs)
    sites = _results(tmp_path, 4)
    for s in sites:
        assert "error" not in s, s
        assert all(torch.isfinite(v).all() for v in s["final"].values() if v.is_floating_point())
        assert [h["round"] for h in s["history"]] == [1.0, 2.0, 3.0]
        assert all(math.isfinite(h["val/pooled/loss"]) for h in s["history"])
        assert [h["screened_out"] for h in s["history"]] == [0.0, 2.0, 0.0]
    for k in ("conv.weight", "head.weight"):
        assert all(torch.equal(s["final"][k], sites[0]["final"][k]) for s in sites)


@pytest.mark.parametrize(("field", "option"), [
    ("seed", {"seed": 7}), ("aggregated parameters", {"model": {"bn": False}}),
    ("local epochs or steps", {"local_epochs": 2}), ("rounds", {"rounds": 3}), ("num_sites", {"num_sites": 3}),
])
def test_each_disagreeing_setting_fails_every_site_within_the_timeout_naming_it(tmp_path, field, option):
    port, secret = free_port(), _secret(tmp_path)
    procs = [_start(real_site, 0, 2, port, str(tmp_path), secret, {"timeout": MEET_S}),
             _start(real_site, 1, 2, port, str(tmp_path), secret, {"timeout": MEET_S, **option})]
    _join(procs)
    for s in _results(tmp_path, 2):
        assert s["error"] in ("FederationMismatchError", "FederationConfigError"), s
        assert field in s["message"] and s["seconds"] < MEET_S + scaled(5)
