"""Prediction tables: one TSV per site, bias correction fitted on train/val only."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from neurofed.predictions import fit_bias_correction, write_predictions


def _record(site: str, pid: str) -> SimpleNamespace:
    return SimpleNamespace(site=site, participant_id=pid)


@pytest.fixture
def site_roots(tmp_path: Path) -> dict[str, Path]:
    return {name: tmp_path / name for name in ("a", "b")}


def _datamodule(roots: dict[str, Path]) -> SimpleNamespace:
    train = [_record(s, f"sub-{s}{i}") for s in roots for i in range(6)]
    val = [_record(s, f"sub-{s}6") for s in roots]
    test = [[_record(s, f"sub-{s}7"), _record(s, f"sub-{s}8")] for s in roots]
    return SimpleNamespace(label="age", site_names=list(roots), roots=list(roots.values()),
                           train_records=train, val_records=val, test_records=test)


def _outputs(roots: dict[str, Path]) -> list[dict]:
    """Predictions regress to the mean (slope 0.5), as brain-age models do."""
    outputs = []
    for s in roots:
        ages = torch.arange(9, dtype=torch.float32) * 7 + 20
        outputs.append({"pred": 0.5 * ages + 27.5, "target": ages,
                        "participant_id": [f"sub-{s}{i}" for i in range(9)],
                        "session": [""] * 9, "site": [s] * 9})
    return outputs


def test_one_table_per_site_in_bids_derivatives(site_roots):
    written = write_predictions(_outputs(site_roots), _datamodule(site_roots))
    for name, root in site_roots.items():
        table = root / "derivatives" / "neurofed" / "desc-age_predictions.tsv"
        assert table in written
        rows = list(csv.DictReader(open(table), delimiter="\t"))
        assert len(rows) == 9
        assert {r["participant_id"][:5] for r in rows} == {f"sub-{name}"}  # no other site's subjects
        assert [r["split"] for r in rows].count("test") == 2
        assert all(r["session"] == "n/a" for r in rows)
    assert any(p.suffix == ".png" and p.is_file() for p in written)


def test_bias_correction_removes_the_age_trend(site_roots):
    write_predictions(_outputs(site_roots), _datamodule(site_roots))
    rows = list(csv.DictReader(open(site_roots["a"] / "derivatives" / "neurofed" / "desc-age_predictions.tsv"),
                               delimiter="\t"))
    gaps = [float(r["gap"]) for r in rows]
    corrected = [float(r["gap_corrected"]) for r in rows]
    assert max(gaps) - min(gaps) > 20  # raw gap depends strongly on age
    assert max(abs(c) for c in corrected) < 1e-2  # exact linear bias: fully removed, test rows included


def test_bias_correction_ignores_test_rows():
    rows = [{"split": "train", "target": float(a), "prediction": float(a)} for a in range(20, 80, 10)]
    rows += [{"split": "test", "target": 50.0, "prediction": 500.0}]
    correction = fit_bias_correction(rows)
    assert correction is not None
    assert abs(correction.slope) < 1e-9 and abs(correction.intercept) < 1e-9


def test_too_few_labels_give_no_correction():
    assert fit_bias_correction([{"split": "train", "target": 1.0, "prediction": 2.0}]) is None
