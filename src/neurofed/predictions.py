"""Predictions as a BIDS derivative dataset: ``<root>/derivatives/neurofed/`` at every site.

Predictions never leave the site that made them, so each site writes its own table next to its own data.
The bias correction of the brain-age gap is fitted on the site's training and validation scans only and then
applied to every scan, so test-set gaps are never used to correct themselves.

Layout (``bids-validator-deno`` reports no error on it)::

    derivatives/neurofed/
        dataset_description.json     DatasetType derivative; GeneratedBy: one entry per run written here
        README.md
        .bidsignore                  "runs": BIDS has no file type for model predictions
        runs/<run>/desc-<label>_predictions.tsv    participant_id, session_id, split, <label>, ...
        runs/<run>/desc-<label>_predictions.json   data dictionary: columns, units, bias correction, model,
                                                   checkpoint
        runs/<run>/figures/desc-<label>_scatter.png

One folder per run, so a run never overwrites another's table or figure.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from neurofed.atomic import atomic_write_text
from neurofed.data.labels import display_name, sidecar_units
from neurofed.metrics import BiasCorrection, RegressionStats, format_number
from neurofed.plots import scatter_true_vs_predicted

log = logging.getLogger(__name__)

DERIVATIVE_DIR = Path("derivatives") / "neurofed"
#: Folder of the per-run outputs inside the derivative dataset; listed in its ``.bidsignore``.
RUNS_DIR = "runs"
BIDS_VERSION = "1.10.0"
MISSING = "n/a"
SPLIT_LEVELS = {
    "train": "used to train the model (and to fit the bias correction)",
    "val": "used for model selection (and to fit the bias correction)",
    "test": "held out: never used for training, model selection or the bias correction",
}


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
    for split in ("train", "val"):
        records = getattr(datamodule, f"{split}_records", [])
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
    try:
        return BiasCorrection.fit(stats)
    except ValueError:  # all labels equal: no trend to remove
        return None


def write_site_table(rows: Sequence[Mapping[str, Any]], path: Path, label: str) -> Path:
    """Write one site's predictions atomically, BIDS style: ``session_id`` = ``ses-<label>``, ``n/a`` missing."""
    columns = ["participant_id", "session_id", "split", label, "prediction", "gap", "gap_corrected"]
    handle = io.StringIO()
    writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(
            [
                r["participant_id"],
                f"ses-{r['session']}" if r["session"] else MISSING,
                r["split"] if r["split"] in SPLIT_LEVELS else MISSING,
                format_number(r["target"], 3, MISSING),
                format_number(r["prediction"], 3, MISSING),
                format_number(r["gap"], 3, MISSING),
                format_number(r["gap_corrected"], 3, MISSING),
            ]
        )
    return atomic_write_text(path, handle.getvalue())


def neurofed_version() -> str:
    """The installed package's version (``GeneratedBy.Version``)."""
    try:
        return metadata.version("neurofed")
    except metadata.PackageNotFoundError:
        return "unknown"


