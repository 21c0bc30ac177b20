"""What a model carries about the run that trained it: the datasets and splits it saw, and its bias correction.

A predictions table is only honest if its ``split`` column is: ``test`` must mean that the model was never
trained or selected on that scan. Split membership and the brain-age bias correction belong to the run that
trained the model, not to whatever dataset the model is later applied to. So ``fit`` stores a *training
record* in the site's ``best.ckpt`` (key :data:`RECORD_KEY`), and ``predict`` reads it back:

- scans of a dataset the run trained on (same subjects in the same splits) keep the run's split;
- scans of any other dataset are ``unseen``, and the correction applied to them is the run's, fitted on the
  run's training and validation scans, never one refitted on the new data;
- a dataset that bears the name of one of the run's datasets but whose subjects or split differ gets ``n/a``:
  whether a scan was used for training cannot be told.

A checkpoint may travel (to a collaborator, to W&B), so the record holds aggregate values only: per dataset
its name, per split the number of subjects and a SHA-256 of their sorted ids (enough to recognise the dataset
the run split, without listing a subject), and the correction's slope, intercept and count.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from neurofed.metrics import BiasCorrection, RegressionStats

__all__ = ["RECORD_KEY", "SPLITS", "DatasetProvenance", "dataset_provenance", "fit_bias_correction",
           "read_training_record", "split_fingerprints", "store_training_record", "training_record"]

#: Key of the training record in a checkpoint dict.
RECORD_KEY = "neurofed_training"
SPLITS = ("train", "val", "test")


def fit_bias_correction(rows: Sequence[Mapping[str, Any]]) -> BiasCorrection | None:
    """Linear age-bias correction from the train/val rows only; None when there are too few labels."""
    fit_rows = [r for r in rows if r["split"] in ("train", "val") and math.isfinite(r["target"])]
    if len(fit_rows) < 3:
        return None
    stats = RegressionStats.from_predictions(
        torch.tensor([r["prediction"] for r in fit_rows]), torch.tensor([r["target"] for r in fit_rows])
    )
    try:
        return BiasCorrection.fit(stats)
    except ValueError:  # all labels equal: no trend to remove
        return None


def _correction_record(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    correction = fit_bias_correction(rows)
    if correction is None:
        return None
    n = sum(r["split"] in ("train", "val") and math.isfinite(r["target"]) for r in rows)
    return {"slope": correction.slope, "intercept": correction.intercept, "n": n}


def split_fingerprints(datamodule: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """``dataset -> split -> {"subjects": n, "sha256": digest of the sorted subject ids}`` of a set-up data module."""
    members: dict[str, dict[str, set[str]]] = {name: {s: set() for s in SPLITS}
                                               for name in getattr(datamodule, "site_names", [])}
    for split in ("train", "val"):
        for record in getattr(datamodule, f"{split}_records", []):
            members.setdefault(record.site, {s: set() for s in SPLITS})[split].add(record.participant_id)
    for records in getattr(datamodule, "test_records", []):
        for record in records:
            members.setdefault(record.site, {s: set() for s in SPLITS})["test"].add(record.participant_id)
    return {
        name: {split: {"subjects": len(ids), "sha256": hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()}
               for split, ids in splits.items()}
        for name, splits in members.items()
    }


def training_record(rows: Sequence[Mapping[str, Any]], datamodule: Any, run_name: str) -> dict[str, Any]:
    """The record of the run that trained the model on ``datamodule``, from its predictions on every scan.

    Args:
        rows: One dict per scan with ``site``, ``split`` (the run's), ``target`` and ``prediction``.
        datamodule: The set-up data module of the run (its splits are the run's).
        run_name: The run's name.
    """
    splits = split_fingerprints(datamodule)
    by_site: dict[str, list[Mapping[str, Any]]] = {name: [] for name in splits}
    for row in rows:
        by_site.setdefault(row["site"], []).append(row)
    pooled = _correction_record(rows)
    return {
        "run": run_name,
        "label": getattr(datamodule, "label", "target"),
        "datasets": {name: {"splits": splits.get(name, {}), "bias_correction": _correction_record(site_rows)}
                     for name, site_rows in by_site.items()},
        "bias_correction": None if pooled is None else {**pooled, "datasets": sorted(by_site)},
    }


class DatasetProvenance:
    """How one dataset of a ``predict`` call relates to the run that trained the model.

    ``status`` is ``"trained"`` (the run split these very subjects: its split labels hold), ``"unseen"`` (a
    dataset the run never used), ``"unknown"`` (named like one of the run's datasets, but its subjects or split
    differ) or ``"no record"`` (the checkpoint carries no training record). ``correction`` is the one to apply
    and ``fitted_on`` says where it was fitted.
    """

    def __init__(self, status: str, correction: BiasCorrection | None, n_fit: int, fitted_on: str,
                 matched: str | None = None) -> None:
        self.status, self.correction, self.n_fit, self.fitted_on = status, correction, n_fit, fitted_on
        self.matched = matched

    def split_of(self, lookup_split: str | None) -> str:
        """The split a scan gets: the run's (``trained``), ``unseen``, or ``n/a`` when it cannot be told."""
        if self.status == "trained":
            return lookup_split or "unseen"  # a subject in no split had no label: never used by the run
        return "unseen" if self.status == "unseen" else "n/a"


def _correction(entry: Mapping[str, Any] | None) -> tuple[BiasCorrection | None, int]:
    if not entry:
        return None, 0
    return BiasCorrection(slope=float(entry["slope"]), intercept=float(entry["intercept"])), int(entry["n"])


def dataset_provenance(record: Mapping[str, Any] | None, name: str,
                       fingerprints: Mapping[str, Mapping[str, Any]]) -> DatasetProvenance:
    """Where dataset ``name`` (with these split fingerprints) stands against a training ``record``."""
    if record is None:
        return DatasetProvenance("no record", None, 0, "not applied: the checkpoint carries no training record, "
                                 "so the run's correction is unknown")
    run = record.get("run", "?")
    datasets = record.get("datasets", {})
    same = [d for d, entry in datasets.items() if entry.get("splits") and all(
        entry["splits"].get(s, {}).get("sha256") == fingerprints.get(s, {}).get("sha256") for s in SPLITS)]
    if same:
        match = name if name in same else same[0]
        correction, n = _correction(datasets[match].get("bias_correction"))
        return DatasetProvenance("trained", correction, n, f"the train and val scans of {match} in run {run}",
                                 matched=match)
    correction, n = _correction(record.get("bias_correction"))
    where = ", ".join((record.get("bias_correction") or {}).get("datasets", [])) or "its datasets"
    return DatasetProvenance("unknown" if name in datasets else "unseen", correction, n,
                             f"the train and val scans of {where} in run {run}, then applied unchanged to this dataset")


def store_training_record(paths: Sequence[str | Path], record: Mapping[str, Any]) -> None:
    """Add ``record`` to each checkpoint in ``paths`` (rewritten atomically; missing files are skipped)."""
    from neurofed.atomic import atomic_save
    from neurofed.federated.checkpoint_io import load

    for path in dict.fromkeys(Path(p) for p in paths):
        if path.is_file():
            checkpoint = load(path)
            checkpoint[RECORD_KEY] = dict(record)
            atomic_save(checkpoint, path)


def read_training_record(path: str | Path | None) -> dict[str, Any] | None:
    """The training record of a checkpoint, or ``None`` (no file, or written without one)."""
    if path is None or not Path(path).is_file():
        return None
    from neurofed.federated.checkpoint_io import load

    checkpoint = load(path)
    return checkpoint.get(RECORD_KEY) if isinstance(checkpoint, dict) else None
