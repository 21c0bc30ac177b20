"""Predictions as a BIDS derivative dataset: ``<root>/derivatives/neurofed/`` at every site.

Predictions never leave the site that made them, so each site writes its own table next to its own data.
The ``split`` column and the bias correction of the brain-age gap come from the run that trained the model
(:mod:`neurofed.provenance`): at the end of ``fit`` the correction is fitted on each dataset's training and
validation scans and stored with the model, so test-set gaps never correct themselves; applied to a dataset
the run never used, the model labels every scan ``unseen`` and applies the run's correction unchanged.

Layout (``bids-validator-deno`` reports no error on it; it checks ``dataset_description.json`` and the README
only, because BIDS has no file type for model predictions and ``runs/`` is listed in ``.bidsignore``)::

    derivatives/neurofed/
        dataset_description.json     DatasetType derivative; GeneratedBy: one entry per run written here
        README.md
        .bidsignore                  "runs"
        runs/<run>/desc-<label>_predictions.tsv    participant_id, session_id, split, <label>, ...
        runs/<run>/desc-<label>_predictions.json   data dictionary: columns, units, levels, bias correction,
                                                   the training run, model, checkpoint
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
from neurofed.metrics import format_number
from neurofed.plots import figure_title, scatter_true_vs_predicted
from neurofed.provenance import (
    DatasetProvenance,
    dataset_provenance,
    fit_bias_correction,
    split_fingerprints,
    training_record,
)

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
    "unseen": "never used by the run that trained the model: a dataset it did not train on, or a subject "
              "without a label",
}
#: ``training_record`` of :func:`write_predictions` when the predictions come from the run that trained the
#: model on this very data module (the end of ``fit``): its splits are the run's.
THIS_RUN = "this run"


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


def run_training_record(outputs: Iterable[Mapping[str, Any]], datamodule: Any, run_name: str) -> dict[str, Any]:
    """The training record of the run whose model made ``outputs`` on its own data module (see provenance)."""
    rows = flatten_outputs(outputs)
    splits = split_lookup(datamodule)
    for row in rows:
        row["split"] = splits.get((row["site"], row["participant_id"]), "unseen")
    return training_record(rows, datamodule, run_name)


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


_THIS_DATASET = {
    "trained": "one of the datasets the run trained on ({matched}): same subjects, same split",
    "unseen": "not one of the run's datasets: the model never saw any of its scans",
    "unknown": "named like one of the run's datasets, but its subjects or split differ from the run's: whether a "
               "scan was used for training cannot be told (split n/a)",
    "no record": "unknown: the checkpoint carries no training record (split n/a)",
}


def predictions_sidecar(label: str, where: DatasetProvenance, record: Mapping[str, Any] | None,
                        provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The data dictionary of a predictions table: every column, its unit and levels, the bias correction and
    where it was fitted, the run that trained the model and how this dataset relates to it, and what made it."""
    name = display_name(label)
    units = {"Units": u} if (u := sidecar_units(label)) else {}
    correction = where.correction
    if correction is None:
        method = f"not applied ({where.fitted_on}; fewer than 3 labelled train/val scans, or none known); " \
                 "gap_corrected is n/a" if where.status != "no record" else f"{where.fitted_on}; gap_corrected is n/a"
    else:
        method = (
            f"linear: gap_corrected = gap - (slope * {label} + intercept), slope and intercept fitted by least "
            f"squares of gap on {label} over {where.fitted_on} ({where.n_fit} scans; slope {correction.slope:.6g}, "
            f"intercept {correction.intercept:.6g}); test and unseen scans never enter the fit"
        )
    levels = {k: v for k, v in SPLIT_LEVELS.items() if where.status == "trained" or k == "unseen"}
    training = {"ThisDataset": _THIS_DATASET[where.status].format(matched=where.matched)}
    if record is not None:
        training = {"Run": record.get("run"), "Datasets": {
            d: {s: entry.get("splits", {}).get(s, {}).get("subjects") for s in ("train", "val", "test")}
            for d, entry in record.get("datasets", {}).items()}, **training}
    return {
        "participant_id": {"Description": "Participant, as named in the source dataset."},
        "session_id": {"Description": "Session (ses-<label>) of the scan; n/a when the dataset has no sessions."},
        "split": {
            "Description": "Subject-level split of the scan in the run that trained the model (TrainingRun); "
            "n/a when it cannot be told.",
            "Levels": levels,
        },
        label: {"Description": f"Observed {name} (participants.tsv, or the sessions file for age); n/a when "
                "unknown.", **units},
        "prediction": {"Description": f"{name} predicted by the model from the scan.", **units},
        "gap": {"Description": f"prediction - {label} (for age: the brain-age gap).", **units},
        "gap_corrected": {"Description": f"gap without its linear dependence on {label}: {method}.", **units},
        "BiasCorrection": {
            "Method": method,
            "FittedOn": where.fitted_on,
            "N": where.n_fit,
            **({"Slope": correction.slope, "Intercept": correction.intercept} if correction else {}),
        },
        "TrainingRun": training,
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
    training_record: Mapping[str, Any] | str | None = THIS_RUN,
) -> list[Path]:
    """Write every site's predictions as a BIDS derivative under ``<root>/derivatives/neurofed/``.

    Each dataset gets ``runs/<run>/desc-<label>_predictions.tsv``, its JSON data dictionary, a scatter plot of
    its own scans (test split, or the scans the model never saw) when they have labels, and an entry for the
    run in the derivative's ``dataset_description.json``. Falls back to ``checkpoints/predictions/<site>/``
    when a data root is read-only.

    Args:
        outputs: ``predict_step`` outputs (batches of pred, target, participant_id, session, site).
        datamodule: The set-up data module (label, roots, site names, splits).
        model: The model that predicted; its class is recorded.
        run_name: Names the run's folder and appears in titles and records; default ``predict-<timestamp>``,
            so that an unnamed call never overwrites an earlier one.
        checkpoint: Checkpoint the weights came from; its path and SHA-256 are recorded.
        strategy: How the model was trained (``"FedAvg"``, ``"centralized"``), for titles and records.
        training_record: The record of the run that trained the model (:mod:`neurofed.provenance`, read from its
            checkpoint); :data:`THIS_RUN` when that run is this data module's (the end of ``fit``); ``None``
            when unknown (splits and correction are then n/a).

    Returns the paths written (tables, data dictionaries, figures).
    """
    label = getattr(datamodule, "label", "target")
    run_name = run_name or time.strftime("predict-%Y%m%dT%H%M%S")
    if isinstance(training_record, str):
        training_record = run_training_record(outputs, datamodule, run_name)
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
    fingerprints = split_fingerprints(datamodule)
    by_site: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_site[row["site"]].append(row)

    roots = dict(zip(getattr(datamodule, "site_names", []), getattr(datamodule, "roots", [])))
    written: list[Path] = []
    for site, site_rows in by_site.items():
        where = dataset_provenance(training_record, site, fingerprints.get(site, {}))
        for row in site_rows:
            row["split"] = where.split_of(splits.get((site, row["participant_id"])))
            row["gap"] = row["prediction"] - row["target"]
            row["gap_corrected"] = (where.correction.corrected_gap(row["prediction"], row["target"])
                                    if where.correction is not None and math.isfinite(row["target"]) else math.nan)
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
        sidecar = predictions_sidecar(label, where, training_record, {**provenance, "Site": site})
        written.append(atomic_write_text(table.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n"))
        figure = _site_scatter(site, site_rows, out_dir / folder / "figures" / f"desc-{label}_scatter.png",
                               label, run_name, strategy)
        written += [figure] if figure is not None else []
    return written


def _site_scatter(site: str, rows: Sequence[Mapping[str, Any]], path: Path, label: str, run: str,
                  strategy: str | None) -> Path | None:
    """One dataset's own scans, true vs predicted: its test split, else the scans the model never saw."""
    labelled = [r for r in rows if math.isfinite(r["target"])]
    for split, title in (("test", None), ("unseen", "scans the model never saw"), ("n/a", "scans of unknown split")):
        shown = [r for r in labelled if r["split"] == split]
        if shown:
            subject = f"{display_name(label)}: true vs predicted"
            return scatter_true_vs_predicted(
                {site: ([r["target"] for r in shown], [r["prediction"] for r in shown])}, path, label=label,
                title=figure_title(f"{subject}, {title}", run, strategy) if title else None,
                run=run, strategy=strategy, split=split,
            )
    return None


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
