"""Paired, stratified cluster bootstrap of test-set MAE: intervals for one model and for differences.

A benchmark's test set is small, so a difference of two MAEs means little without an interval. The
bootstrap here:

- resamples **subjects** (clusters), not scans: a subject's sessions go in or out together;
- resamples **within strata** (e.g. one stratum per seed and site), so every replicate keeps each seed's and
  each site's number of test subjects, as a new draw of the same study would;
- is **paired**: every model is evaluated on the same resampled subjects (the replicate weights depend only
  on the clusters, the strata and the seed), so the interval of a difference carries no between-subject
  variance that both models share;
- reports percentile intervals of the statistic computed on all the pooled test scans (MAE over every scan
  of every stratum), next to the point estimate on the original sample;
- optionally resamples **groups** above the strata first (``groups``: the training seed of each scan), so an
  interval covers training randomness as well as the choice of test subjects: a comparison of two recipes
  is a property of the recipes, not of one lucky initialisation (a two-stage, hierarchical bootstrap:
  Davison & Hinkley 1997, §3.8). Each replicate draws as many seeds as there are, with replacement, and
  resamples the subjects of every drawn copy of a seed anew.

    weights = BootstrapWeights(clusters, strata, n_boot=2000, seed=0)
    weights = BootstrapWeights(clusters, strata, groups=seeds)   # seeds and subjects resampled
    weights.mae(abs_err_a)                                # Interval of model A's MAE
    weights.mae_difference(abs_err_a, abs_err_b)          # Interval of MAE(A) - MAE(B)

All arrays are per scan and aligned: scan i is the same scan for every model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["BootstrapWeights", "Interval"]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def format(self, digits: int = 2) -> str:
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


class BootstrapWeights:
    """Replicate weights of a stratified cluster bootstrap, shared by every model evaluated with them.

    Args:
        clusters: Per scan, the id of its resampling unit (a subject; make it unique across strata, e.g.
            ``f"{seed}/{site}/{subject}"``).
        strata: Per scan, its stratum; subjects are resampled with replacement inside each stratum, as
            many as it holds. ``None``: one stratum.
        n_boot: Number of bootstrap replicates.
        seed: Seed of the resampling; the same inputs and seed give the same replicates.
        level: Coverage of the percentile intervals.
        groups: Per scan, the unit resampled above the strata (e.g. the training seed); every stratum must lie
            in one group. ``None``: the strata are kept as they are in every replicate.
    """

    def __init__(self, clusters: Sequence, strata: Sequence | None = None, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95, groups: Sequence | None = None) -> None:
        clusters = np.asarray([str(c) for c in clusters])
        if clusters.size == 0:
            raise ValueError("no scans to bootstrap: clusters is empty")
        strata = np.zeros(clusters.size, dtype=int) if strata is None else np.asarray([str(s) for s in strata])
        if strata.shape != clusters.shape:
            raise ValueError(f"clusters ({clusters.size}) and strata ({strata.size}) differ in length")
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        self.level = level
        self.n_boot = n_boot
        unique, self.scan_cluster = np.unique(clusters, return_inverse=True)
        cluster_stratum = {}
        for c, s in zip(self.scan_cluster, strata):
            if cluster_stratum.setdefault(c, s) != s:
                raise ValueError(f"cluster {unique[c]!r} lies in two strata ({cluster_stratum[c]!r}, {s!r})")
        rng = np.random.Generator(np.random.PCG64(seed))
        # weights[b, c]: how many times replicate b drew cluster c (multinomial within its stratum).
        self.weights = np.zeros((n_boot, unique.size))
        by_stratum: dict = {}
        for c in range(unique.size):
            by_stratum.setdefault(cluster_stratum[c], []).append(c)
        copies = self._group_copies(groups, strata, rng, n_boot)
        for stratum in sorted(by_stratum):
            members = np.asarray(by_stratum[stratum])
            k = members.size
            if copies is None:
                self.weights[:, members] = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot)
            else:  # c copies of the stratum's group, each resampled anew: k * c draws in all
                self.weights[:, members] = rng.multinomial(k * copies[stratum], np.full(k, 1.0 / k))
        self.scans_per_cluster = np.bincount(self.scan_cluster, minlength=unique.size).astype(float)

    @staticmethod
    def _group_copies(groups: Sequence | None, strata: np.ndarray, rng: np.random.Generator,
                      n_boot: int) -> dict | None:
        """Per stratum, how many copies of its group each replicate drew (``None`` without groups)."""
        if groups is None:
            return None
        groups = np.asarray([str(g) for g in groups])
        if groups.shape != strata.shape:
            raise ValueError(f"groups ({groups.size}) and strata ({strata.size}) differ in length")
        stratum_group: dict = {}
        for s, g in zip(strata, groups):
            if stratum_group.setdefault(s, g) != g:
                raise ValueError(f"stratum {s!r} lies in two groups ({stratum_group[s]!r}, {g!r}); make strata "
                                 "group-specific, e.g. f'{seed}/{site}'")
        names = sorted(set(stratum_group.values()))
        drawn = rng.multinomial(len(names), np.full(len(names), 1.0 / len(names)), size=n_boot)  # [n_boot, G]
        column = {g: i for i, g in enumerate(names)}
        return {s: drawn[:, column[g]] for s, g in stratum_group.items()}

    def _cluster_sums(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=float)
        if values.shape != self.scan_cluster.shape:
            raise ValueError(f"expected {self.scan_cluster.size} per-scan values, got shape {values.shape}")
        if not np.all(np.isfinite(values)):
            raise ValueError("per-scan values must be finite")
        return np.bincount(self.scan_cluster, weights=values, minlength=self.scans_per_cluster.size)

    def _interval(self, estimate: float, replicates: np.ndarray) -> Interval:
        tail = (1 - self.level) / 2 * 100
        low, high = np.percentile(replicates, [tail, 100 - tail])
        return Interval(float(estimate), float(low), float(high), self.level)

    def mean(self, values: Sequence[float]) -> Interval:
        """Interval of the mean of a per-scan quantity over all scans (e.g. absolute errors: the MAE)."""
        sums = self._cluster_sums(values)
        estimate = sums.sum() / self.scans_per_cluster.sum()
        replicates = (self.weights @ sums) / (self.weights @ self.scans_per_cluster)
        return self._interval(estimate, replicates)

    def mae(self, abs_err: Sequence[float]) -> Interval:
        """Interval of one model's MAE, given its per-scan absolute errors."""
        return self.mean(abs_err)

    def mae_difference(self, abs_err_a: Sequence[float], abs_err_b: Sequence[float]) -> Interval:
        """Interval of MAE(A) - MAE(B) on the same resampled subjects (negative: A has the lower error)."""
        return self.mean(np.asarray(abs_err_a, dtype=float) - np.asarray(abs_err_b, dtype=float))

    def mae_ratio(self, abs_err_a: Sequence[float], abs_err_b: Sequence[float]) -> Interval:
        """Interval of MAE(A) / MAE(B) on the same resampled subjects: for targets stated relative to a
        reference ("within 10 % of"), where a difference in years would hide the reference's own size."""
        sums_a, sums_b = self._cluster_sums(abs_err_a), self._cluster_sums(abs_err_b)
        if sums_b.sum() <= 0:
            raise ValueError("MAE(B) is zero: the ratio is undefined")
        replicates = (self.weights @ sums_a) / np.maximum(self.weights @ sums_b, np.finfo(float).tiny)
        return self._interval(sums_a.sum() / sums_b.sum(), replicates)
