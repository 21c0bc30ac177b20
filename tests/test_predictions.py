"""Prediction tables: a BIDS derivative per site, one folder per run, bias correction fitted on train/val only."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import NO_VALIDATOR, bids_validator
from timeouts import STARTUP_S, scaled

from neurofed.predictions import (
    fit_bias_correction,
    neurofed_version,
    write_predictions,
)

RUN = "brain_age_fedavg"


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


def _outputs(roots: dict[str, Path], sessions: list[str] | None = None) -> list[dict]:
    """Predictions regress to the mean (slope 0.5), as brain-age models do."""
    outputs = []
    for s in roots:
        ages = torch.arange(9, dtype=torch.float32) * 7 + 20
        outputs.append({"pred": 0.5 * ages + 27.5, "target": ages,
                        "participant_id": [f"sub-{s}{i}" for i in range(9)],
                        "session": sessions or [""] * 9, "site": [s] * 9})
    return outputs


def _run_dir(root: Path, run: str = RUN) -> Path:
    return root / "derivatives" / "neurofed" / "runs" / run


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_one_table_per_site_in_bids_derivatives(site_roots):
    written = write_predictions(_outputs(site_roots), _datamodule(site_roots), run_name=RUN)
    for name, root in site_roots.items():
        table = _run_dir(root) / "desc-age_predictions.tsv"
        assert table in written and table.with_suffix(".json") in written
        rows = _rows(table)
        assert len(rows) == 9
        assert list(rows[0]) == ["participant_id", "session_id", "split", "age", "prediction", "gap",
                                 "gap_corrected"]
        assert {r["participant_id"][:5] for r in rows} == {f"sub-{name}"}  # no other site's subjects
        assert [r["split"] for r in rows].count("test") == 2
        assert all(r["session_id"] == "n/a" for r in rows)
    figure = _run_dir(site_roots["a"]) / "figures" / "desc-age_scatter.png"
    assert figure in written and figure.is_file()


def test_session_id_holds_the_bids_label_and_unknowns_are_na(site_roots):
    outputs = _outputs(site_roots, sessions=["1", "2"] + [""] * 7)
    outputs[0]["target"][3] = float("nan")
    write_predictions(outputs, _datamodule(site_roots), run_name=RUN)
    rows = _rows(_run_dir(site_roots["a"]) / "desc-age_predictions.tsv")
    assert [r["session_id"] for r in rows[:3]] == ["ses-1", "ses-2", "n/a"]
    assert rows[3]["age"] == "n/a" and rows[3]["gap"] == "n/a" and rows[3]["gap_corrected"] == "n/a"
    assert rows[3]["prediction"] != "n/a"


def test_derivative_description_and_data_dictionary(site_roots, tmp_path):
    checkpoint = tmp_path / "best.ckpt"
    checkpoint.write_bytes(b"weights")
    model = torch.nn.Linear(1, 1)
    write_predictions(_outputs(site_roots), _datamodule(site_roots), model, run_name=RUN,
                      checkpoint=checkpoint, strategy="FedAvg")
    deriv = site_roots["a"] / "derivatives" / "neurofed"
    description = json.loads((deriv / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["SourceDatasets"] == [{"URL": "bids:raw:"}]
    assert description["DatasetLinks"] == {"raw": "../../"}
    (entry,) = description["GeneratedBy"]
    assert entry["Name"] == "neurofed" and entry["Version"] == neurofed_version()
    assert RUN in entry["Description"] and str(checkpoint) in entry["Description"]
    assert (deriv / ".bidsignore").read_text().split() == ["runs"]
    sidecar = json.loads((_run_dir(site_roots["a"]) / "desc-age_predictions.json").read_text())
    columns = _rows(_run_dir(site_roots["a"]) / "desc-age_predictions.tsv")[0].keys()
    assert set(columns) <= set(sidecar)
    assert all(sidecar[c]["Units"] == "year" for c in ("age", "prediction", "gap", "gap_corrected"))
    assert sidecar["BiasCorrection"]["N"] == 7 and "train and val" in sidecar["BiasCorrection"]["Method"]
    provenance = sidecar["GeneratedBy"]
    assert provenance["Run"] == RUN and provenance["Model"] == "Linear" and provenance["Strategy"] == "FedAvg"
    assert provenance["Checkpoint"] == str(checkpoint.resolve()) and len(provenance["CheckpointSHA256"]) == 64


def test_runs_never_overwrite_each_other(site_roots):
    dm = _datamodule(site_roots)
    write_predictions(_outputs(site_roots), dm, run_name="federated")
    outputs = _outputs(site_roots)
    for batch in outputs:
        batch["pred"] = batch["pred"] + 1.0
    write_predictions(outputs, dm, run_name="centralized")
    write_predictions(outputs, dm, run_name="centralized")  # the same run again replaces its own entry
    root = site_roots["a"]
    first = _rows(_run_dir(root, "federated") / "desc-age_predictions.tsv")
    second = _rows(_run_dir(root, "centralized") / "desc-age_predictions.tsv")
    assert float(second[0]["prediction"]) == pytest.approx(float(first[0]["prediction"]) + 1.0)
    description = json.loads((root / "derivatives" / "neurofed" / "dataset_description.json").read_text())
    runs = [g["Description"].split(":")[0] for g in description["GeneratedBy"]]
    assert runs == ["run federated", "run centralized"]


def test_default_call_still_works_and_names_a_fresh_run(site_roots):
    written = write_predictions(_outputs(site_roots), _datamodule(site_roots))
    tables = [p for p in written if p.suffix == ".tsv"]
    assert len(tables) == 2 and all(p.parent.name.startswith("predict-") for p in tables)


def test_bias_correction_removes_the_age_trend(site_roots):
    write_predictions(_outputs(site_roots), _datamodule(site_roots), run_name=RUN)
    rows = _rows(_run_dir(site_roots["a"]) / "desc-age_predictions.tsv")
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


def test_too_few_or_constant_labels_give_no_correction():
    assert fit_bias_correction([{"split": "train", "target": 1.0, "prediction": 2.0}]) is None
    same = [{"split": "train", "target": 40.0, "prediction": p} for p in (39.0, 41.0, 42.0)]
    assert fit_bias_correction(same) is None


def _predictions_of_a_real_dataset(root: Path) -> tuple[list[dict], SimpleNamespace]:
    """Outputs and a data module for a dataset written by ``make_bids``, split as BrainMRIDataModule splits."""
    from neurofed.data import index_bids, split_subjects

    records, _ = index_bids(root)
    assignment = split_subjects([r.participant_id for r in records])
    by_split = {s: [r for r in records if assignment[r.participant_id] == s] for s in ("train", "val", "test")}
    dm = SimpleNamespace(label="age", site_names=[records[0].site], roots=[root], train_records=by_split["train"],
                         val_records=by_split["val"], test_records=[by_split["test"]])
    labels = torch.tensor([r.label for r in records])
    outputs = [{"pred": labels + 1.0, "target": labels, "participant_id": [r.participant_id for r in records],
                "session": [r.session for r in records], "site": [r.site for r in records]}]
    return outputs, dm


@pytest.mark.skipif(bids_validator() is None, reason=NO_VALIDATOR)
def test_derivative_passes_the_bids_validator(make_bids, tmp_path):
    root = make_bids(tmp_path / "raw", n_subjects=6, shape=(8, 8, 8), sessions_every=3)
    outputs, dm = _predictions_of_a_real_dataset(root)
    write_predictions(outputs, dm, torch.nn.Linear(1, 1), run_name=RUN, strategy="FedAvg")
    write_predictions(outputs, dm, run_name="second")
    result = subprocess.run([bids_validator(), "--format", "json", str(root / "derivatives" / "neurofed")],
                            capture_output=True, text=True, timeout=scaled(STARTUP_S), check=False)
    issues = json.loads(result.stdout)["issues"]["issues"]
    errors = [f"{i['code']} {i.get('location')}" for i in issues if i["severity"] == "error"]
    assert errors == []


@pytest.mark.skipif(bids_validator() is None, reason=NO_VALIDATOR)
def test_tables_and_data_dictionaries_follow_bids_tabular_rules(make_bids, tmp_path):
    # BIDS has no file type for predictions, so runs/ is in .bidsignore and the validator never reads them.
    # Put a table and its data dictionary where it does (phenotype/ of a scratch dataset: one row per
    # participant, so a dataset without sessions) and check them there; a tampered copy shows it is looking.
    import shutil

    root = make_bids(tmp_path / "raw", n_subjects=6, shape=(8, 8, 8), sessions_every=0)
    outputs, dm = _predictions_of_a_real_dataset(root)
    write_predictions(outputs, dm, torch.nn.Linear(1, 1), run_name=RUN, strategy="FedAvg")
    scratch = make_bids(tmp_path / "scratch", n_subjects=6, shape=(8, 8, 8), sessions_every=0)
    (scratch / "phenotype").mkdir()
    for suffix in (".tsv", ".json"):
        shutil.copy(_run_dir(root) / f"desc-age_predictions{suffix}", scratch / "phenotype" / f"predictions{suffix}")

    def phenotype_errors() -> list[str]:
        result = subprocess.run([bids_validator(), "--format", "json", str(scratch)], capture_output=True, text=True,
                                timeout=scaled(STARTUP_S), check=False)
        issues = json.loads(result.stdout)["issues"]["issues"]
        return [f"{i['code']} {i.get('issueMessage')}" for i in issues
                if i["severity"] == "error" and "phenotype" in str(i.get("location"))]

    assert phenotype_errors() == []
    table = scratch / "phenotype" / "predictions.tsv"
    lines = table.read_text().splitlines()
    cells = lines[1].split("\t")
    cells[2], cells[4] = "held-out", "NaN"  # a split outside its Levels, a missing value not written n/a
    table.write_text("\n".join([lines[0], "\t".join(cells), *lines[2:]]) + "\n")
    assert len(phenotype_errors()) == 2
