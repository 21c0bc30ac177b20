"""Focal T1-hypointense lesions rendered as soft blobs in template space.

Both age-related WM hypointensities and MS lesions are placed at subject-fixed positions (drawn from the
subject's seed) so that a follow-up scan shows the same lesions, grown with the new load.
"""

from __future__ import annotations

import numpy as np

from neurofed.data.synth.template import Template

_GAUSS_VOLUME = (2 * np.pi) ** 1.5  # integral of exp(-r^2 / 2 s^2) is this times s^3

# (region, share) per lesion kind: MS lesions are mostly periventricular and juxtacortical.
_LAYOUT = {
    "wmh": (("periventricular", 0.5), ("deep_wm", 0.5)),
    "ms": (("periventricular", 0.55), ("juxtacortical", 0.30), ("deep_wm", 0.15)),
}
_MEAN_BLOB_ML = {"wmh": 0.15, "ms": 0.6}


def lesion_layout(rng: np.random.Generator, template: Template, kind: str, load_ml: float,
                  max_blobs: int = 60) -> list[tuple[np.ndarray, float]]:
    """Blob centres (template voxel indices) and each blob's share of the load (shares sum to 1)."""
    if load_ml <= 0:
        return []
    n = int(np.clip(np.ceil(load_ml / _MEAN_BLOB_ML[kind]), 1, max_blobs))
    shares = rng.dirichlet(np.full(n, 1.5))
    regions = [name for name, _ in _LAYOUT[kind]]
    probs = np.array([p for _, p in _LAYOUT[kind]])
    picks = rng.choice(len(regions), size=n, p=probs / probs.sum())
    blobs = []
    for share, pick in zip(shares, picks):
        candidates = getattr(template, regions[pick])
        if len(candidates) == 0:
            candidates = template.deep_wm
        centre = candidates[rng.integers(len(candidates))]
        blobs.append((centre, float(share)))
    return blobs


def render_lesions(shape: tuple[int, ...], spacing: np.ndarray,
                   blobs: list[tuple[np.ndarray, float]], load_ml: float,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Lesion fraction map in [0, 1]: each blob is a unit-height Gaussian holding its share of ``load_ml``."""
    lesion = np.zeros(shape, dtype=np.float32) if out is None else out
    for centre, share in blobs:
        vol_mm3 = share * load_ml * 1000.0
        if vol_mm3 <= 0:
            continue
        s_vox = (vol_mm3 / _GAUSS_VOLUME) ** (1 / 3) / spacing
        radius = np.ceil(3 * s_vox).astype(int)
        lo = np.maximum(centre - radius, 0)
        hi = np.minimum(centre + radius + 1, shape)
        if np.any(hi <= lo):
            continue
        axes = [((np.arange(lo[a], hi[a]) - centre[a]) / s_vox[a]) ** 2 for a in range(3)]
        r2 = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
        blob = np.exp(-0.5 * r2).astype(np.float32)
        win = lesion[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        win += blob * (1.0 - win)  # union of overlapping blobs stays within [0, 1]
    return lesion
