"""Read back a written site: the tables the command prints and the benchmark correlates."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _num(rows: list[dict[str, str]], key: str) -> np.ndarray:
    return np.array([float(r[key]) for r in rows if r.get(key) not in (None, "", "n/a")])


def summarize_site(site_dir: str | Path) -> dict[str, float]:
    """Subjects, scans and age/SDMT statistics of a written site."""
    site_dir = Path(site_dir)
    rows = read_tsv(site_dir / "participants.tsv")
    age, sdmt = _num(rows, "age"), _num(rows, "sdmt")
    scans = len(list(site_dir.glob("sub-*/**/anat/*_T1w.nii*")))
    return {
        "subjects": len(rows), "scans": scans,
        "age_mean": float(age.mean()), "age_sd": float(age.std(ddof=1)) if len(age) > 1 else 0.0,
        "age_min": float(age.min()), "age_max": float(age.max()),
        "sdmt_mean": float(sdmt.mean()), "sdmt_sd": float(sdmt.std(ddof=1)) if len(sdmt) > 1 else 0.0,
    }
