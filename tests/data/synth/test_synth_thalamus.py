"""Thalamic atrophy is rendered in the image, not only recorded as a number."""

from dataclasses import replace

import numpy as np

from neurofed.data.synth import get_site
from neurofed.data.synth.demographics import draw_subject
from neurofed.data.synth.generate import synthesize_scan
from neurofed.data.synth.template import THALAMUS_BOX

RES = 4.0


def _thalamus_stats(image: np.ndarray, affine: np.ndarray, wm_level: float) -> tuple[float, int]:
    """Mean intensity and count of tissue-bright voxels in the thalamic box (world mm)."""
    ijk = np.indices(image.shape).reshape(3, -1)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    inside = np.ones(xyz.shape[1], dtype=bool)
    for axis, (lo, hi) in enumerate(THALAMUS_BOX):
        inside &= (xyz[axis] > lo) & (xyz[axis] < hi)
    values = image.reshape(-1)[inside].astype(float)
    return float(values.mean()), int((values > 0.55 * wm_level).sum())


def test_thalamic_atrophy_darkens_and_shrinks_the_thalamus():
    subject = draw_subject(np.random.default_rng(4), "sub-1", "ms", (20.0, 65.0))
    subject = replace(subject, lesion_ml=0.5, duration=0.0)
    profile = replace(get_site("prague"), noise_sd=0.0)  # isolate anatomy from scanner noise
    means, counts = [], []
    reference = None
    for offset in (-0.0215, 0.08, 0.18):  # total thalamic loss ~0, ~0.1, ~0.2
        image, affine = synthesize_scan(replace(subject, thalamic_offset=offset), 0.0, 0, profile, RES)
        if reference is None:
            reference = float(np.percentile(image, 99.5))
        mean, count = _thalamus_stats(image, affine, reference)
        means.append(mean)
        counts.append(count)
    assert means[0] > means[1] > means[2]
    assert (means[0] - means[2]) / means[0] > 0.02
    assert counts[0] >= counts[1] >= counts[2] and counts[0] > counts[2]
