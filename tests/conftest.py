"""Shared fixtures: tiny synthetic BIDS datasets written in a few hundred milliseconds.

``make_bids`` is used by tests across the package; keep its signature stable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def _volume(age: float, shape: Sequence[int], rng: np.random.Generator, intensity: float) -> np.ndarray:
    """A bright ellipsoid 'brain' that shrinks with age around a dark core that grows with age."""
    grids = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    t = (age - 20.0) / 70.0  # 0 at 20 y, 1 at 90 y
    brain = radius < 0.85 - 0.2 * t
    core = radius < 0.15 + 0.3 * t
    image = np.where(brain, 1.0, 0.05) - np.where(core, 0.7, 0.0)
    image = image + rng.normal(0.0, 0.05, size=image.shape)
    return (intensity * np.clip(image, 0.0, None)).astype(np.float32)


def write_nifti(path: Path, data: np.ndarray, spacing: float = 4.0) -> Path:
    """Write ``data`` as NIfTI with an isotropic, roughly centred RAS affine."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (np.asarray(data.shape[:3]) - 1) / 2.0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def make_bids_dataset(
    root: str | Path,
    n_subjects: int = 12,
    shape: tuple[int, int, int] = (24, 28, 24),
    spacing: float = 4.0,
    sessions_every: int = 4,
    label_columns: Sequence[str] = ("age", "sex", "sdmt"),
    seed: int = 0,
    name: str | None = None,
    intensity: float = 1.0,
) -> Path:
    """Write a tiny valid BIDS dataset and return its root.

    - ``sub-01``..``sub-NN`` with float32 ``.nii.gz`` T1w volumes whose anatomy
      depends on age (learnable signal) plus noise, scaled by ``intensity``.
    - Every ``sessions_every``-th subject (sub-01, sub-05, ... for 4; 0 = never)
      has ``ses-1`` and ``ses-2`` (two years apart) and a ``sub-X_sessions.tsv``
      with the age at each session; the others have no session level.
    - ``participants.tsv``: participant_id plus ``label_columns`` (age 20-85,
      sex M/F, sdmt ~ 60 - 0.3 (age - 20) + noise).
    - ``dataset_description.json`` with ``Name`` = ``name`` or the folder name.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    name = name or root.name
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": name, "BIDSVersion": "1.8.0", "DatasetType": "raw"})
    )
    rows = []
    for index in range(n_subjects):
        pid = f"sub-{index + 1:02d}"
        age = float(np.round(rng.uniform(20.0, 85.0), 1))
        values = {
            "age": f"{age:g}",
            "sex": "M" if rng.random() < 0.5 else "F",
            "sdmt": f"{60.0 - 0.3 * (age - 20.0) + rng.normal(0.0, 4.0):.1f}",
        }
        rows.append([pid] + [values.get(col, "n/a") for col in label_columns])
        if sessions_every and index % sessions_every == 0:
            lines = ["session_id\tage"]
            for ses, ses_age in (("1", age), ("2", age + 2.0)):
                anat = root / pid / f"ses-{ses}" / "anat"
                write_nifti(anat / f"{pid}_ses-{ses}_T1w.nii.gz",
                            _volume(ses_age, shape, rng, intensity), spacing)
                lines.append(f"ses-{ses}\t{ses_age:g}")
            (root / pid / f"{pid}_sessions.tsv").write_text("\n".join(lines) + "\n")
        else:
            write_nifti(root / pid / "anat" / f"{pid}_T1w.nii.gz", _volume(age, shape, rng, intensity), spacing)
    header = "\t".join(["participant_id", *label_columns])
    (root / "participants.tsv").write_text(
        header + "\n" + "\n".join("\t".join(r) for r in rows) + "\n"
    )
    return root


@pytest.fixture
def make_bids() -> Callable[..., Path]:
    """Factory: ``make_bids(root, n_subjects=12, shape=(24, 28, 24), spacing=4.0, sessions_every=4,
    label_columns=("age", "sex", "sdmt"), seed=0, name=None, intensity=1.0) -> Path``."""
    return make_bids_dataset


@pytest.fixture
def tiny_bids(tmp_path: Path) -> Path:
    """One 12-subject dataset (sub-01, sub-05, sub-09 with two sessions) under tmp_path/bids."""
    return make_bids_dataset(tmp_path / "bids", name="tiny")


@pytest.fixture
def tiny_sites(tmp_path: Path) -> list[Path]:
    """Three 8-subject datasets named ixi, sald, camcan with different intensity scales."""
    specs = (("ixi", 1.0), ("sald", 250.0), ("camcan", 3000.0))
    return [
        make_bids_dataset(tmp_path / name, n_subjects=8, seed=i, name=name, intensity=scale)
        for i, (name, scale) in enumerate(specs)
    ]


def bids_validator() -> str | None:
    """``bids-validator-deno`` (the ``test`` extra) on PATH or beside this interpreter (a venv's bin without
    activation); ``None`` where the package is not installed."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "bids-validator-deno"
    return shutil.which("bids-validator-deno") or (str(beside) if beside.is_file() else None)


#: Why a validator test is skipped: the package is a test dependency, missing only outside `pip install -e .[test]`.
NO_VALIDATOR = "bids-validator-deno is not installed; it comes with `pip install -e .[test]`"
