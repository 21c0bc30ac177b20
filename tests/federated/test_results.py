"""What a run reports: dataset names in tables, the mean-prediction baseline, data-wait timing and JSON files."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from federated_toys import ToyRegressor, site_data

from neurofed.federated import FederatedTrainer
from neurofed.federated.results import read_json
from neurofed.federated.wire import (
    SITE_NAME_BYTES,
    FederationPayloadError,
    check_payload,
    decode_site_name,
    encode_site_name,
)
from neurofed.metrics import RegressionStats

FIELDS = {"n", "mae", "rmse", "r", "p", "r2", "gap_mean", "gap_sd", "loss", "baseline_mae"}


def test_site_names_cross_as_32_ascii_bytes():
    assert decode_site_name(encode_site_name("camcan")) == "camcan"
    assert decode_site_name(encode_site_name("münster")) == "m?nster"
    long = encode_site_name("x" * 40)
    assert long.dtype == torch.uint8 and long.shape == (SITE_NAME_BYTES,)
    assert decode_site_name(long) == "x" * SITE_NAME_BYTES
    check_payload("site_name", long)
    with pytest.raises(FederationPayloadError, match="site_name"):
        check_payload("site_name", torch.zeros(SITE_NAME_BYTES + 1, dtype=torch.uint8))
    with pytest.raises(FederationPayloadError, match="site_name"):
        check_payload("site_name", torch.zeros(4, dtype=torch.float32))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    L.seed_everything(0)
    model, data = ToyRegressor(), site_data(0, name="ixi")
    trainer = FederatedTrainer(rounds=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                               default_root_dir=str(root), run_name="demo")
    trainer.fit(model, data)
    tested = trainer.test(model, data)
    validated = trainer.validate(model, data)
    return trainer, model, data, tested, validated


def test_tables_use_the_dataset_name_and_carry_the_mean_prediction_baseline(run, capsys):
    trainer, model, data, tested, _ = run
    assert list(tested) == ["ixi", "pooled"]
    assert set(tested["ixi"]) == FIELDS and set(tested["pooled"]) == FIELDS
    # the baseline predicts the pooled training mean for every test scan
    targets = torch.cat([t.targets for t in data.tests])
    constant = torch.full_like(targets, float(model.target_mean))
    expected = RegressionStats.from_predictions(constant, targets).compute()["mae"]
    assert tested["pooled"]["baseline_mae"] == pytest.approx(expected, rel=1e-9)
    assert tested["ixi"]["baseline_mae"] == tested["pooled"]["baseline_mae"]


def test_round_metrics_report_baseline_volumes_and_data_wait(run):
    trainer, _, data, _, _ = run
    for h in trainer.history:
        assert h["train/site/volumes"] == data.n_train  # one local epoch over the site's training split
        assert 0.0 <= h["time/data_wait_s"] <= h["time/train_s"]
        assert math.isfinite(h["val/pooled/baseline_mae"]) and h["val/pooled/baseline_mae"] > 0


def test_results_are_written_as_strict_json(run):
    trainer, _, _, tested, validated = run
    history = read_json(trainer.run_dir / "history.json")
    assert len(history) == 2 and history[1]["round"] == 2.0
    assert history[0]["val/pooled/baseline_mae"] == pytest.approx(trainer.history[0]["val/pooled/baseline_mae"])
    test_json = read_json(trainer.run_dir / "test_metrics.json")
    assert set(test_json) == {"ixi", "pooled"} and set(test_json["pooled"]) == FIELDS
    assert test_json["pooled"]["mae"] == pytest.approx(tested["pooled"]["mae"])
    assert read_json(trainer.run_dir / "validate_metrics.json")["pooled"]["n"] == validated["pooled"]["n"] == 8
    text = (trainer.run_dir / "test_metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text


def test_nan_metrics_become_null(tmp_path):
    from neurofed.federated.results import write_json

    write_json(tmp_path / "m.json", {"a": {"r": math.nan, "n": 1}, "h": [math.inf, 2.0]})
    assert read_json(tmp_path / "m.json") == {"a": {"r": None, "n": 1}, "h": [None, 2.0]}
