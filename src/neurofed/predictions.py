"""Predictions as BIDS derivatives: one TSV per site under ``<root>/derivatives/neurofed/``.

Predictions never leave the site that made them, so each site writes its own table next to its own data.
The bias correction of the brain-age gap is fitted on the site's training and validation scans only and then
applied to every scan, so test-set gaps are never used to correct themselves.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from neurofed.atomic import atomic_write_text
from neurofed.metrics import BiasCorrection, RegressionStats, format_number
from neurofed.plots import scatter_true_vs_predicted

log = logging.getLogger(__name__)

DERIVATIVE_DIR = Path("derivatives") / "neurofed"


def flatten_outputs(outputs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Turn a list of ``predict_step`` batch outputs into one row per scan."""
    rows = []
    for batch in outputs:
        preds = torch.as_tensor(batch["pred"]).detach().float().cpu().tolist()
        targets = torch.as_tensor(batch["target"]).detach().float().cpu().tolist()
        for i, pred in enumerate(preds):
            rows.append(
                {
                    "participant_id": batch["participant_id"][i],
                    "session": batch["session"][i],
                    "site": batch["site"][i],
                    "target": targets[i],
                    "prediction": pred,
                }
            )
    return rows


def split_lookup(datamodule: Any) -> dict[tuple[str, str], str]:
    """``(site, participant_id) -> train/val/test`` from a set-up BrainMRIDataModule (empty if unknown)."""
    lookup: dict[tuple[str, str], str] = {}
    for split, records in (("train", getattr(datamodule, "train_records", [])), ("val", getattr(datamodule, "val_records", []))):
        for record in records:
            lookup[(record.site, record.participant_id)] = split
    for records in getattr(datamodule, "test_records", []):
        for record in records:
            lookup[(record.site, record.participant_id)] = "test"
    return lookup


def fit_bias_correction(rows: Sequence[Mapping[str, Any]]) -> BiasCorrection | None:
    """Linear age-bias correction from the train/val rows only; None when there are too few labels."""
    fit_rows = [r for r in rows if r["split"] in ("train", "val") and math.isfinite(r["target"])]
    if len(fit_rows) < 3:
        return None
    stats = RegressionStats.from_predictions(
        torch.tensor([r["prediction"] for r in fit_rows]), torch.tensor([r["target"] for r in fit_rows])
    )
    return BiasCorrection.fit(stats)


def write_site_table(rows: Sequence[Mapping[str, Any]], path: Path, label: str) -> Path:
    """Write one site's predictions atomically."""
    columns = ["participant_id", "session", "split", label, "prediction", "gap", "gap_corrected"]
    handle = io.StringIO()
    writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(
            [
                r["participant_id"],
                r["session"] or "n/a",
                r["split"],
                format_number(r["target"], 3, "n/a"),
                format_number(r["prediction"], 3, "n/a"),
                format_number(r["gap"], 3, "n/a"),
                format_number(r["gap_corrected"], 3, "n/a"),
            ]
        )
    return atomic_write_text(path, handle.getvalue())


def write_predictions(outputs: Iterable[Mapping[str, Any]], datamodule: Any, model: Any = None) -> list[Path]:
    """Write ``desc-<label>_predictions.tsv`` (and a test-split scatter plot) for every site of the data module.

    Returns the paths written. Falls back to ``checkpoints/predictions/<site>/`` when a data root is read-only.
    """
    label = getattr(datamodule, "label", "target")
    rows = flatten_outputs(outputs)
    splits = split_lookup(datamodule)
    by_site: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        row["split"] = splits.get((row["site"], row["participant_id"]), "none")
        row["gap"] = row["prediction"] - row["target"]
        by_site[row["site"]].append(row)

    roots = dict(zip(getattr(datamodule, "site_names", []), getattr(datamodule, "roots", [])))
    written: list[Path] = []
    test_points: dict[str, tuple[list[float], list[float]]] = {}
    for site, site_rows in by_site.items():
        correction = fit_bias_correction(site_rows)
        for row in site_rows:
            row["gap_corrected"] = (
                float(correction.corrected_gap(torch.tensor([row["prediction"]]), torch.tensor([row["target"]]))[0])
                if correction is not None and math.isfinite(row["target"])
                else float("nan")
            )
        out_dir = _writable_dir(Path(roots.get(site, ".")) / DERIVATIVE_DIR, site)
        written.append(write_site_table(site_rows, out_dir / f"desc-{label}_predictions.tsv", label))
        test = [r for r in site_rows if r["split"] == "test" and math.isfinite(r["target"])]
        if test:
            test_points[site] = ([r["target"] for r in test], [r["prediction"] for r in test])
    if test_points:
        first_dir = written[0].parent
        written.append(
            scatter_true_vs_predicted(
                test_points, first_dir / f"desc-{label}_scatter.png", label=label, title=f"{label}, test split"
            )
        )
    return written


def _writable_dir(preferred: Path, site: str) -> Path:
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    fallback = Path("checkpoints") / "predictions" / site
    log.warning("%s is not writable; writing predictions to %s instead", preferred, fallback)
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback
