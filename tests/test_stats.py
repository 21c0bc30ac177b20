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


def test_resampling_seeds_gives_the_seeds_own_spread() -> None:
    """Every scan of a seed has the same error: the subjects add nothing, so the hierarchical interval of the
    MAE is that of the mean of seeds drawn with replacement: with two seeds its ends are the two seeds' MAEs."""
    seeds = np.repeat([0, 1], 30)
    errors = np.where(seeds == 0, 4.0, 9.0)
    clusters = [f"{s}/{i}" for s, i in zip(seeds, range(60))]
    strata = [f"{s}/site" for s in seeds]
    hierarchical = BootstrapWeights(clusters, strata, n_boot=2000, seed=1, groups=seeds).mae(errors)
    assert hierarchical.estimate == pytest.approx(6.5)
    assert hierarchical.low == pytest.approx(4.0) and hierarchical.high == pytest.approx(9.0)
    # resampling subjects only cannot see the seeds' disagreement
    subjects_only = BootstrapWeights(clusters, strata, n_boot=2000, seed=1).mae(errors)
    assert subjects_only.high - subjects_only.low == pytest.approx(0.0)


def test_two_stage_variance_matches_its_closed_form() -> None:
    """S seeds, n subjects each: drawing S seeds with replacement, then n subjects within each copy, gives the
    grand mean the variance (1/S) * [ (1/S) sum (m_s - m)^2 + (1/S) sum v_s / n ] (v_s: the seed's
    population variance of its subjects' errors)."""
    rng = np.random.default_rng(5)
    n_seeds, n = 5, 40
    seed_means = rng.normal(6.0, 1.5, n_seeds)
    errors = np.concatenate([rng.gamma(4.0, m / 4.0, n) for m in seed_means])
    seeds = np.repeat(np.arange(n_seeds), n)
    clusters = np.arange(errors.size)
    weights = BootstrapWeights(clusters, seeds, n_boot=20000, seed=2, groups=seeds)
    sums = weights._cluster_sums(errors)
    replicates = (weights.weights @ sums) / (weights.weights @ weights.scans_per_cluster)
    m = errors.reshape(n_seeds, n).mean(axis=1)
    v = errors.reshape(n_seeds, n).var(axis=1)
    expected = (np.mean((m - m.mean()) ** 2) + np.mean(v) / n) / n_seeds
    assert replicates.var() == pytest.approx(expected, rel=0.05)


def test_a_stratum_must_lie_in_one_group() -> None:
    with pytest.raises(ValueError, match="two groups"):
        BootstrapWeights(["a", "b"], ["x", "x"], groups=[0, 1])
