"""The handshake at several sites in threads: identities and roster, every fingerprint field, the resume round,
and a transcript that no relay can alter."""

from __future__ import annotations

import threading

import pytest
from timeouts import scaled
from threaded_sites import ThreadGroup, _Board

from neurofed.federated.errors import FederationAuthError, FederationMismatchError
from neurofed.federated.handshake import handshake
from neurofed.federated.identity import Roster, RosterEntry, SiteIdentity

BASE = {"neurofed version": "0.1.0", "model": "BrainAgeModule", "aggregated parameters": "12 tensors, 300 values",
        "strategy": "FedAvg(weighted=True)", "rounds": "10", "local epochs or steps": "epochs=1, steps=None",
        "seed": "0", "sampling": "sites_per_round=None", "num_sites": "3", "precision": "32-true",
        "stopping": "patience=None", "screening": "max_update_norm=None", "resuming": "False"}


def _identities(n: int) -> tuple[list[SiteIdentity], Roster]:
    ids = [SiteIdentity.ephemeral() for _ in range(n)]
    return ids, Roster([RosterEntry(k, f"hospital{k}", i.public) for k, i in enumerate(ids)])


def _run(n: int, fingerprints: list[dict], committed=None, declared=None, ids=None, roster=None,
         group_class=ThreadGroup) -> list:
    if ids is None:
        ids, roster = _identities(n)
    board, out = _Board(n), [None] * n

    def site(k: int) -> None:
        try:
            out[k] = handshake(group_class(board, k), ids[k], roster, fingerprints[k],
                               None if committed is None else committed[k], (declared or [0] * n)[k])
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out[k] = e

    threads = [threading.Thread(target=site, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(scaled(30))
    return out


def test_sites_with_their_roster_keys_agree_on_a_session_and_a_coin():
    out = _run(3, [BASE] * 3, declared=[10, 20, 30])
    assert len({r.session for r in out}) == 1 and all(r.declared == [10.0, 20.0, 30.0] for r in out)
    assert len({r.coin for r in out}) == 1 and len(out[0].coin) == 32
    assert out[0].names == ["hospital0", "hospital1", "hospital2"]
    again = _run(3, [BASE] * 3)
    assert again[0].session != out[0].session and again[0].coin != out[0].coin  # fresh every time


def test_a_seat_whose_key_is_not_the_rosters_is_named_by_every_other_site():
    ids, roster = _identities(3)
    impostor = [ids[0], ids[1], SiteIdentity.ephemeral()]  # holds seat 2 without seat 2's key
    out = _run(3, [BASE] * 3, ids=impostor, roster=roster)
    assert isinstance(out[2], FederationAuthError) and "not the one the roster" in str(out[2])
    for k in (0, 1):
        assert isinstance(out[k], FederationAuthError) and "seat 2 (hospital2)" in str(out[k]), out[k]


def test_one_member_cannot_sign_for_another():
    """Site 1 holds its own roster key and tries to take seat 2 as well: its key is not seat 2's."""
    ids, roster = _identities(3)
    out = _run(3, [BASE] * 3, ids=[ids[0], ids[1], ids[1]], roster=roster)
    assert all(isinstance(r, FederationAuthError) for r in out)
    assert "seat 2 (hospital2)" in str(out[0])


class _AltersDeclaredCount(ThreadGroup):
    """A relay on site 1's link: it forwards everything, but raises site 1's declared count to 1e9 in step 3
    as site 0 receives it (what an unsigned step allowed)."""

    def all_gather(self, t, kind):
        out = super().all_gather(t, kind)
        if self.site_rank == 0 and t.numel() == 24 + 32:  # the resume/declared/coin message
            import struct

            raw = bytearray(bytes(out[1].tolist()))
            raw[16:24] = struct.pack("<d", 1e9)
            out[1] = type(t)(list(raw)).to(t.dtype)
        return out


def test_a_relay_that_alters_any_step_after_membership_is_refused_by_the_signed_transcript():
    out = _run(3, [BASE] * 3, declared=[10, 20, 30], group_class=_AltersDeclaredCount)
    assert all(isinstance(r, FederationAuthError) for r in out), out
    assert "transcript" in str(out[0]) and "seat 1 (hospital1)" in str(out[0])


@pytest.mark.parametrize("field", sorted(BASE))
def test_each_fingerprint_field_is_compared_and_named_with_every_sites_value(field):
    other = dict(BASE, **{field: BASE[field] + "-other"})
    out = _run(3, [BASE, other, BASE])
    for result in out:
        assert isinstance(result, FederationMismatchError), result
        assert repr(field) in str(result) and f"site 1: {BASE[field]}-other" in str(result)
        assert f"site 0: {BASE[field]}" in str(result)


def test_resume_from_the_newest_round_every_site_committed():
    out = _run(3, [BASE] * 3, committed=[(5, 4), (4, 3), (5, 4)])
    assert [r.resume_round for r in out] == [4, 4, 4]
    out = _run(2, [BASE] * 2, committed=[(5, 4), (3, 2)])  # round 3 is gone at site 0
    assert all(isinstance(r, FederationMismatchError) and "no round is committed at every site" in str(r) for r in out)


def test_sites_that_committed_different_first_rounds_all_start_round_1_again():
    # stopped between the sites' commits of round 1: some hold it, others nothing
    out = _run(3, [BASE] * 3, committed=[(1, -1), (-1, -1), (1, -1)])
    assert [r.resume_round for r in out] == [0, 0, 0]


def test_a_site_without_rounds_the_others_went_past_names_the_one_command_that_starts_over():
    out = _run(2, [BASE] * 2, committed=[(3, 2), (-1, -1)])
    for r in out:
        assert isinstance(r, FederationMismatchError), r
        assert "site 0 holds rounds 2 and 3, site 1 holds no committed round" in str(r)
        assert "--trainer.overwrite true" in str(r)
    out = _run(2, [BASE] * 2, committed=[(-1, -1), (-1, -1)])
    assert all(isinstance(r, FederationMismatchError) and "nothing to resume" in str(r) for r in out)
