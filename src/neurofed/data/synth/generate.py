"""Write one synthetic site as a BIDS dataset.

Every random draw comes from a numpy Generator seeded by (seed, site, subject index), with the site turned
into a number by SHA-256 rather than Python's salted ``hash``, so the same call writes byte-identical files
in any process, and a subject looks the same whatever ``n_subjects`` is.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from neurofed.data.synth import anatomy, intensity, lesions
from neurofed.data.synth.bids_metadata import (  # noqa: F401  (names re-exported for existing callers)
    BIDS_VERSION,
    GENERATOR_NAME,
    MS_COLUMNS,
    PARTICIPANT_COLUMNS,
    t1w_sidecar,
    write_dataset_files,
    write_json,
)
from neurofed.data.synth.demographics import (
    ScanState,
    Subject,
    draw_subject,
    scan_state,
)
from neurofed.data.synth.raw import synthesize_raw_scan, transform_row
from neurofed.data.synth.site_effect import scaled_profile
from neurofed.data.synth.sites import COHORT_AGE_RANGE, COHORTS, SiteProfile, get_site
from neurofed.data.synth.template import load_template
from neurofed.metrics import format_number

log = logging.getLogger(__name__)

def stable_hash(text: str) -> int:
    """A process-independent 63-bit integer for ``text``."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def site_grid(profile: SiteProfile, resolution: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Matrix size and RAS affine of the site's field of view at ``resolution`` mm."""
    shape = tuple(int(round(f / resolution)) for f in profile.fov_mm)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([resolution] * 3)
    centre = anatomy.BRAIN_CENTER_MM + np.asarray(profile.center_shift_mm)
    affine[:3, 3] = centre - resolution * (np.array(shape) - 1) / 2
    return shape, affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Save gzip-compressed NIfTI with a zero gzip timestamp, so equal data give equal bytes."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def synthesize_scan(subject: Subject, years: float, session_index: int, profile: SiteProfile,
                    resolution: float) -> tuple[np.ndarray, np.ndarray]:
    """Image data (site dtype) and affine of ``subject`` ``years`` after the first scan."""
    template = load_template(resolution)
    state = scan_state(subject, years)
    scale, elastic = anatomy.draw_shape(np.random.default_rng([subject.seed, 0]), subject.sex)
    scan_rng = np.random.default_rng([subject.seed, 1, session_index])
    angles, translation = anatomy.draw_pose(scan_rng)
    geometry = anatomy.Geometry(scale, angles, translation, elastic)

    spacing = np.diag(template.affine)[:3]
    lesion_rng = np.random.default_rng([subject.seed, 2])
    lesion_map = None
    for kind, load in (("wmh", state.wmh_ml), ("ms", state.lesion_ml)):
        # The layout is drawn at the first-scan load so that a follow-up shows the same lesions, grown.
        base = scan_state(subject, 0.0)
        base_load = base.wmh_ml if kind == "wmh" else base.lesion_ml
        blobs = lesions.lesion_layout(lesion_rng, template, kind, base_load)
        if blobs:
            lesion_map = lesions.render_lesions(template.gm.shape, spacing, blobs, load, lesion_map)

    gm, wm, csf = anatomy.aged_tissue(template, state.bio_age, state.thalamic_loss, lesion_map)
    shape, affine = site_grid(profile, resolution)
    coords = anatomy.sampling_grid(template, shape, affine, geometry, state.bio_age)
    gm, wm, csf = anatomy.warp((gm, wm, csf), coords)
    image = intensity.render(gm, wm, csf, profile, scan_rng, resolution)
    return intensity.to_dtype(image, profile.dtype), affine


def _write_tsv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _clinical(state: ScanState, cohort: str) -> dict[str, str]:
    row = {"sdmt": format_number(state.sdmt, 1)}
    if cohort == "ms":
        row |= {"lesion_ml": f"{state.lesion_ml:.2f}", "disease_duration": format_number(state.duration, 1)}
    return row


def _latent_row(subject: Subject, state: ScanState, session: str) -> dict[str, str]:
    return {
        "participant_id": subject.participant_id, "session_id": session, "age": f"{state.age:.2f}",
        "sex": subject.sex, "bio_age": f"{state.bio_age:.2f}", "atrophy_gap": f"{state.bio_age - state.age:.2f}",
        "disease_duration": f"{state.duration:.2f}", "lesion_ml": f"{state.lesion_ml:.3f}",
        "wmh_ml": f"{state.wmh_ml:.3f}", "thalamic_loss": f"{state.thalamic_loss:.4f}",
        "education": f"{subject.education:.3f}", "sdmt": f"{state.sdmt:.2f}",
    }


def _prepare_dir(site_dir: Path) -> None:
    """Refuse to overwrite foreign data; replace an earlier synthetic site completely (no stale subjects)."""
    if site_dir.exists() and any(site_dir.iterdir()):
        desc = site_dir / "dataset_description.json"
        try:
            generated = json.loads(desc.read_text()).get("GeneratedBy", [{}])[0].get("Name")
        except (OSError, ValueError, IndexError, AttributeError):
            generated = None
        if generated != GENERATOR_NAME:
            raise FileExistsError(
                f"{site_dir} exists and was not written by {GENERATOR_NAME}; choose an empty --out folder")
        shutil.rmtree(site_dir)
    site_dir.mkdir(parents=True, exist_ok=True)


