"""--site-effect scales the scanner differences between sites: 0 one scanner, 2 twice the published ones."""

import numpy as np
import pytest

from neurofed.data.synth import get_site
from neurofed.data.synth.demographics import draw_subject
from neurofed.data.synth.generate import synthesize_scan
from neurofed.data.synth.site_effect import scaled_profile

RES = 4.0
SITES = ("ixi", "sald", "camcan", "prague")


def _intensity_stats(image: np.ndarray) -> np.ndarray:
    """Brain intensity quantiles relative to the 99th percentile: what normalisation leaves of a scanner."""
    x = image.astype(np.float64)
    top = np.percentile(x, 99)
    brain = x[x > 0.15 * top]
    return np.percentile(brain, [10, 25, 50, 75, 90]) / top


def _spread(site_effect: float) -> float:
    subject = draw_subject(np.random.default_rng(5), "sub-1", "healthy", (20.0, 80.0))
    stats = [_intensity_stats(synthesize_scan(subject, 0.0, 0, scaled_profile(get_site(s), site_effect), RES)[0])
             for s in SITES]
    return float(np.std(np.stack(stats), axis=0).sum())


def test_site_effect_orders_the_between_site_spread():
    zero, one, two = _spread(0.0), _spread(1.0), _spread(2.0)
    assert zero < 0.5 * one
    assert two > 1.3 * one


def test_zero_makes_one_scanner_and_one_keeps_the_profile():
    ixi, sald = scaled_profile(get_site("ixi"), 0.0), scaled_profile(get_site("sald"), 0.0)
    for attr in ("contrast", "noise_sd", "bias_strength", "blur_mm", "fov_mm", "center_shift_mm"):
        assert getattr(ixi, attr) == pytest.approx(getattr(sald, attr)), attr
    assert ixi.scale == pytest.approx(sald.scale)
    assert scaled_profile(get_site("ixi"), 1.0) == get_site("ixi")
    assert ixi.age_range == get_site("ixi").age_range and ixi.reference_size == get_site("ixi").reference_size


@pytest.mark.parametrize("bad", [-0.5, 99.0, float("nan")])
def test_bad_site_effect_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="site_effect must be within"):
        scaled_profile(get_site("ixi"), bad)
