"""Regression metrics built from sufficient statistics, so sites can pool them without sharing predictions.

Every metric here (MAE, RMSE, Pearson r and its p-value, R², brain-age gap mean/SD and the linear bias
correction) is a function of seven sums. A site computes the sums on its own predictions, the federation
adds the sums, and the pooled metrics equal those of the concatenated predictions — yet no prediction,
subject id or image ever leaves the site. ``RegressionStats.FIELDS`` is the explicit list of what crosses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats as scipy_stats

__all__ = ["BiasCorrection", "RegressionStats", "SplitStats", "format_number", "format_table"]


def _as_float64(values: Any) -> np.ndarray:
    """Flatten a tensor, array or sequence into a float64 numpy vector (tensors are detached, moved to CPU)."""
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


@dataclass(frozen=True)
class RegressionStats:
    """Float64 sufficient statistics of (target x, prediction y) pairs, e = y - x.

    Additive: the stats of a union of disjoint prediction sets are the sum of their stats. ``sum(list)``
    works because ``0 + stats`` returns ``stats``.
    """

    n: float = 0.0
    sum_x: float = 0.0
    sum_y: float = 0.0
    sum_xy: float = 0.0
    sum_xx: float = 0.0
    sum_yy: float = 0.0
    sum_abs_e: float = 0.0

    FIELDS = ("n", "sum_x", "sum_y", "sum_xy", "sum_xx", "sum_yy", "sum_abs_e")

    @classmethod
    def from_predictions(cls, pred: Any, target: Any) -> RegressionStats:
        """Sums over the pairs whose target is finite (NaN targets mean "label unknown" and are skipped)."""
        y = _as_float64(pred)
        x = _as_float64(target)
        if x.shape != y.shape:
            raise ValueError(
                f"neurofed.metrics: pred has {y.size} values but target has {x.size}; pass one prediction "
                "per target."
            )
        keep = np.isfinite(x)
        x, y = x[keep], y[keep]
        return cls(
            n=float(x.size),
            sum_x=float(x.sum()),
            sum_y=float(y.sum()),
            sum_xy=float((x * y).sum()),
            sum_xx=float((x * x).sum()),
            sum_yy=float((y * y).sum()),
            sum_abs_e=float(np.abs(y - x).sum()),
        )

    @staticmethod
    def tensor_from_predictions(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The seven sums as a float64 tensor on the inputs' device, without a host sync.

        Lets a training loop accumulate statistics batch by batch on the accelerator and convert once per
        epoch with ``from_tensor``. NaN targets are skipped, as in ``from_predictions``.
        """
        y = pred.detach().reshape(-1).to(torch.float64)
        x = target.detach().reshape(-1).to(device=y.device, dtype=torch.float64)
        keep = torch.isfinite(x)
        x = torch.where(keep, x, torch.zeros_like(x))
        y = torch.where(keep, y, torch.zeros_like(y))
        return torch.stack([
            keep.sum().to(torch.float64),
            x.sum(),
            y.sum(),
            (x * y).sum(),
            (x * x).sum(),
            (y * y).sum(),
            (y - x).abs().sum(),
        ])

    def __add__(self, other: RegressionStats) -> RegressionStats:
        if not isinstance(other, RegressionStats):
            return NotImplemented
        return RegressionStats(*(getattr(self, f) + getattr(other, f) for f in self.FIELDS))

    def __radd__(self, other: Any) -> RegressionStats:
        if isinstance(other, (int, float)) and other == 0:
            return self
        return NotImplemented

    def to_tensor(self) -> torch.Tensor:
        """The seven sums as a float64 tensor, in ``FIELDS`` order (what an all_reduce carries)."""
        return torch.tensor([getattr(self, f) for f in self.FIELDS], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> RegressionStats:
        """Inverse of ``to_tensor`` (any device / floating dtype)."""
        values = t.detach().to(device="cpu", dtype=torch.float64).reshape(-1).tolist()
        if len(values) != len(cls.FIELDS):
            raise ValueError(
                f"neurofed.metrics: RegressionStats.from_tensor expects {len(cls.FIELDS)} values "
                f"{cls.FIELDS}, got {len(values)}."
            )
        return cls(*values)

    # -- derived moments -------------------------------------------------------------------------------
    def _centered(self) -> tuple[float, float, float]:
        """(Sxx, Syy, Sxy): sums of squares / cross products around the means."""
        n = self.n
        sxx = self.sum_xx - self.sum_x * self.sum_x / n
        syy = self.sum_yy - self.sum_y * self.sum_y / n
        sxy = self.sum_xy - self.sum_x * self.sum_y / n
        return max(sxx, 0.0), max(syy, 0.0), sxy

    def compute(self) -> dict[str, float]:
        """n, mae, rmse, r, p (two-sided), r2 (1 - SSE/SST), gap_mean, gap_sd (ddof=1); NaN where undefined."""
        nan = float("nan")
        n = self.n
        out = {"n": int(round(n)), "mae": nan, "rmse": nan, "r": nan, "p": nan, "r2": nan,
               "gap_mean": nan, "gap_sd": nan}
        if n <= 0:
            return out
        sse = max(self.sum_yy - 2.0 * self.sum_xy + self.sum_xx, 0.0)
        gap_mean = (self.sum_y - self.sum_x) / n
        out["mae"] = self.sum_abs_e / n
        out["rmse"] = math.sqrt(sse / n)
        out["gap_mean"] = gap_mean
        if n >= 2:
            out["gap_sd"] = math.sqrt(max(sse - n * gap_mean * gap_mean, 0.0) / (n - 1))
        sxx, syy, sxy = self._centered()
        if sxx > 0:
            out["r2"] = 1.0 - sse / sxx
        if n >= 3 and sxx > 0 and syy > 0:
            r = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
            out["r"] = r
            df = n - 2
            if abs(r) >= 1.0:
                out["p"] = 0.0
            else:
                t = r * math.sqrt(df / (1.0 - r * r))
                out["p"] = float(2.0 * scipy_stats.t.sf(abs(t), df))
        return out


@dataclass(frozen=True)
class SplitStats:
    """What one split (a site's validation or test scans) reduces to: the one accumulator of neurofed.

    ``loss`` holds ``[loss sum, example count]``, ``model`` the :class:`RegressionStats` sums of the
    predictions and ``baseline`` those of predicting the training mean for every scan (``None`` for a model
    without one). All are float64 tensors, summed batch by batch on the device (:meth:`batch`, no host
    read) and added across a site's processes and across sites; :meth:`compute` turns them into metrics.
    LightningModules use it under Lightning's ``Trainer`` and the federated evaluation uses it too, so a
    metric means the same thing on both paths.
    """

    loss: torch.Tensor
    model: torch.Tensor
    baseline: torch.Tensor | None = None

    #: Width of :meth:`batch`'s row: loss sum, count, the model's sums, the baseline's sums.
    WIDTH = 2 + 2 * len(RegressionStats.FIELDS)

    @staticmethod
    def batch(loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
              baseline: torch.Tensor | float | None = None) -> torch.Tensor:
        """One batch as a ``[WIDTH]`` float64 row on the batch's device; rows add up over batches.

        ``loss`` is the batch's mean loss; ``baseline`` the constant (training-mean) prediction, or None
        (its sums are then zeros).
        """
        n = torch.full((1,), float(target.numel()), dtype=torch.float64, device=pred.device)  # a fill, not a copy
        if baseline is None:
            base = torch.zeros(len(RegressionStats.FIELDS), dtype=torch.float64, device=pred.device)
        else:
            constant = baseline.expand_as(pred) if isinstance(baseline, torch.Tensor) else torch.full_like(pred, baseline)
            base = RegressionStats.tensor_from_predictions(constant, target)
        return torch.cat([loss.detach().double().reshape(1) * n, n,
                          RegressionStats.tensor_from_predictions(pred, target), base])

    @classmethod
    def from_row(cls, row: torch.Tensor | None, with_baseline: bool) -> SplitStats:
        """Split a summed row of :meth:`batch` (CPU float64; ``None`` for a split without scans: zeros)."""
        if row is None:
            row = torch.zeros(cls.WIDTH, dtype=torch.float64)
        n = len(RegressionStats.FIELDS)
        return cls(row[0:2], row[2:2 + n], row[2 + n:] if with_baseline else None)

    def __add__(self, other: SplitStats) -> SplitStats:
        base = None if self.baseline is None or other.baseline is None else self.baseline + other.baseline
        return SplitStats(self.loss + other.loss, self.model + other.model, base)

    @property
    def count(self) -> float:
        return float(self.loss[1])

    def compute(self) -> dict[str, float]:
        """The model's metrics (:meth:`RegressionStats.compute`), its mean ``loss`` and ``baseline_mae``."""
        out = RegressionStats.from_tensor(self.model).compute()
        out["loss"] = float(self.loss[0] / self.loss[1]) if self.count > 0 else math.nan
        if self.baseline is not None:
            out["baseline_mae"] = RegressionStats.from_tensor(self.baseline).compute()["mae"]
        return out


@dataclass(frozen=True)
class BiasCorrection:
    """Linear correction of the brain-age gap's dependence on age (regression to the mean).

    Fitted as the least-squares line gap = slope·age + intercept, from pooled sufficient statistics only, so
    a federation can fit it on training/validation data without sharing predictions.
    """

    slope: float
    intercept: float

    @classmethod
    def fit(cls, stats: RegressionStats) -> BiasCorrection:
        """slope = (cov(x,y) - var(x)) / var(x); intercept = mean(e) - slope·mean(x)."""
        if stats.n < 2:
            raise ValueError("neurofed.metrics: BiasCorrection.fit needs stats of at least 2 predictions.")
        sxx, _, sxy = stats._centered()
        if sxx <= 0:
            raise ValueError("neurofed.metrics: BiasCorrection.fit needs targets (ages) that vary.")
        slope = (sxy - sxx) / sxx
        intercept = (stats.sum_y - stats.sum_x) / stats.n - slope * stats.sum_x / stats.n
        return cls(slope=float(slope), intercept=float(intercept))

    def corrected_gap(self, pred: Any, age: Any) -> Any:
        """Gap minus its fitted age trend; works on floats, numpy arrays and tensors alike."""
        return (pred - age) - (self.slope * age + self.intercept)


def format_number(value: Any, decimals: int, missing: str = "nan") -> str:
    """``value`` with ``decimals`` decimals; ``missing`` for None, NaN and infinities (tables and TSV files)."""
    if value is None or not math.isfinite(float(value)):
        return missing
    return f"{float(value):.{decimals}f}"


def format_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """A fixed-width table of ``compute()`` results, one row per site (or "pooled").

    Rows that carry ``baseline_mae`` (the MAE of predicting the training mean for every scan) get a
    ``mean-pred MAE`` column, so a model's MAE can be read against what a constant prediction achieves.
    """
    baseline = any("baseline_mae" in m for m in rows.values())
    header = ["site", "n", "MAE", "RMSE", "r", "R²", "gap mean±SD"] + (["mean-pred MAE"] if baseline else [])
    body = []
    for site, m in rows.items():
        body.append([
            str(site),
            str(int(m.get("n", 0))),
            format_number(m.get("mae"), 2),
            format_number(m.get("rmse"), 2),
            format_number(m.get("r"), 3),
            format_number(m.get("r2"), 3),
            f"{format_number(m.get('gap_mean'), 2)} ± {format_number(m.get('gap_sd'), 2)}",
        ] + ([format_number(m.get("baseline_mae"), 2)] if baseline else []))
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return " | ".join([first, *rest])

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])
