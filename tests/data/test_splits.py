from collections import Counter

import pytest

from neurofed.data import split_subjects


def test_split_is_deterministic_and_order_independent():
    ids = [f"sub-{i:03d}" for i in range(40)]
    a = split_subjects(ids, seed=7)
    b = split_subjects(list(reversed(ids)) + ids[:5], seed=7)
    assert a == b
    assert split_subjects(ids, seed=8) != a
    counts = Counter(a.values())
    assert counts == {"train": 28, "val": 6, "test": 6}


@pytest.mark.parametrize("n", [3, 4, 5])
def test_small_cohorts_get_val_and_test(n):
    counts = Counter(split_subjects([f"s{i}" for i in range(n)]).values())
    assert counts["val"] >= 1 and counts["test"] >= 1 and counts["train"] >= 1


def test_sessions_of_one_subject_share_a_split(tiny_bids):
    from neurofed.data import index_bids

    records, _ = index_bids(tiny_bids)
    assignment = split_subjects([r.participant_id for r in records])
    by_subject = {}
    for r in records:
        by_subject.setdefault(r.participant_id, set()).add(assignment[r.participant_id])
    assert all(len(s) == 1 for s in by_subject.values())
    assert len(assignment) == 12


def test_bad_fractions():
    with pytest.raises(ValueError):
        split_subjects(["a"], fractions=(0.5, 0.5))