def generate_site(out_dir: str | Path, site: str, n_subjects: int, resolution: float = 2.0, seed: int = 0,
                  cohort: str | None = None, session_fraction: float = 0.2,
                  progress: bool = True, site_effect: float = 1.0, raw: bool = False,
                  age_range: tuple[float, float] | None = None) -> Path:
    """Write the synthetic BIDS dataset ``out_dir/<site>`` and return its path.

    ``cohort`` ("healthy" or "ms") defaults to the site's own population; naming the other one keeps the
    site's scanner but draws the other population. ``session_fraction`` of the subjects get a second
    session 1-3 years after the first (``ses-1``/``ses-2`` folders); the others have no session level.
    ``site_effect`` scales the scanner differences between sites (0 = one scanner, 1 = published
    differences, 2 = twice them); see ``site_effect.scaled_profile``. Besides the BIDS files, the true
    simulated variables of every scan go to ``sourcedata/latents.tsv``. ``raw=True`` writes raw-like scans
    (head, neck, native pose; see ``raw.py``) and their true transforms to ``sourcedata/transforms.tsv``.
    ``age_range`` (years) replaces the site's own range, so that sites can differ in who they scanned as well
    as in how (label shift between sites).
    """
    profile = scaled_profile(get_site(site), site_effect)
    cohort = cohort or profile.cohort
    if cohort not in COHORTS:
        raise ValueError(f"unknown cohort {cohort!r}; use one of {', '.join(COHORTS)}")
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}")
    if not 0.0 <= session_fraction <= 1.0:
        raise ValueError(f"session_fraction must be within [0, 1], got {session_fraction}")
    if age_range is not None and not 0 <= age_range[0] < age_range[1] <= 100:
        raise ValueError(f"age_range must be (low, high) with 0 <= low < high <= 100, got {age_range}")
    age_range = age_range or (profile.age_range if cohort == profile.cohort else COHORT_AGE_RANGE[cohort])
    site_dir = Path(out_dir) / profile.name
    _prepare_dir(site_dir)
    load_template(resolution)  # fail early, before any file is written

    site_key = stable_hash(f"neurofed-synth:{profile.name}")
    n_sessions = int(round(session_fraction * n_subjects))
    if session_fraction > 0 and n_subjects >= 2:
        n_sessions = max(n_sessions, 1)
    longitudinal = set(np.random.default_rng([seed, site_key]).permutation(n_subjects)[:n_sessions].tolist())

    participants, latents, transforms = [], [], []

    def scan(years: float, k: int, relpath: str) -> tuple[np.ndarray, np.ndarray]:
        if not raw:
            return synthesize_scan(subject, years, k, profile, resolution)
        data, affine, pose = synthesize_raw_scan(subject, years, k, profile, resolution, load_template(resolution))
        transforms.append(transform_row(relpath, pose))
        return data, affine

    sidecar = t1w_sidecar(profile, resolution, float(site_effect))
    start = time.perf_counter()
    for i in tqdm(range(n_subjects), desc=f"synth {profile.name}", unit="subject", disable=not progress):
        rng = np.random.default_rng([seed, site_key, i])
        pid = f"sub-{i + 1:04d}"
        subject = draw_subject(rng, pid, cohort, age_range)
        followup = float(rng.uniform(1.0, 3.0))
        first = scan_state(subject, 0.0)
        participants.append({"participant_id": pid, "age": format_number(subject.age, 1), "sex": subject.sex}
                            | _clinical(first, cohort))
        if i in longitudinal:
            rows = []
            for k, years in enumerate((0.0, followup), start=1):
                ses = f"ses-{k}"
                data, affine = scan(years, k, f"{pid}/{ses}/anat/{pid}_{ses}_T1w.nii.gz")
                stem = site_dir / pid / ses / "anat" / f"{pid}_{ses}_T1w"
                write_nifti(stem.with_name(stem.name + ".nii.gz"), data, affine)
                write_json(stem.with_name(stem.name + ".json"), sidecar)
                state = scan_state(subject, years)
                latents.append(_latent_row(subject, state, ses))
                rows.append({"session_id": ses, "age": format_number(state.age, 1)} | _clinical(state, cohort))
            _write_tsv(site_dir / pid / f"{pid}_sessions.tsv", rows)
        else:
            data, affine = scan(0.0, 0, f"{pid}/anat/{pid}_T1w.nii.gz")
            stem = site_dir / pid / "anat" / f"{pid}_T1w"
            write_nifti(stem.with_name(stem.name + ".nii.gz"), data, affine)
            write_json(stem.with_name(stem.name + ".json"), sidecar)
            latents.append(_latent_row(subject, first, "n/a"))
    elapsed = time.perf_counter() - start
    log.info("%s: %d subjects in %.1f s (%.2f s/subject)", profile.name, n_subjects, elapsed,
             elapsed / n_subjects)

    _write_tsv(site_dir / "participants.tsv", participants)
    (site_dir / "sourcedata").mkdir(exist_ok=True)
    _write_tsv(site_dir / "sourcedata" / "latents.tsv", latents)
    if transforms:
        _write_tsv(site_dir / "sourcedata" / "transforms.tsv", transforms)
    write_dataset_files(site_dir, profile, cohort, seed, resolution, n_subjects, float(site_effect),
                        has_sessions=bool(longitudinal))
    return site_dir
