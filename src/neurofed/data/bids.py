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

from neurofed.data.entities import (
    FILTER_ENTITIES,
    AnatFile,
    Choice,
    choice_note,
    describe,
    filter_files,
    parse_entities,
    select_scan,
)
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
    return value.removeprefix(prefix)


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


def _labels_unavailable(message: str, report: ValidationReport, require_labels: bool) -> None:
    """Without labels a dataset can still be predicted; training needs them, so only then is it an error."""
    if require_labels:
        raise NeurofedDataError(message)
    report.note(f"{message.split('; ')[0]}: labels are n/a, which is fine for predict (fit needs them)")


def _read_participants(
    root: Path, label: str, report: ValidationReport, strict: bool, require_labels: bool = True
) -> dict[str, float] | None:
    """Labels by participant; None when the file or the label column is absent and labels are optional."""
    path = root / "participants.tsv"
    if not path.is_file():
        _labels_unavailable(
            f"{path}: missing participants.tsv; create a tab-separated file with columns "
            f"participant_id and {label} (n/a for unknown values).",
            report, require_labels,
        )
        return None
    columns, rows = _read_tsv(path)
    if "participant_id" not in columns:
        raise NeurofedDataError(
            f"{path}: no participant_id column (columns: {', '.join(columns)}); "
            "add participant_id as the first column."
        )
    if label not in columns:
        _labels_unavailable(
            f"{path}: label column {label!r} not found; available columns: {', '.join(columns)}. "
            "Pass one of them as label=... or add the column.",
            report, require_labels,
        )
        return None
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


def _anat_files(session_dir: Path) -> list[AnatFile]:
    anat = session_dir / "anat"
    if not anat.is_dir():
        return []
    found = []
    for path in sorted(anat.iterdir()):
        match = _FILE_RE.match(path.name)
        if match and path.is_file():
            found.append((path, match["suffix"], parse_entities(match["entities"])))
    return found


def _shown(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


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
    *,
    space: str | None = None,
    desc: str | None = None,
    res: str | None = None,
    require_labels: bool = True,
) -> tuple[list[ScanRecord], ValidationReport]:
    """Index one BIDS dataset.

    Returns the scans (sorted by participant and session; a scan is kept when
    all ``modalities`` exist with the same entities, label NaN when unknown) and
    the report of soft issues. ``strict=True`` raises on any issue.

    Args:
        session, acq, run: keep only scans with this entity (``"ses-1"`` or ``"1"``, ...).
        space, desc, res: the same for derivatives (``space="MNI152NLin2009cAsym"``, ``desc="preproc"``,
            ``res="2"``); without them a subject with several candidates gets the one with the fewest
            entities (native space) and a note says so.
        require_labels: ``False`` (for predict) accepts a dataset without ``participants.tsv`` or without
            the label column: labels are n/a and a note says so.

    A filter that matches none of a subject's scans is counted in ``report.filtered`` and noted with the
    subjects and the values present.
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
    labels = _read_participants(root, label, report, strict, require_labels)
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
    given = dict(zip(FILTER_ENTITIES, (acq, run, space, desc, res)))
    filters = {key: _strip(f"{key}-", value) for key, value in given.items() if value is not None}
    present: dict[str, set[str]] = {key: set() for key in ("ses", *filters)}
    choices: dict[tuple, tuple[Choice, list[str]]] = {}

    subject_dirs = {p.name: p for p in sorted(image_root.glob("sub-*")) if p.is_dir()}
    records: list[ScanRecord] = []
    for pid in sorted(set(subject_dirs) | set(labels or {})):
        sub_dir = subject_dirs.get(pid)
        if sub_dir is None:
            report.add("missing_image", image_root / pid, f"{pid} is in participants.tsv but has no folder",
                       "add the scan or remove the row")
            continue
        if labels is not None and pid not in labels:
            report.add("not_in_participants", sub_dir, f"{pid} has images but no participants.tsv row",
                       "add a row (n/a for unknown values); kept for prediction only")
        ses_dirs = sorted(p for p in sub_dir.glob("ses-*") if p.is_dir())
        levels = [(_strip("ses-", p.name), p) for p in ses_dirs] or [("", sub_dir)]
        ages = _session_ages([sub_dir, root / pid], pid) if label == "age" else {}
        found_any = session_matched = False
        for ses, ses_dir in levels:
            files = _anat_files(ses_dir)
            t1w = [entities for _, suffix, entities in files if suffix == "T1w"]
            if not t1w:
                continue
            found_any = True
            present["ses"].add(ses or "(none)")
            for key in filters:
                present[key].update(e.get(key, "(none)") for e in t1w)
            if session is not None and ses != session:
                continue
            session_matched = True
            kept, emptied_by = filter_files(files, filters)
            if emptied_by is not None:
                report.filtered.setdefault(emptied_by, []).append(pid + (f" ses-{ses}" if ses else ""))
                continue
            chosen = select_scan(kept, modalities)
            if chosen is None:
                missing = [m for m in modalities if not any(s == m for _, s, _ in kept)]
                report.add("missing_image", ses_dir / "anat", f"no {', '.join(missing)} image"
                           + (f" matching {', '.join(f'{k}={v}' for k, v in filters.items())}" if filters else ""),
                           "add the missing modality or drop it from modalities")
                continue
            if len(chosen.candidates) > 1:
                group = (tuple(describe(c) for c in chosen.candidates), describe(chosen.entities))
                choices.setdefault(group, (chosen, []))[1].append(pid + (f" ses-{ses}" if ses else ""))
            value = (labels or {}).get(pid, math.nan)
            if ses and not math.isnan(ages.get(ses, math.nan)):
                value = ages[ses]
            records.append(ScanRecord(pid, ses, chosen.paths, value, site, chosen.entities))
            if math.isnan(value) and labels is not None and pid in labels:
                report.add("missing_label", chosen.paths["T1w"], f"{pid}: {label} is n/a",
                           "fill in the value; kept for prediction only")
        if not found_any:
            report.add("missing_image", sub_dir, f"{pid}: subject folder has no T1w image",
                       "add sub-X[/ses-Y]/anat/sub-X[_ses-Y]_T1w.nii.gz or remove the folder")
        elif session is not None and not session_matched:
            report.filtered.setdefault(f"session={session}", []).append(pid)
    for chosen, where in choices.values():
        report.note(choice_note(chosen, where, filters))
    _note_filtered(report, image_root, present, bool(records))
    for text in report.notes:
        log.info(text)
    if strict:
        report.raise_if_issues()
    return records, report


def _note_filtered(
    report: ValidationReport, image_root: Path, present: dict[str, set[str]], any_kept: bool
) -> None:
    """A note per filter that dropped subjects, naming them and the values the dataset does have."""
    for text, dropped in report.filtered.items():
        key = "ses" if text.startswith("session=") else text.split("=", 1)[0]
        values = ", ".join(sorted(present.get(key, set()))) or "none"
        report.note(f"{text} matches no scan of {_shown(dropped)} in {image_root}; {key} values present: {values}")
    if report.filtered and not any_kept:
        report.emptied.append(f"{image_root} ({', '.join(report.filtered)})")
        report.note(
            f"nothing in {image_root} matches {', '.join(report.filtered)}: 0 scans indexed; values present: "
            + "; ".join(f"{k}: {', '.join(sorted(v)) or 'none'}" for k, v in present.items() if v)
        )