def run_folder(run_name: str) -> str:
    """A run name made safe as one folder name (letters, digits, ``.``, ``_``, ``-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", run_name).strip(".-") or "run"


def predictions_sidecar(
    label: str,
    correction: BiasCorrection | None,
    n_fit: int,
    provenance: Mapping[str, Any],
) -> dict[str, Any]:
    """The data dictionary of a predictions table: every column, its unit, the bias correction and what made it."""
    name = display_name(label)
    units = {"Units": u} if (u := sidecar_units(label)) else {}
    if correction is None:
        method = (f"not applied: fewer than 3 labelled train/val scans at this site ({n_fit}); "
                  "gap_corrected is n/a")
    else:
        method = (
            f"linear: gap_corrected = gap - (slope * {label} + intercept), slope and intercept fitted by least "
            f"squares of gap on {label} over this site's {n_fit} labelled train and val scans (slope "
            f"{correction.slope:.6g}, intercept {correction.intercept:.6g}), then applied to every scan; test "
            "scans never enter the fit"
        )
    return {
        "participant_id": {"Description": "Participant, as named in the source dataset."},
        "session_id": {"Description": "Session (ses-<label>) of the scan; n/a when the dataset has no sessions."},
        "split": {
            "Description": "Subject-level split of the scan in the run that made the model; n/a for scans "
            "outside train/val/test (no label).",
            "Levels": dict(SPLIT_LEVELS),
        },
        label: {"Description": f"Observed {name} (participants.tsv, or the sessions file for age); n/a when "
                "unknown.", **units},
        "prediction": {"Description": f"{name} predicted by the model from the scan.", **units},
        "gap": {"Description": f"prediction - {label} (for age: the brain-age gap).", **units},
        "gap_corrected": {"Description": f"gap without its linear dependence on {label}: {method}.", **units},
        "BiasCorrection": {
            "Method": method,
            "FittedOn": "train and val scans of this site",
            "N": n_fit,
            **({"Slope": correction.slope, "Intercept": correction.intercept} if correction else {}),
        },
        "GeneratedBy": dict(provenance),
    }


def _checkpoint_record(checkpoint: str | os.PathLike | None) -> dict[str, str]:
    if checkpoint is None:
        return {"Checkpoint": "n/a (the weights in memory when predict was called)"}
    record = {"Checkpoint": str(Path(checkpoint).resolve()) if Path(checkpoint).is_file() else str(checkpoint)}
    if Path(checkpoint).is_file():
        from neurofed.data.cache import file_digest

        record["CheckpointSHA256"] = file_digest(checkpoint)
    return record


def write_dataset_description(out_dir: Path, source_root: Path | None, entry: Mapping[str, str]) -> Path:
    """Create or update the derivative's ``dataset_description.json``, README and ``.bidsignore``.

    ``GeneratedBy`` keeps one entry per run written here (a run writing again replaces its own entry), so the
    folder says which runs its files come from.
    """
    path = out_dir / "dataset_description.json"
    try:
        description = json.loads(path.read_text())
        if not isinstance(description, dict):
            description = {}
    except (OSError, json.JSONDecodeError):
        description = {}
    generated = [g for g in description.get("GeneratedBy", []) if isinstance(g, dict)]
    prefix = entry["Description"].split(":", 1)[0] + ":"
    generated = [g for g in generated if not str(g.get("Description", "")).startswith(prefix)] + [dict(entry)]
    if source_root is not None and out_dir.resolve() == (source_root / DERIVATIVE_DIR).resolve():
        link = "../../"
    else:
        link = source_root.resolve().as_uri() if source_root is not None else None
    description.update({
        "Name": "neurofed predictions",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": generated,
    })
    if link is not None:
        description["DatasetLinks"] = {"raw": link}
        description["SourceDatasets"] = [{"URL": "bids:raw:"}]
    atomic_write_text(path, json.dumps(description, indent=2) + "\n")
    atomic_write_text(out_dir / ".bidsignore", f"{RUNS_DIR}\n")
    atomic_write_text(
        out_dir / "README.md",
        "# neurofed predictions\n\nPredictions of neurofed models for the scans of the source dataset, one "
        f"folder per run under `{RUNS_DIR}/`: a table `desc-<label>_predictions.tsv`, its data dictionary "
        "(columns, units, bias correction, model and checkpoint) and figures. `dataset_description.json` lists "
        f"the runs under `GeneratedBy`. BIDS has no file type for model predictions, so `{RUNS_DIR}/` is listed "
        "in `.bidsignore`.\n",
    )
    return path


def write_predictions(
    outputs: Iterable[Mapping[str, Any]],
    datamodule: Any,
    model: Any = None,
    *,
    run_name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    strategy: str | None = None,
) -> list[Path]:
    """Write every site's predictions as a BIDS derivative under ``<root>/derivatives/neurofed/``.

    Each site gets ``runs/<run>/desc-<label>_predictions.tsv``, its JSON data dictionary, a test-split scatter
    plot when test labels exist, and an entry for the run in the derivative's ``dataset_description.json``.
    Falls back to ``checkpoints/predictions/<site>/`` when a data root is read-only.

    Args:
        outputs: ``predict_step`` outputs (batches of pred, target, participant_id, session, site).
        datamodule: The set-up data module (label, roots, site names, splits).
        model: The model that predicted; its class is recorded.
        run_name: Names the run's folder and appears in titles and records; default ``predict-<timestamp>``,
            so that an unnamed call never overwrites an earlier one.
        checkpoint: Checkpoint the weights came from; its path and SHA-256 are recorded.
        strategy: Federated strategy of the run (e.g. ``"FedAvg"``), for titles and records.

    Returns the paths written (tables, data dictionaries, figures).
    """
    label = getattr(datamodule, "label", "target")
    run_name = run_name or time.strftime("predict-%Y%m%dT%H%M%S")
    folder = Path(RUNS_DIR) / run_folder(run_name)
    provenance = {
        "Name": "neurofed",
        "Version": neurofed_version(),
        "Run": run_name,
        "Model": type(model).__name__ if model is not None else "n/a",
        **({"Strategy": strategy} if strategy else {}),
        **_checkpoint_record(checkpoint),
    }
    rows = flatten_outputs(outputs)
    splits = split_lookup(datamodule)
    by_site: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        row["split"] = splits.get((row["site"], row["participant_id"]), MISSING)
        row["gap"] = row["prediction"] - row["target"]
        by_site[row["site"]].append(row)

    roots = dict(zip(getattr(datamodule, "site_names", []), getattr(datamodule, "roots", [])))
    written: list[Path] = []
    test_points: dict[str, tuple[list[float], list[float]]] = {}
    first_dir: Path | None = None
    for site, site_rows in by_site.items():
        correction = fit_bias_correction(site_rows)
        n_fit = sum(r["split"] in ("train", "val") and math.isfinite(r["target"]) for r in site_rows)
        for row in site_rows:
            row["gap_corrected"] = (
                float(correction.corrected_gap(torch.tensor([row["prediction"]]), torch.tensor([row["target"]]))[0])
                if correction is not None and math.isfinite(row["target"])
                else float("nan")
            )
        root = Path(roots[site]) if site in roots else None
        out_dir = _writable_dir((root or Path(".")) / DERIVATIVE_DIR, site)
        write_dataset_description(out_dir, root, {
            "Name": "neurofed",
            "Version": provenance["Version"],
            "Description": f"run {run_name}: {provenance['Model']} from checkpoint {provenance['Checkpoint']}; "
            f"outputs in {folder.as_posix()}/",
        })
        table = out_dir / folder / f"desc-{label}_predictions.tsv"
        written.append(write_site_table(site_rows, table, label))
        sidecar = predictions_sidecar(label, correction, n_fit, {**provenance, "Site": site})
        written.append(atomic_write_text(table.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n"))
        first_dir = first_dir or out_dir / folder
        test = [r for r in site_rows if r["split"] == "test" and math.isfinite(r["target"])]
        if test:
            test_points[site] = ([r["target"] for r in test], [r["prediction"] for r in test])
    if test_points and first_dir is not None:
        written.append(
            scatter_true_vs_predicted(
                test_points, first_dir / "figures" / f"desc-{label}_scatter.png", label=label,
                run=run_name, strategy=strategy, split="test",
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
