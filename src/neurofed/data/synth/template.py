"""Tissue maps of the MNI ICBM152 2009 template that nilearn ships inside its package.

No cohort can be downloaded in every environment, but nilearn always carries this template, so anatomy is
built from it. Loading and resampling takes seconds, so the result is cached per resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

# Lateral ventricles live inside this MNI box (mm); CSF there is treated as ventricular.
VENTRICLE_BOX = ((-30.0, 30.0), (-45.0, 25.0), (0.0, 35.0))
# Deep grey matter (thalamus, basal ganglia) lives inside this box.
DEEP_GM_BOX = ((-32.0, 32.0), (-40.0, 22.0), (-12.0, 22.0))
# The thalami (MNI mm), both sides of the third ventricle; MS thalamic atrophy is rendered here.
THALAMUS_BOX = ((-22.0, 22.0), (-36.0, -4.0), (-4.0, 18.0))


@dataclass(frozen=True)
class Template:
    """Template tissue probabilities (float32, template grid) plus regions used by the ageing recipe."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    affine: np.ndarray
    resolution: float
    ventricle_center: np.ndarray  # mm
    ventricle_sigma: np.ndarray  # mm, spread of the ventricle region per axis
    deep_gm: np.ndarray  # bool mask
    thalamic_weight: np.ndarray  # float32 over deep GM: 1 = thalamic loss rate, 0.5 elsewhere (see below)
    ribbon: np.ndarray  # float32, where cortical thinning removes GM (mean 1 over GM, high next to CSF)
    periventricular: np.ndarray  # int voxel indices [n, 3] of WM next to the ventricles
    juxtacortical: np.ndarray  # WM touching cortex
    deep_wm: np.ndarray  # remaining WM


def _world_grid(shape: tuple[int, ...], affine: np.ndarray) -> list[np.ndarray]:
    """World coordinates per axis, broadcastable (the template affine is axis-aligned)."""
    axes = []
    for a in range(3):
        v = np.arange(shape[a], dtype=np.float32) * affine[a, a] + affine[a, 3]
        s = [1, 1, 1]
        s[a] = -1
        axes.append(v.reshape(s))
    return axes


def _in_box(axes: list[np.ndarray], box) -> np.ndarray:
    m = np.ones((1, 1, 1), dtype=bool)
    for a, (lo, hi) in enumerate(box):
        m = m & (axes[a] > lo) & (axes[a] < hi)
    return m


def _thalamic_weight(gm: np.ndarray, csf: np.ndarray, deep_gm: np.ndarray, thalamus_box: np.ndarray,
                     ventricles: np.ndarray, resolution: float) -> np.ndarray:
    """Where MS deep-GM loss falls: the thalamus, most next to the ventricles.

    A shrinking thalamus shows on T1w as a wider third ventricle and a thinner thalamic rim, so the loss is
    weighted by nearby ventricular CSF (as cortical thinning is weighted by sulcal CSF). The weights average
    1 over thalamic GM, so a loss fraction f removes f of its GM volume; other deep GM (basal ganglia)
    loses half that fraction, uniformly.
    """
    thalamus = deep_gm & thalamus_box
    near = ndimage.gaussian_filter((ventricles | ((csf > 0.5) & thalamus_box)).astype(np.float32),
                                   4.0 / resolution)
    weight = np.where(deep_gm, 0.5, 0.0).astype(np.float32)
    if thalamus.any():
        t = 0.25 + near[thalamus]
        weight[thalamus] = t / max(float((gm[thalamus] * t).sum() / gm[thalamus].sum()), 1e-6)
    return weight


@lru_cache(maxsize=4)
def load_template(resolution: float = 2.0) -> Template:
    """Load GM/WM/CSF probabilities at ``resolution`` mm (1 and 2 from nilearn, others via zoom)."""
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_wm_template,
    )

    resolution = float(resolution)
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    base = 1 if resolution < 2 else 2
    gm_img = load_mni152_gm_template(resolution=base)
    affine = gm_img.affine.copy()
    gm = np.asarray(gm_img.get_fdata(dtype=np.float32))
    wm = np.asarray(load_mni152_wm_template(resolution=base).get_fdata(dtype=np.float32))
    mask = np.asarray(load_mni152_brain_mask(resolution=base).get_fdata(dtype=np.float32))
    if resolution != base:
        in_shape = np.array(gm.shape)
        factor = base / resolution
        gm, wm, mask = (ndimage.zoom(x, factor, order=1, prefilter=False) for x in (gm, wm, mask))
        # zoom maps first and last voxel centres onto each other, so the true spacing per axis is this:
        spacing = base * (in_shape - 1) / (np.array(gm.shape) - 1)
        affine = affine.copy()
        affine[:3, :3] = np.diag(spacing)
    gm = np.clip(gm, 0, 1)
    wm = np.clip(wm, 0, 1)
    csf = np.clip(mask - gm - wm, 0, 1).astype(np.float32)
    # Crop to the brain (plus a margin): every per-subject operation then touches half as many voxels.
    inside = np.argwhere((gm + wm + csf) > 0)
    lo = np.maximum(inside.min(0) - 2, 0)
    hi = np.minimum(inside.max(0) + 3, gm.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    gm, wm, csf = (np.ascontiguousarray(x[crop]) for x in (gm, wm, csf))
    affine = affine.copy()
    affine[:3, 3] = affine[:3, 3] + np.diag(affine)[:3] * lo
    axes = _world_grid(gm.shape, affine)

    vent = (csf > 0.5) & _in_box(axes, VENTRICLE_BOX)
    idx = np.argwhere(vent)
    if len(idx) < 4:
        raise RuntimeError(f"template at {resolution} mm has no ventricle region; use a finer resolution")
    xyz = idx * np.diag(affine)[:3] + affine[:3, 3]
    center = xyz.mean(0)
    sigma = xyz.std(0) * 1.6 + 2 * resolution

    deep_gm = (gm > 0.3) & _in_box(axes, DEEP_GM_BOX)
    thalamic_weight = _thalamic_weight(gm, csf, deep_gm, _in_box(axes, THALAMUS_BOX), vent, resolution)
    # Cortex thins from its CSF side: weight GM loss by nearby CSF, normalised to mean 1 over GM.
    ribbon = ndimage.gaussian_filter(csf, 1.5 / resolution)
    ribbon = (ribbon / max(float((gm * ribbon).sum() / gm.sum()), 1e-6)).astype(np.float32)
    wm_core = wm > 0.6
    near_vent = ndimage.binary_dilation(vent, iterations=max(1, int(round(6 / resolution))))
    peri = wm_core & near_vent
    juxta = (wm > 0.5) & ndimage.binary_dilation(gm > 0.5, iterations=1) & ~_in_box(axes, DEEP_GM_BOX)
    deep = (wm > 0.8) & ~peri & ~juxta
    return Template(
        gm=gm, wm=wm, csf=csf, affine=affine, resolution=resolution,
        ventricle_center=center.astype(np.float32), ventricle_sigma=sigma.astype(np.float32),
        deep_gm=deep_gm, thalamic_weight=thalamic_weight, ribbon=ribbon, periventricular=np.argwhere(peri), juxtacortical=np.argwhere(juxta),
        deep_wm=np.argwhere(deep),
    )
