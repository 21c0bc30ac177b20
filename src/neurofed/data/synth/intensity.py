"""From tissue maps to a scanner image: site contrast, bias field, blur, Rician noise, intensity scale.

These are the nuisance factors that differ between real scanners; a model trained across sites has to
become invariant to them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from neurofed.data.synth.sites import SiteProfile


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    """Smooth multiplicative field: exp of a random second-order polynomial over the field of view."""
    u = [np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)])
         for i, n in enumerate(shape)]
    coef = rng.normal(0.0, 1.0, size=9).astype(np.float32)
    poly = (coef[0] * u[0] + coef[1] * u[1] + coef[2] * u[2]
            + coef[3] * (u[0] ** 2 - 0.33) + coef[4] * (u[1] ** 2 - 0.33) + coef[5] * (u[2] ** 2 - 0.33))
    poly = poly + coef[6] * u[0] * u[1] + coef[7] * u[1] * u[2] + coef[8] * u[0] * u[2]
    return np.exp((0.5 * strength) * poly).astype(np.float32)


def render(gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, profile: SiteProfile,
           rng: np.random.Generator, resolution: float) -> np.ndarray:
    """Image in the site's intensity units (float32), background included."""
    c_csf, c_gm, c_wm = profile.contrast
    image = c_csf * csf + c_gm * gm + c_wm * wm
    image *= bias_field(rng, image.shape, profile.bias_strength)
    sigma = profile.blur_mm / resolution
    if sigma >= 0.25:
        image = ndimage.gaussian_filter(image, sigma, truncate=3.0)
    sd = np.float32(profile.noise_sd * c_wm)
    real = image + sd * rng.standard_normal(image.shape, dtype=np.float32)
    imag = sd * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(real * real + imag * imag)
    return image * np.float32(profile.scale)


def to_dtype(image: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "int16":
        return np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
    return image.astype(np.float32)
