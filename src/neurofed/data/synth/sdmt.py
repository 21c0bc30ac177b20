"""The SDMT-like score: what drives it, with weights calibrated from published MS correlations.

Why a separate module: the score is the label of the SDMT task, so its recipe must be easy to audit. Every
constant here is listed with its source in ``docs/synthetic_data.md``. The MS weights were *derived*, not
tuned: the published marginal correlations of SDMT with each image-visible driver (``MS_TARGET_R``) were
turned into regression weights with the drivers' own correlation matrix (``calibrate_ms_weights``), once, on
a large draw of latent variables. Whatever a model then reaches on the images is reported, not steered.
"""

from __future__ import annotations

import numpy as np

SDMT_RANGE = (0.0, 110.0)

# Healthy adults: ~60 correct at age 20, falling ~0.3 a year (oral SDMT norms), lower with an older-looking
# brain, residual SD ~6 (unchanged from the original recipe).
HEALTHY_AT_20 = 60.0
HEALTHY_SLOPE = -0.3
HEALTHY_GAP_WEIGHT = -0.5
HEALTHY_NOISE_SD = 6.0

# MS cohort: mean ~50, SD ~12 (Benedict et al. 2017, Mult Scler 23:721, cohorts summarised there).
MS_MEAN = 50.0
MS_SD = 12.0
# Published marginal correlations of SDMT with each driver in MS cohorts (see docs/synthetic_data.md).
MS_TARGET_R = {
    "age": -0.25,  # ageing as in healthy norms (-0.3/yr x age SD ~9.5 / 12 = -0.24)
    "log_lesion": -0.45,  # T1/T2 lesion volume, r ~ -0.4 to -0.5
    "thalamic_loss": -0.55,  # thalamic volume, r ~ +0.5 to +0.6 (loss has the opposite sign)
    "atrophy_gap": -0.35,  # whole-brain atrophy / brain-age gap, r ~ -0.3 to -0.4
}
MS_EDUCATION_R = 0.25  # years of education / premorbid IQ, r ~ +0.2 to +0.3; not visible in an image
FEMALE_BONUS = 1.5  # women score slightly higher on SDMT norms

# Weights per unit of each driver and the cohort means they are centred on, from
# ``calibrate_ms_weights(seed=0, n=200_000)`` with the latent model of demographics.py. A test recomputes
# them and checks these constants still match.
MS_WEIGHTS = {"age": -0.270, "log_lesion": -2.719, "thalamic_loss": -127.9, "atrophy_gap": -0.124}
MS_CENTRES = {"age": 42.47, "log_lesion": 1.345, "thalamic_loss": 0.0592, "atrophy_gap": 8.63}
# Left over after the drivers (R^2 0.404), education (0.25^2) and sex (0.75^2 points^2):
# sqrt(12^2 * (1 - 0.404 - 0.0625) - 0.75^2).
MS_RESIDUAL_SD = 8.73


def healthy_sdmt(age: float, gap: float, noise: float, sex: str) -> float:
    score = HEALTHY_AT_20 + HEALTHY_SLOPE * (age - 20.0) + HEALTHY_GAP_WEIGHT * gap + noise
    return _finish(score, sex)


def ms_sdmt(age: float, log_lesion: float, thalamic_loss: float, atrophy_gap: float, education: float,
            noise: float, sex: str) -> float:
    """Score from the image-visible drivers plus education (z-score) and residual noise (points)."""
    drivers = {"age": age, "log_lesion": log_lesion, "thalamic_loss": thalamic_loss, "atrophy_gap": atrophy_gap}
    score = MS_MEAN + sum(MS_WEIGHTS[k] * (v - MS_CENTRES[k]) for k, v in drivers.items())
    score += MS_EDUCATION_R * MS_SD * education + noise
    return _finish(score - FEMALE_BONUS / 2, sex)


def _finish(score: float, sex: str) -> float:
    score += FEMALE_BONUS if sex == "F" else 0.0
    return float(np.clip(score, *SDMT_RANGE))


def calibrate_ms_weights(latents: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, float], float]:
    """Weights, centres and explained variance that give ``MS_TARGET_R`` for these drawn latents.

    With standardised drivers z and correlation matrix C, a score s = sum(b_k z_k) + noise has
    corr(s, z_j) = (C b)_j when var(s) = 1, so b = C^-1 r. Rescaled to SDMT points (SD ``MS_SD``).
    """
    keys = list(MS_TARGET_R)
    x = np.stack([np.asarray(latents[k], dtype=np.float64) for k in keys], axis=1)
    corr = np.corrcoef(x.T)
    target = np.array([MS_TARGET_R[k] for k in keys])
    beta = np.linalg.solve(corr, target)
    explained = float(target @ beta)
    if explained + MS_EDUCATION_R**2 >= 1.0 or np.any(np.sign(beta) != np.sign(target)):
        raise ValueError(f"target correlations {MS_TARGET_R} are inconsistent with the latent model "
                         f"(explained variance {explained:.2f}, weights {beta.round(3).tolist()}); "
                         "revise MS_TARGET_R or the latent model in demographics.py")
    sd = x.std(axis=0)
    weights = {k: float(b * MS_SD / s) for k, b, s in zip(keys, beta, sd)}
    centres = {k: float(v) for k, v in zip(keys, x.mean(axis=0))}
    return weights, centres, explained
