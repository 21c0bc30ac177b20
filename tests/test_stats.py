"""The paired cluster bootstrap against cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from neurofed.stats import BootstrapWeights


def test_constant_difference_has_a_zero_width_interval() -> None:
    rng = np.random.default_rng(0)
    b = rng.uniform(0, 10, 50)
    ci = BootstrapWeights(np.arange(50), n_boot=500).mae_difference(b + 1.5, b)
    assert ci.estimate == pytest.approx(1.5) and ci.low == pytest.approx(1.5) and ci.high == pytest.approx(1.5)
    assert ci.excludes_zero


def test_mean_interval_matches_the_normal_approximation() -> None:
    """For n iid values the 95 % interval of the mean is about mean ± 1.96 SD / sqrt(n)."""
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, 4000)
    ci = BootstrapWeights(np.arange(x.size), n_boot=4000, seed=2).mean(x)
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    assert ci.estimate == pytest.approx(x.mean())
    assert ci.low == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert ci.high == pytest.approx(x.mean() + half, abs=0.1 * half)


def test_pairing_removes_the_shared_subject_variance() -> None:
    """Two models with large shared per-subject errors and a small true difference: the paired interval of the
    difference is narrow and excludes zero, while the two models' own intervals overlap."""
    rng = np.random.default_rng(3)
    shared = rng.exponential(8.0, 200)
    a, b = shared + rng.normal(0.5, 0.3, 200), shared
    weights = BootstrapWeights(np.arange(200), n_boot=2000)
    diff, ci_a, ci_b = weights.mae_difference(a, b), weights.mae(a), weights.mae(b)
    assert diff.excludes_zero and diff.high - diff.low < 0.2
    assert ci_a.low < ci_b.high


def test_clusters_move_together_and_strata_keep_their_size() -> None:
    """Two scans of one subject are drawn together; each stratum keeps its subject count in every replicate."""
    clusters = ["s1", "s1", "s2", "s3", "t1", "t2"]
    strata = ["x", "x", "x", "x", "y", "y"]
    weights = BootstrapWeights(clusters, strata, n_boot=300, seed=4)
    # clusters sorted: s1, s2, s3, t1, t2
    assert np.all(weights.weights[:, :3].sum(axis=1) == 3)
    assert np.all(weights.weights[:, 3:].sum(axis=1) == 2)
    assert list(weights.scans_per_cluster) == [2, 1, 1, 1, 1]
    # Stratum x's scans are 1, y's are 0: the share of x scans, (3 + k) / (5 + k), varies only with the number
    # k of times s1 (two scans) is drawn, so it lies between 3/5 (k = 0) and 6/8 (k = 3).
    ci = weights.mean([1, 1, 1, 1, 0, 0])
    assert ci.estimate == pytest.approx(4 / 6)
    assert 0.6 - 1e-12 <= ci.low <= ci.estimate <= ci.high <= 0.75 + 1e-12


def test_same_seed_same_replicates_and_bad_input_is_refused() -> None:
    a = BootstrapWeights(range(10), n_boot=50, seed=7).weights
    assert np.array_equal(a, BootstrapWeights(range(10), n_boot=50, seed=7).weights)
    with pytest.raises(ValueError, match="two strata"):
        BootstrapWeights(["a", "a"], ["x", "y"])
    with pytest.raises(ValueError, match="per-scan values"):
        BootstrapWeights(range(3)).mean([1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        BootstrapWeights([])


def test_mae_ratio_is_paired_and_scale_free() -> None:
    rng = np.random.default_rng(3)
    shared = rng.gamma(2.0, 3.0, size=300)  # per-subject difficulty both models share
    a, b = shared * 1.1, shared
    weights = BootstrapWeights(np.arange(300), n_boot=500, seed=0)
    ratio = weights.mae_ratio(a, b)
    assert ratio.estimate == pytest.approx(1.1)
    assert ratio.high - ratio.low < 1e-9  # a constant ratio: pairing leaves nothing to resample
    noisy = weights.mae_ratio(shared * rng.uniform(0.9, 1.3, size=300), b)
    assert noisy.low < noisy.estimate < noisy.high
    assert noisy.low > 1.0  # the errors are larger on average, and the interval says so
    assert weights.mae_ratio(a * 5, b * 5).estimate == pytest.approx(ratio.estimate)
    with pytest.raises(ValueError, match="zero"):
        weights.mae_ratio(a, np.zeros(300))
