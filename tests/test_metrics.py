"""Pooled sufficient statistics must reproduce every metric of the concatenated predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchmetrics.functional as tmf
from scipy import stats as scipy_stats

from neurofed.metrics import BiasCorrection, RegressionStats, format_table


def _data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    age = rng.uniform(18, 90, n)
    pred = 0.7 * age + 15 + rng.normal(0, 5, n)
    return pred, age


def test_pooled_equals_concatenated() -> None:
    p1, a1 = _data(0, 57)
    p2, a2 = _data(1, 91)
    pooled = RegressionStats.from_predictions(p1, a1) + RegressionStats.from_predictions(p2, a2)
    whole = RegressionStats.from_predictions(np.concatenate([p1, p2]), np.concatenate([a1, a2]))
    got, want = pooled.compute(), whole.compute()
    assert set(got) == {"n", "mae", "rmse", "r", "p", "r2", "gap_mean", "gap_sd"}
    for key in got:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def test_sum_tensor_round_trip_and_nan_targets() -> None:
    parts = [RegressionStats.from_predictions(*_data(s, 20)) for s in range(3)]
    total = sum(parts)
    assert isinstance(total, RegressionStats) and total.n == 60
    assert RegressionStats.from_tensor(total.to_tensor()) == total
    assert total.to_tensor().dtype == torch.float64
    pred, age = _data(5, 10)
    age_nan = age.copy()
    age_nan[[2, 7]] = np.nan
    masked = RegressionStats.from_predictions(torch.tensor(pred), torch.tensor(age_nan))
    keep = np.isfinite(age_nan)
    assert masked == RegressionStats.from_predictions(pred[keep], age[keep])
    on_device = RegressionStats.from_tensor(
        RegressionStats.tensor_from_predictions(torch.tensor(pred), torch.tensor(age_nan))
    )
    for f in RegressionStats.FIELDS:
        assert getattr(on_device, f) == pytest.approx(getattr(masked, f), rel=1e-12)


def test_metrics_match_reference_implementations() -> None:
    pred, age = _data(3, 200)
    m = RegressionStats.from_predictions(pred, age).compute()
    assert m["n"] == 200
    assert m["mae"] == pytest.approx(np.mean(np.abs(pred - age)), rel=1e-9)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((pred - age) ** 2)), rel=1e-9)
    r, p = scipy_stats.pearsonr(age, pred)
    assert m["r"] == pytest.approx(r, rel=1e-9)
    assert m["p"] == pytest.approx(p, rel=1e-6)
    sse = np.sum((pred - age) ** 2)
    assert m["r2"] == pytest.approx(1 - sse / np.sum((age - age.mean()) ** 2), rel=1e-9)
    assert m["gap_mean"] == pytest.approx(np.mean(pred - age), rel=1e-9)
    assert m["gap_sd"] == pytest.approx(np.std(pred - age, ddof=1), rel=1e-9)
    tp, ta = torch.tensor(pred), torch.tensor(age)
    assert m["mae"] == pytest.approx(tmf.mean_absolute_error(tp, ta).item(), rel=1e-6)
    assert m["r"] == pytest.approx(tmf.pearson_corrcoef(tp, ta).item(), rel=1e-6)
    assert m["r2"] == pytest.approx(tmf.r2_score(tp, ta).item(), rel=1e-6)


def test_p_value_matches_pearsonr_weak_correlation() -> None:
    rng = np.random.default_rng(7)
    age = rng.normal(50, 10, 30)
    pred = age * 0.1 + rng.normal(0, 10, 30)
    _, p = scipy_stats.pearsonr(age, pred)
    assert RegressionStats.from_predictions(pred, age).compute()["p"] == pytest.approx(p, rel=1e-6)


def test_undefined_metrics_are_nan() -> None:
    m = RegressionStats.from_predictions([1.0, 2.0], [1.5, 2.5]).compute()
    assert math.isnan(m["r"]) and math.isnan(m["p"]) and m["mae"] == pytest.approx(0.5)
    flat = RegressionStats.from_predictions([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]).compute()
    assert math.isnan(flat["r"]) and math.isnan(flat["r2"])
    empty = RegressionStats().compute()
    assert empty["n"] == 0 and math.isnan(empty["mae"])


def test_bias_correction_removes_age_trend() -> None:
    rng = np.random.default_rng(11)
    age = rng.uniform(20, 85, 500)
    pred = 0.6 * age + 22 + rng.normal(0, 3, 500)  # regression to the mean: gap falls with age
    gap = pred - age
    assert abs(np.corrcoef(age, gap)[0, 1]) > 0.8
    correction = BiasCorrection.fit(RegressionStats.from_predictions(pred, age))
    assert correction.slope == pytest.approx(-0.4, abs=0.03)
    corrected = correction.corrected_gap(pred, age)
    assert abs(np.corrcoef(age, corrected)[0, 1]) < 1e-6
    assert abs(corrected.mean()) < 1e-6
    slope, intercept = np.polyfit(age, gap, 1)
    assert correction.slope == pytest.approx(slope, rel=1e-9)
    assert correction.intercept == pytest.approx(intercept, rel=1e-9)
    as_tensor = correction.corrected_gap(torch.tensor(pred), torch.tensor(age))
    assert np.allclose(as_tensor.numpy(), corrected)
    with pytest.raises(ValueError, match="vary"):
        BiasCorrection.fit(RegressionStats.from_predictions([1.0, 2.0], [3.0, 3.0]))


def test_format_table() -> None:
    rows = {
        "siteA": RegressionStats.from_predictions(*_data(0, 40)).compute(),
        "pooled": RegressionStats.from_predictions([1.0, 2.0], [1.5, 2.5]).compute(),
    }
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split(" | ")[0].strip() == "site" and "gap mean±SD" in lines[0]
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    site_a = [c.strip() for c in lines[2].split(" | ")]
    assert site_a[0] == "siteA" and site_a[1] == "40"
    assert site_a[2] == f"{rows['siteA']['mae']:.2f}" and site_a[4] == f"{rows['siteA']['r']:.3f}"
    assert "nan" in lines[3]


def test_format_table_shows_the_mean_prediction_baseline_when_present() -> None:
    rows = {"siteA": {**RegressionStats.from_predictions(*_data(0, 40)).compute(), "baseline_mae": 7.5}}
    header, _, body = format_table(rows).splitlines()
    assert header.split(" | ")[-1].strip() == "mean-pred MAE"
    assert body.split(" | ")[-1].strip() == "7.50"
    assert "mean-pred" not in format_table({"siteA": RegressionStats().compute()})
