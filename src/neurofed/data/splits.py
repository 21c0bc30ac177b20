"""Subject-level train/val/test split.

Splitting scans instead of subjects lets a second session of a test subject
leak into training and inflates accuracy; the split is therefore over subject
ids, and depends only on the set of ids and the seed (not on file order).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def split_subjects(
    subject_ids: Iterable[str],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 42,
) -> dict[str, str]:
    """Map each unique subject id to "train", "val" or "test".

    With at least 3 subjects, val and test get at least one subject each.
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    ids = sorted(set(subject_ids))
    n = len(ids)
    if n == 0:
        return {}
    total = float(sum(fractions))
    n_val = int(round(n * fractions[1] / total))
    n_test = int(round(n * fractions[2] / total))
    if n >= 3:
        n_val = max(n_val, 1) if fractions[1] > 0 else 0
        n_test = max(n_test, 1) if fractions[2] > 0 else 0
    while n_val + n_test > n - (1 if n >= 3 and fractions[0] > 0 else 0) and (n_val or n_test):
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    order = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    assignment: dict[str, str] = {}
    for rank, index in enumerate(order):
        if rank < n_test:
            assignment[ids[index]] = "test"
        elif rank < n_test + n_val:
            assignment[ids[index]] = "val"
        else:
            assignment[ids[index]] = "train"
    return assignment
