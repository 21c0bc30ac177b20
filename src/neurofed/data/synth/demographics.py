"""Who is scanned: age, sex, brain-age gap, MS disease state and the SDMT-like score.

Every latent variable that drives the score is also rendered into the image (biological age through
atrophy and ventricles, lesion load through hypointense blobs, thalamic loss through deep grey matter that
turns into CSF), so an image model can learn what the score depends on. Education is the one driver no
image shows, as in real cohorts. Constants and their sources are listed in ``docs/synthetic_data.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurofed.data.synth import sdmt as score
from neurofed.data.synth.sdmt import SDMT_RANGE  # noqa: F401  (re-exported for existing callers)

GAP_SD = 4.0  # brain-age gap, years

# MS disease model. Lesions: log-normal T1-hypointense load growing ~5 %/yr. Brain: one extra biological
# year per year of disease, i.e. whole-brain atrophy about twice the healthy rate (MS 0.5-1.35 %/yr vs
# 0.1-0.3 %/yr). Thalamus: extra loss of 0.43 %/yr (MS -0.71 %/yr vs healthy -0.28 %/yr, Azevedo et al.
# 2018), starting ~5 years before onset, plus a part shared with lesion load (disconnection) and a part of
# its own.
LESION_MEDIAN_AT_ONSET_ML = 2.5
LESION_GROWTH_PER_YEAR = 0.05
LESION_LOG_SD = 1.1
LESION_MAX_ML = 80.0
MS_EXTRA_BIO_YEARS_PER_YEAR = 1.0
THALAMIC_LOSS_PER_YEAR = 0.0043
THALAMIC_PRE_ONSET_YEARS = 5.0
THALAMIC_PER_LOG_LESION = 0.010
THALAMIC_LOSS_SD = 0.025
THALAMIC_LOSS_MAX = 0.30


@dataclass(frozen=True)
class Subject:
    """Subject-level draws; everything a scan needs is derived from these plus time since baseline."""

    participant_id: str
    cohort: str
    sex: str
    age: float  # at the first scan
    gap: float  # biological minus chronological age, before any MS effect
    duration: float  # MS disease duration at the first scan (0 for healthy)
    lesion_ml: float  # MS lesion load at the first scan (0 for healthy)
    wmh_factor: float  # individual multiplier of age-related WM hypointensities
    sdmt_noise: float
    seed: int  # drives geometry, lesion placement and scanner noise
    thalamic_offset: float = 0.0  # subject's own part of MS thalamic loss (fraction of thalamic GM)
    education: float = 0.0  # education-like z-score; moves SDMT, invisible in the image


@dataclass(frozen=True)
class ScanState:
    """The subject at one session."""

    age: float
    bio_age: float
    duration: float
    lesion_ml: float
    wmh_ml: float
    thalamic_loss: float  # extra fraction of thalamic GM lost to MS (other deep GM loses half of it)
    sdmt: float

    @property
    def deep_gm_loss(self) -> float:
        """Former name of ``thalamic_loss``."""
        return self.thalamic_loss


def draw_subject(rng: np.random.Generator, participant_id: str, cohort: str,
                 age_range: tuple[float, float]) -> Subject:
    """Draw one subject of ``cohort`` ("healthy" or "ms") with ages inside ``age_range``."""
    lo, hi = age_range
    sex = "F" if rng.random() < 0.5 else "M"
    gap = float(rng.normal(0.0, GAP_SD))
    thalamic = education = 0.0
    if cohort == "healthy":
        age = float(rng.uniform(lo, hi))
        duration = lesion = 0.0
        noise = float(rng.normal(0.0, score.HEALTHY_NOISE_SD))
    elif cohort == "ms":
        age = float(lo + (hi - lo) * rng.beta(2.2, 2.2))
        duration = float(min(rng.gamma(2.0, 4.5), max(age - 16.0, 0.5)))
        lesion_z = float(rng.normal(0.0, 1.0))
        lesion = float(min(LESION_MEDIAN_AT_ONSET_ML * np.exp(LESION_GROWTH_PER_YEAR * duration
                                                              + LESION_LOG_SD * lesion_z), LESION_MAX_ML))
        thalamic = THALAMIC_PER_LOG_LESION * LESION_LOG_SD * lesion_z + float(rng.normal(0.0, THALAMIC_LOSS_SD))
        education = float(rng.normal(0.0, 1.0))
        noise = float(rng.normal(0.0, score.MS_RESIDUAL_SD))
    else:
        raise ValueError(f"unknown cohort {cohort!r}; use 'healthy' or 'ms'")
    return Subject(
        participant_id=participant_id, cohort=cohort, sex=sex, age=age, gap=gap, duration=duration,
        lesion_ml=lesion, wmh_factor=float(np.exp(rng.normal(0.0, 0.5))), sdmt_noise=noise,
        seed=int(rng.integers(0, 2**63 - 1)), thalamic_offset=thalamic, education=education,
    )


def thalamic_loss(subject: Subject, duration: float) -> float:
    """MS thalamic GM loss (fraction) at a disease duration; 0 for healthy subjects."""
    if subject.cohort != "ms":
        return 0.0
    loss = THALAMIC_LOSS_PER_YEAR * (duration + THALAMIC_PRE_ONSET_YEARS) + subject.thalamic_offset
    return float(np.clip(loss, 0.0, THALAMIC_LOSS_MAX))


def scan_state(subject: Subject, years: float = 0.0) -> ScanState:
    """State of ``subject`` ``years`` after the first scan (MS: disease and lesions progress)."""
    age = subject.age + years
    if subject.cohort == "ms":
        duration = subject.duration + years
        lesion = subject.lesion_ml * float(np.exp(LESION_GROWTH_PER_YEAR * years))
        atrophy_gap = subject.gap + MS_EXTRA_BIO_YEARS_PER_YEAR * duration
        bio = age + atrophy_gap
        thalamic = thalamic_loss(subject, duration)
        sdmt = score.ms_sdmt(age, float(np.log(max(lesion, 0.01))), thalamic, atrophy_gap, subject.education,
                             subject.sdmt_noise, subject.sex)
    else:
        duration = lesion = thalamic = 0.0
        bio = age + subject.gap
        sdmt = score.healthy_sdmt(age, subject.gap, subject.sdmt_noise, subject.sex)
    wmh = min(0.3 * float(np.exp(0.08 * (bio - 45.0))) * subject.wmh_factor, 30.0)
    return ScanState(age=age, bio_age=bio, duration=duration, lesion_ml=lesion, wmh_ml=wmh,
                     thalamic_loss=thalamic, sdmt=sdmt)


def ms_latents(states: list[ScanState], subjects: list[Subject]) -> dict[str, np.ndarray]:
    """The SDMT drivers of MS scans as arrays (the calibration and the oracle use these)."""
    return {
        "age": np.array([s.age for s in states]),
        "log_lesion": np.log(np.array([s.lesion_ml for s in states])),
        "thalamic_loss": np.array([s.thalamic_loss for s in states]),
        "atrophy_gap": np.array([s.bio_age - s.age for s in states]),
        "education": np.array([p.education for p in subjects]),
    }
