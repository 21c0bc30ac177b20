"""Who is scanned: age, sex, brain-age gap, MS disease state and the SDMT-like score.

The score is drawn from the same latent variables that shape the anatomy (biological age, lesion load,
disease duration) so that an image model can learn it, but with enough independent noise that brain age
explains only part of it, as in real MS cohorts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GAP_SD = 4.0  # brain-age gap, years
SDMT_RANGE = (0.0, 110.0)


@dataclass(frozen=True)
class Subject:
    """Subject-level draws; everything a scan needs is derived from these plus time since baseline."""

    participant_id: str
    cohort: str
    sex: str
    age: float  # at the first scan
    gap: float  # biological minus chronological age
    duration: float  # MS disease duration at the first scan (0 for healthy)
    lesion_ml: float  # MS lesion load at the first scan (0 for healthy)
    wmh_factor: float  # individual multiplier of age-related WM hypointensities
    sdmt_noise: float
    seed: int  # drives geometry, lesion placement and scanner noise


@dataclass(frozen=True)
class ScanState:
    """The subject at one session."""

    age: float
    bio_age: float
    duration: float
    lesion_ml: float
    wmh_ml: float
    deep_gm_loss: float  # extra fraction of deep GM lost to MS
    sdmt: float


def draw_subject(rng: np.random.Generator, participant_id: str, cohort: str,
                 age_range: tuple[float, float]) -> Subject:
    """Draw one subject of ``cohort`` ("healthy" or "ms") with ages inside ``age_range``."""
    lo, hi = age_range
    sex = "F" if rng.random() < 0.5 else "M"
    gap = float(rng.normal(0.0, GAP_SD))
    if cohort == "healthy":
        age = float(rng.uniform(lo, hi))
        duration = lesion = 0.0
        noise = float(rng.normal(0.0, 6.0))
    elif cohort == "ms":
        age = float(lo + (hi - lo) * rng.beta(2.2, 2.2))
        duration = float(min(rng.gamma(2.0, 4.5), max(age - 16.0, 0.5)))
        lesion = float(min(np.exp(np.log(2.5) + 0.05 * duration + rng.normal(0.0, 1.1)), 80.0))
        noise = float(rng.normal(0.0, 10.0))
    else:
        raise ValueError(f"unknown cohort {cohort!r}; use 'healthy' or 'ms'")
    return Subject(
        participant_id=participant_id, cohort=cohort, sex=sex, age=age, gap=gap, duration=duration,
        lesion_ml=lesion, wmh_factor=float(np.exp(rng.normal(0.0, 0.5))), sdmt_noise=noise,
        seed=int(rng.integers(0, 2**63 - 1)),
    )


def scan_state(subject: Subject, years: float = 0.0) -> ScanState:
    """State of ``subject`` ``years`` after the first scan (MS: disease and lesions progress)."""
    age = subject.age + years
    if subject.cohort == "ms":
        duration = subject.duration + years
        lesion = subject.lesion_ml * float(np.exp(0.05 * years))
        # MS atrophy runs ahead of normal ageing: extra biological years per year of disease.
        bio = age + subject.gap + 0.6 * duration
        deep_loss = min(0.006 * duration, 0.3)
        sdmt = (66.0 - 0.25 * (age - 20.0) - 4.5 * np.log1p(lesion) - 0.3 * duration
                - 0.4 * subject.gap + subject.sdmt_noise)
    else:
        duration = lesion = deep_loss = 0.0
        bio = age + subject.gap
        sdmt = 60.0 - 0.3 * (age - 20.0) - 0.5 * subject.gap + subject.sdmt_noise
    sdmt += 1.5 if subject.sex == "F" else 0.0
    wmh = min(0.3 * float(np.exp(0.08 * (bio - 45.0))) * subject.wmh_factor, 30.0)
    return ScanState(age=age, bio_age=bio, duration=duration, lesion_ml=lesion, wmh_ml=wmh,
                     deep_gm_loss=deep_loss, sdmt=float(np.clip(sdmt, *SDMT_RANGE)))
