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
from trust_sites import outsider, real_site, relay

from neurofed.federated.commit import committed_rounds
from neurofed.federated.simulate import free_port

pytestmark = pytest.mark.slow

#: The federation's timeout_s in the tests whose sites must meet before they can fail (a mismatch, an outsider).
MEET_S = scaled(10)


def _start(target, *args):
    p = mp.get_context("spawn").Process(target=target, args=args)
    p.start()
    return p


def _join(procs, work_s: float = 60) -> None:
    # every process imports torch and Lightning, then meets the others within its timeout_s and trains a toy
    # (``work_s`` on an idle machine)
    deadline = time.monotonic() + scaled(STARTUP_S + work_s)
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _secret(tmp_path: Path, name: str = "secret", value: str = "x" * 64) -> str:
    path = tmp_path / name
    path.write_text(value)
    path.chmod(0o600)
    return str(path)


def _identities(tmp_path: Path, n: int) -> list[dict]:
    """Key files and a roster for ``n`` seats; the options each real site needs to use them."""
    from neurofed.federated.identity import Roster, RosterEntry, SiteIdentity

    ids = [SiteIdentity.ephemeral() for _ in range(n)]
    for k, identity in enumerate(ids):
        identity.write(tmp_path / f"site{k}.key")
    (tmp_path / "roster.txt").write_text(Roster([RosterEntry(k, f"hospital{k}", i.public) for k, i in enumerate(ids)]).text())
    return [{"key_file": str(tmp_path / f"site{k}.key"), "roster_file": str(tmp_path / "roster.txt")} for k in range(n)]


def _results(tmp_path: Path, n: int) -> list[dict]:
    return [torch.load(tmp_path / f"site{k}.pt", weights_only=False) for k in range(n)]


def test_a_store_outsider_without_the_secret_cannot_hold_a_seat(tmp_path):
    """TCPStore lets anyone list and write keys. An outsider squats seat 1 (under every prefix it can list, and
    the old protocol's names) before site 1 arrives; its values carry no tag under the secret, so they are no
    claim, and the federation forms and trains as soon as the real site 1 comes."""
    port, secret = free_port(), _secret(tmp_path)
    site0 = _start(real_site, 0, 2, port, str(tmp_path), secret, {"timeout": MEET_S})
    site1 = _start(real_site, 1, 2, port, str(tmp_path), secret, {"timeout": MEET_S,
                                                                  "wait_for": str(tmp_path / "outsider-done")})
    time.sleep(3.0)  # site 0 hosts the rendezvous
    attacker = _start(outsider, port, 1, str(tmp_path))
    _join([site0, attacker, site1])
    squatted = torch.load(tmp_path / "outsider.pt", weights_only=False)
    assert squatted["writes"] > 0 and any(p.startswith("neurofed/") for p in squatted["prefixes"]), squatted
    for s in _results(tmp_path, 2):
        assert "error" not in s, s
        assert [h["round"] for h in s["history"]] == [1.0, 2.0]
    assert committed_rounds(tmp_path / "run0", 0)[0] == 2


def test_a_wrong_secret_never_meets_the_federation_and_is_named_with_the_fix(tmp_path):
    port = free_port()
    procs = [_start(real_site, 0, 2, port, str(tmp_path), _secret(tmp_path, "a"), {"timeout": 8}),
             _start(real_site, 1, 2, port, str(tmp_path), _secret(tmp_path, "b", "y" * 64), {"timeout": 8})]
    _join(procs)
    for s in _results(tmp_path, 2):
        assert s["error"] == "FederationTimeoutError" and "same address, port, num_sites and secret" in s["message"], s


def test_a_relay_that_forwards_a_genuine_sites_handshake_is_refused(tmp_path):
    """The relay holds the secret but not site 1's key. It sits in seat 1 and, on the path to the genuine site 1,
    plays seat 0 to it, forwarding site 1's genuine hello and signature into the real federation. The signature
    binds the nonces of the session site 1 saw, which are not the real federation's: refused, nothing else sent."""
    real_port, fake_port, secret = free_port(), free_port(), _secret(tmp_path)
    ids = _identities(tmp_path, 2)
    site0 = _start(real_site, 0, 2, real_port, str(tmp_path), secret, {"timeout": scaled(15), **ids[0]})
    time.sleep(3.0)  # site 0 hosts the real rendezvous
    man_in_the_middle = _start(relay, real_port, fake_port, secret, str(tmp_path))
    time.sleep(1.0)  # the relay hosts the rendezvous that site 1 reaches
    genuine1 = _start(real_site, 1, 2, real_port, str(tmp_path), secret, {"timeout": scaled(15), "port": fake_port, **ids[1]})
    _join([site0, man_in_the_middle, genuine1])
    got = torch.load(tmp_path / "relay.pt", weights_only=False)
    assert got.get("forwarded"), got
    s0, s1 = _results(tmp_path, 2)
    assert s0["error"] == "FederationAuthError", s0
    assert "seat 1 (hospital1)" in s0["message"] and "membership step does not verify" in s0["message"], s0
    assert s1["error"] == "FederationAuthError"  # the relay could not sign as seat 0 either
    # all the relay got from the real federation: hellos, signatures and verdicts; no round was written
    assert [t.numel() for t in got["real hellos"]] == [96, 96] and [t.numel() for t in got["real verdicts"]] == [2, 2]
    assert committed_rounds(tmp_path / "run0", 0) is None


def test_a_contribution_altered_after_the_handshake_stops_the_round_before_commit(tmp_path):
    port, secret = free_port(), _secret(tmp_path)
    # site 2 receives an altered parameter sum in round 2 (its second aggregation)
    opts = [{"rounds": 3}, {"rounds": 3}, {"rounds": 3, "alter_at": (2, "parameters")}]
    procs = [_start(real_site, k, 3, port, str(tmp_path), secret, opts[k]) for k in range(3)]
    _join(procs)
    for k, s in enumerate(_results(tmp_path, 3)):
        assert s["error"] == "FederationIntegrityError", s
        assert "round 2" in s["message"] and "site(s) 2" in s["message"]
        assert committed_rounds(tmp_path / f"run{k}", k)[0] == 1  # round 2 was never written


def test_a_test_statistic_altered_on_the_way_is_caught_by_the_round_check_of_test(tmp_path):
    """``test()`` gets the round check too: site 1 receives site 0's test metric sums altered (each fit round
    sums two metric vectors, so the first test gather is call 2·2 + 1)."""
    port, secret = free_port(), _secret(tmp_path)
    opts = [{"rounds": 2, "test": True}, {"rounds": 2, "test": True, "alter_at": (2 * 2 + 1, "metric_stats")}]
    procs = [_start(real_site, k, 2, port, str(tmp_path), secret, opts[k]) for k in range(2)]
    _join(procs)
    for s in _results(tmp_path, 2):
        assert s["error"] == "FederationIntegrityError", s
        assert "do not hold the same result" in s["message"] and "test" not in s, s
        assert [h["round"] for h in s["history"]] == [1.0, 2.0]


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
