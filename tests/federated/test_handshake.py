"""The handshake at several sites in threads: membership, every fingerprint field, the resume round."""

from __future__ import annotations

import threading

import pytest
from threaded_sites import ThreadGroup, _Board

from neurofed.federated.errors import FederationAuthError, FederationMismatchError
from neurofed.federated.handshake import handshake

BASE = {"neurofed version": "0.1.0", "model": "BrainAgeModule", "aggregated parameters": "12 tensors, 300 values",
        "strategy": "FedAvg(weighted=True)", "rounds": "10", "local epochs or steps": "epochs=1, steps=None",
        "seed": "0", "sampling": "sites_per_round=None", "num_sites": "3", "precision": "32-true",
        "stopping": "patience=None", "screening": "max_update_norm=None", "resuming": "False"}


def _run(n: int, secrets: list[bytes | None], fingerprints: list[dict], committed=None, declared=None) -> list:
    board, out = _Board(n), [None] * n

    def site(k: int) -> None:
        try:
            out[k] = handshake(ThreadGroup(board, k), secrets[k], fingerprints[k],
                               None if committed is None else committed[k], (declared or [0] * n)[k])
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out[k] = e

    threads = [threading.Thread(target=site, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_sites_with_the_secret_agree_and_share_a_session():
    out = _run(3, [b"s" * 32] * 3, [BASE] * 3, declared=[10, 20, 30])
    assert len({r.session for r in out}) == 1 and all(r.declared == [10.0, 20.0, 30.0] for r in out)


def test_a_seat_without_the_secret_is_named_by_every_other_site():
    out = _run(3, [b"s" * 32, b"s" * 32, b"t" * 32], [BASE] * 3)
    for k in (0, 1):
        assert isinstance(out[k], FederationAuthError) and "seat 2" in str(out[k])
    assert isinstance(out[2], FederationAuthError)


@pytest.mark.parametrize("field", sorted(BASE))
def test_each_fingerprint_field_is_compared_and_named_with_every_sites_value(field):
    other = dict(BASE, **{field: BASE[field] + "-other"})
    out = _run(3, [b"s" * 32] * 3, [BASE, other, BASE])
    for result in out:
        assert isinstance(result, FederationMismatchError), result
        assert repr(field) in str(result) and f"site 1: {BASE[field]}-other" in str(result)
        assert f"site 0: {BASE[field]}" in str(result)


def test_resume_from_the_newest_round_every_site_committed():
    out = _run(3, [None] * 3, [BASE] * 3, committed=[(5, 4), (4, 3), (5, 4)])
    assert [r.resume_round for r in out] == [4, 4, 4]
    out = _run(2, [None] * 2, [BASE] * 2, committed=[(5, 4), (3, 2)])  # round 3 is gone at site 0
    assert all(isinstance(r, FederationMismatchError) and "no round is committed at every site" in str(r) for r in out)


def test_sites_that_committed_different_first_rounds_all_start_round_1_again():
    # stopped between the sites' commits of round 1: some hold it, others nothing
    out = _run(3, [None] * 3, [BASE] * 3, committed=[(1, -1), (-1, -1), (1, -1)])
    assert [r.resume_round for r in out] == [0, 0, 0]


def test_a_site_without_rounds_the_others_went_past_names_the_one_command_that_starts_over():
    out = _run(2, [None] * 2, [BASE] * 2, committed=[(3, 2), (-1, -1)])
    for r in out:
        assert isinstance(r, FederationMismatchError), r
        assert "site 0 holds rounds 2 and 3, site 1 holds no committed round" in str(r)
        assert "--trainer.overwrite true" in str(r)
    out = _run(2, [None] * 2, [BASE] * 2, committed=[(-1, -1), (-1, -1)])
    assert all(isinstance(r, FederationMismatchError) and "nothing to resume" in str(r) for r in out)
