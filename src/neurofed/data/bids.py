"""Indexing a BIDS dataset into scan records with labels.

Only the small part of BIDS that structural-MRI studies use is read:
``participants.tsv``, ``sub-X[/ses-Y]/anat/sub-X[_ses-Y][_key-value...]_<suffix>.nii[.gz]``,
optional per-subject ``sub-X_sessions.tsv`` (age at each session) and
``derivatives/<pipeline>/`` (images from a preprocessing pipeline, labels still
from the raw dataset). Problems that affect single scans are collected in a
:class:`ValidationReport`; problems that make the dataset unusable raise.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from neurofed.data.validation import NeurofedDataError, ValidationReport

log = logging.getLogger(__name__)

_FILE_RE = re.compile(
    r"^(?P<sub>sub-[A-Za-z0-9]+)(?P<entities>(?:_[A-Za-z]+-[A-Za-z0-9]+)*)_(?P<suffix>[A-Za-z0-9]+)"
    r"\.nii(?:\.gz)?$"
)
_MISSING = {"", "n/a", "na", "nan"}


@dataclass
class ScanRecord:
    """One scan of one participant at one session (all requested modalities)."""

    participant_id: str
    session: str  # "" when the dataset has no session level
    paths: dict[str, Path]  # modality -> file, T1w first
    label: float = math.nan
    site: str = ""
    entities: dict[str, str] = field(default_factory=dict)

    @property
    def has_label(self) -> bool:
        return not math.isnan(self.label)


def dataset_name(root: str | Path) -> str:
    """Site name: ``Name`` from dataset_description.json, else the folder name."""
    root = Path(root)
    desc = root / "dataset_description.json"
    if desc.is_file():
        try:
            name = json.loads(desc.read_text()).get("Name")
        except (json.JSONDecodeError, OSError):
            name = None
        if isinstance(name, str) and name.strip():
            return name.strip()
    return root.resolve().name


def _strip(prefix: str, value: str | None) -> str | None:
    if value is None:
        return None
    value = str(value)
    return value[len(prefix):] if value.startswith(prefix) else value


def _read_tsv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    return columns, rows


def _parse_value(value: str, *, path: Path, who: str, column: str) -> float:
    if value.lower() in _MISSING:
        return math.nan
    try:
        return float(value)
    except ValueError:
        raise NeurofedDataError(
            f"{path}: non-numeric {column!r} value {value!r} for {who}; "
            "write a number or n/a for unknown."
        ) from None


def _read_participants(
    root: Path, label: str, report: ValidationReport, strict: bool
) -> dict[str, float]:
    path = root / "participants.tsv"
    if not path.is_file():
        raise NeurofedDataError(
            f"{path}: missing participants.tsv; create a tab-separated file with columns "
            f"participant_id and {label} (n/a for unknown values)."
        )
    columns, rows = _read_tsv(path)
    if "participant_id" not in columns:
        raise NeurofedDataError(
            f"{path}: no participant_id column (columns: {', '.join(columns)}); "
            "add participant_id as the first column."
        )
    if label not in columns:
        raise NeurofedDataError(
            f"{path}: label column {label!r} not found; available columns: {', '.join(columns)}. "
            "Pass one of them as label=... or add the column."
        )
    labels: dict[str, float] = {}
    for row in rows:
        pid = row["participant_id"]
        if not pid:
            continue
        pid = pid if pid.startswith("sub-") else f"sub-{pid}"
        value = _parse_value(row.get(label, ""), path=path, who=pid, column=label)
        if pid in labels:
            report.add("duplicate_id", path, f"participant {pid} listed more than once",
                       "keep one row per participant; the first row is used")
            if strict:
                report.raise_if_issues()
            continue
        labels[pid] = value
    return labels


def _session_ages(subject_dirs: list[Path], pid: str) -> dict[str, float]:
    """Age per session from ``<sub>/<sub>_sessions.tsv`` (raw or derivatives), if present."""
    for sub_dir in subject_dirs:
        path = sub_dir / f"{pid}_sessions.tsv"
        if not path.is_file():
            continue
        columns, rows = _read_tsv(path)
        if "session_id" not in columns or "age" not in columns:
            return {}
        return {
            _strip("ses-", row["session_id"]): _parse_value(
                row["age"], path=path, who=f"{pid} {row['session_id']}", column="age"
            )
            for row in rows
        }
    return {}


def _parse_entities(text: str) -> dict[str, str]:
    pairs = (item.split("-", 1) for item in text.strip("_").split("_") if item)
    return {key: value for key, value in pairs}


def _same_run(found: str, wanted: str) -> bool:
    """``run-01`` and ``run-1`` are the same run."""
    if found.isdigit() and wanted.isdigit():
        return int(found) == int(wanted)
    return found == wanted


def _run_order(entities: dict[str, str]) -> tuple:
    """Sort key whose maximum is the preferred scan: plainest acquisition, then last run."""
    run = entities.get("run", "")
    other = tuple(sorted((k, v) for k, v in entities.items() if k != "run"))
    return (-len(other), other, int(run) if run.isdigit() else -1, run)


def _anat_files(session_dir: Path) -> list[tuple[Path, str, dict[str, str]]]:
    anat = session_dir / "anat"
    if not anat.is_dir():
        return []
    found = []
    for path in sorted(anat.iterdir()):
        match = _FILE_RE.match(path.name)
        if match and path.is_file():
            found.append((path, match["suffix"], _parse_entities(match["entities"])))
    return found


def _select_scan(
    files: list[tuple[Path, str, dict[str, str]]],
    modalities: tuple[str, ...],
    acq: str | None,
    run: str | None,
    where: str,
    report: ValidationReport,
) -> tuple[dict[str, Path], dict[str, str]] | None:
    """Pick one set of files (one per modality) sharing the same acq/run/... entities."""
    by_entities: dict[tuple, dict[str, Path]] = {}
    for path, suffix, entities in files:
        if suffix not in modalities:
            continue
        if acq is not None and entities.get("acq") != acq:
            continue
        if run is not None and not _same_run(entities.get("run", ""), run):
            continue
        key = tuple(sorted((k, v) for k, v in entities.items() if k != "ses"))
        by_entities.setdefault(key, {})[suffix] = path
    complete = [k for k, mods in by_entities.items() if all(m in mods for m in modalities)]
    if not complete:
        return None
    complete.sort(key=lambda k: _run_order(dict(k)))
    chosen = complete[-1]
    if len(complete) > 1:
        report.note(
            f"{where}: {len(complete)} matching scans, using the last "
            f"({', '.join(f'{k}-{v}' for k, v in chosen) or 'no entities'}); pass acq=/run= to choose"
        )
    mods = by_entities[chosen]
    return {m: mods[m] for m in modalities}, dict(chosen)


def index_bids(
    root: str | Path,
    modalities: tuple[str, ...] | list[str] = ("T1w",),
    label: str = "age",
    session: str | None = None,
    acq: str | None = None,
    run: str | None = None,
    derivatives: str | None = None,
    strict: bool = False,
    site: str | None = None,
) -> tuple[list[ScanRecord], ValidationReport]:
    """Index one BIDS dataset.

    Returns the scans (sorted by participant and session; a scan is kept when
    all ``modalities`` exist with the same entities, label NaN when unknown) and
    the report of soft issues. ``strict=True`` raises on any issue.
    """
    root = Path(root)
    modalities = tuple(modalities)
    if not modalities or modalities[0] != "T1w":
        modalities = ("T1w",) + tuple(m for m in modalities if m != "T1w")
    if not root.is_dir():
        raise NeurofedDataError(
            f"{root}: BIDS root not found; pass the folder that contains participants.tsv."
        )
    report = ValidationReport()
    labels = _read_participants(root, label, report, strict)
    image_root = root
    if derivatives:
        image_root = root / "derivatives" / derivatives
        if not image_root.is_dir():
            available = sorted(p.name for p in (root / "derivatives").glob("*") if p.is_dir())
            raise NeurofedDataError(
                f"{image_root}: derivatives pipeline not found; available: "
                f"{', '.join(available) or 'none'}."
            )
    site = site or dataset_name(root)
    session = _strip("ses-", session)
    acq = _strip("acq-", acq)
    run = _strip("run-", run)

    subject_dirs = {p.name: p for p in sorted(image_root.glob("sub-*")) if p.is_dir()}
    records: list[ScanRecord] = []
    for pid in sorted(set(subject_dirs) | set(labels)):
        sub_dir = subject_dirs.get(pid)
        if sub_dir is None:
            report.add("missing_image", image_root / pid, f"{pid} is in participants.tsv but has no folder",
                       "add the scan or remove the row")
            continue
        if pid not in labels:
            report.add("not_in_participants", sub_dir, f"{pid} has images but no participants.tsv row",
                       "add a row (n/a for unknown values); kept for prediction only")
        ses_dirs = sorted(p for p in sub_dir.glob("ses-*") if p.is_dir())
        levels = [(_strip("ses-", p.name), p) for p in ses_dirs] or [("", sub_dir)]
        ages = _session_ages([sub_dir, root / pid], pid) if label == "age" else {}
        found_any = False
        for ses, ses_dir in levels:
            files = _anat_files(ses_dir)
            if any(suffix == "T1w" for _, suffix, _ in files):
                found_any = True
            if session is not None and ses != session:
                continue
            chosen = _select_scan(files, modalities, acq, run, str(ses_dir), report)
            if chosen is None:
                if any(suffix == "T1w" for _, suffix, _ in files) and acq is None and run is None:
                    missing = [m for m in modalities if not any(s == m for _, s, _ in files)]
                    report.add("missing_image", ses_dir / "anat", f"no {', '.join(missing)} image",
                               "add the missing modality or drop it from modalities")
                continue
            paths, entities = chosen
            value = labels.get(pid, math.nan)
            if ses and not math.isnan(ages.get(ses, math.nan)):
                value = ages[ses]
            records.append(ScanRecord(pid, ses, paths, value, site, entities))
            if math.isnan(value) and pid in labels:
                report.add("missing_label", paths["T1w"], f"{pid}: {label} is n/a",
                           "fill in the value; kept for prediction only")
        if not found_any:
            report.add("missing_image", sub_dir, f"{pid}: subject folder has no T1w image",
                       "add sub-X[/ses-Y]/anat/sub-X[_ses-Y]_T1w.nii.gz or remove the folder")
    for text in report.notes:
        log.info(text)
    if strict:
        report.raise_if_issues()
    return records, report
