"""One knob for how different the scanners are: ``site_effect``.

Each scanner parameter of a site is written as the reference scanner (the average of all synthetic sites)
plus that site's published-size deviation; ``site_effect`` multiplies the deviation. 0 makes every site
the reference scanner (only who is scanned still differs), 1 keeps the published differences, 2 doubles
them. Intensity scale is interpolated in log space, since units are ratios. Storage dtype and the
population (age range, size) are not scanner effects and stay as they are.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import numpy as np

from neurofed.data.synth.sites import SITES, SiteProfile

MAX_SITE_EFFECT = 4.0


@lru_cache(maxsize=1)
def reference_scanner() -> dict[str, np.ndarray]:
    """Average scanner parameters over all synthetic sites."""
    profiles = list(SITES.values())

    def mean(attr: str) -> np.ndarray:
        return np.mean([np.atleast_1d(np.asarray(getattr(p, attr), dtype=np.float64)) for p in profiles], axis=0)

    return {
        "contrast": mean("contrast"), "bias_strength": mean("bias_strength"), "noise_sd": mean("noise_sd"),
        "blur_mm": mean("blur_mm"), "fov_mm": mean("fov_mm"), "center_shift_mm": mean("center_shift_mm"),
        "log_scale": np.mean([np.log(p.scale) for p in profiles]),
    }


def scaled_profile(profile: SiteProfile, site_effect: float = 1.0) -> SiteProfile:
    """``profile`` with its scanner differences from the reference multiplied by ``site_effect``."""
    site_effect = float(site_effect)
    if not np.isfinite(site_effect) or not 0.0 <= site_effect <= MAX_SITE_EFFECT:
        raise ValueError(f"site_effect must be within [0, {MAX_SITE_EFFECT:g}] (0 = one scanner, 1 = published "
                         f"differences, 2 = twice them), got {site_effect}")
    if site_effect == 1.0:
        return profile
    ref = reference_scanner()

    def lerp(attr: str) -> np.ndarray:
        own = np.atleast_1d(np.asarray(getattr(profile, attr), dtype=np.float64))
        return ref[attr] + site_effect * (own - ref[attr])

    contrast = lerp("contrast")
    scaled = replace(
        profile,
        contrast=tuple(round(float(c), 6) for c in contrast),
        scale=float(np.exp(ref["log_scale"] + site_effect * (np.log(profile.scale) - ref["log_scale"]))),
        bias_strength=float(lerp("bias_strength")[0]),
        noise_sd=float(lerp("noise_sd")[0]),
        blur_mm=float(lerp("blur_mm")[0]),
        fov_mm=tuple(round(float(f), 3) for f in lerp("fov_mm")),
        center_shift_mm=tuple(round(float(c), 3) for c in lerp("center_shift_mm")),
    )
    problems = []
    if not 0.0 < contrast[0] < contrast[1] < contrast[2]:
        problems.append(f"contrast CSF<GM<WM broken: {scaled.contrast}")
    if scaled.noise_sd < 0 or scaled.bias_strength < 0 or scaled.blur_mm < 0:
        problems.append(f"noise {scaled.noise_sd:.4f}, bias {scaled.bias_strength:.3f}, blur {scaled.blur_mm:.3f}")
    if problems:
        raise ValueError(f"site_effect={site_effect:g} pushes site {profile.name!r} outside valid scanner "
                         f"settings ({'; '.join(problems)}); use a smaller --site-effect")
    return scaled
