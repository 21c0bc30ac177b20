"""Subject anatomy: ageing of the tissue maps and one composed geometric warp.

All geometric effects (head scale, rotation, translation, elastic warp, ventricle enlargement) are composed
into a single sampling grid and applied once per tissue map with linear interpolation: resampling a map
several times would both blur it and cost several times as much.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from neurofed.data.synth.template import Template

BRAIN_CENTER_MM = np.array([0.0, -18.0, 12.0], dtype=np.float32)
TEMPLATE_AGE = 25.0  # the ICBM152 2009 template averages young adults
VENTRICLE_GROWTH_20_90 = 2.6  # ventricle volume ratio between age 20 and 90
VENTRICLE_GAIN = 2.7  # the Gaussian bulge magnifies less than its peak; calibrated on the template
GM_LOSS_PER_YEAR = 0.0035  # fraction of cortical GM per year after 30
DEEP_GM_AGEING = 0.8  # healthy thalamus -0.28 %/yr (Azevedo et al. 2018) vs cortex -0.35 %/yr
ELASTIC_SD_MM = 1.5
ELASTIC_GRID = (5, 6, 5)


@dataclass(frozen=True)
class Geometry:
    """Per-scan pose and per-subject shape of the head."""

    scale: float
    angles_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    elastic: np.ndarray  # [3, *ELASTIC_GRID] displacement control points, mm


def draw_shape(rng: np.random.Generator, sex: str) -> tuple[float, np.ndarray]:
    """Subject-fixed head scale (±5 %, males slightly larger) and elastic control points."""
    scale = float(rng.uniform(0.95, 1.05)) * (1.02 if sex == "M" else 0.98)
    elastic = rng.normal(0.0, ELASTIC_SD_MM, size=(3, *ELASTIC_GRID)).astype(np.float32)
    return scale, elastic


def draw_pose(rng: np.random.Generator) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-scan head position in the scanner: rotation within ±5°, translation within ±4 mm."""
    return tuple(rng.uniform(-5, 5, 3).tolist()), tuple(rng.uniform(-4, 4, 3).tolist())


def rotation_matrix(angles_deg: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def ventricle_bulge(bio_age: float) -> float:
    """Peak radial magnification term ``a`` of the bulge for a biological age (negative shrinks)."""
    ratio = VENTRICLE_GROWTH_20_90 ** ((bio_age - TEMPLATE_AGE) / 70.0)
    a = VENTRICLE_GAIN * (1.0 - ratio ** (-1.0 / 3.0))
    return float(np.clip(a, -0.6, 0.85))


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] weights of linear interpolation from n_in control points spanning the axis."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    return np.stack([np.interp(pos, np.arange(n_in), np.eye(n_in)[j]) for j in range(n_in)], axis=1)


def upsample_linear(control: np.ndarray, out_shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear upsampling of [C, a, b, c] control points as three small matrix products.

    Separable contraction costs a few milliseconds where ``ndimage.zoom`` takes tens per component.
    """
    wx, wy, wz = (_interp_matrix(n, m).astype(np.float32) for n, m in zip(out_shape, control.shape[1:]))
    result = np.empty((control.shape[0], *out_shape), dtype=np.float32)
    for c in range(control.shape[0]):
        part = np.matmul(wy, control[c].astype(np.float32) @ wz.T)  # [a, y, z]
        result[c] = (wx @ part.reshape(part.shape[0], -1)).reshape(out_shape)
    return result


def sampling_grid(template: Template, out_shape: tuple[int, int, int], out_affine: np.ndarray,
                  geometry: Geometry, bio_age: float) -> np.ndarray:
    """Template voxel coordinates [3, *out_shape] to sample for every output voxel."""
    rot = rotation_matrix(geometry.angles_deg)
    # output world x -> template world p = R^T (x - c - t) / s + c, evaluated with broadcasting.
    inv = (rot.T / geometry.scale).astype(np.float32)
    shift = (BRAIN_CENTER_MM + np.asarray(geometry.translation_mm, np.float32)).astype(np.float32)
    ijk = [np.arange(n, dtype=np.float32) for n in out_shape]
    elastic = upsample_linear(geometry.elastic, out_shape)
    shapes = [(-1, 1, 1), (1, -1, 1), (1, 1, -1)]
    p = elastic  # [3, *out_shape], updated in place
    lin = inv.astype(np.float64) @ out_affine[:3, :3]
    for c in range(3):
        const = BRAIN_CENTER_MM[c] + float(inv[c] @ (out_affine[:3, 3] - shift))
        # the affine part is separable per output axis: three broadcast adds
        p[c] += (np.float32(lin[c, 0]) * ijk[0] + np.float32(const)).reshape(shapes[0])
        p[c] += (np.float32(lin[c, 1]) * ijk[1]).reshape(shapes[1])
        p[c] += (np.float32(lin[c, 2]) * ijk[2]).reshape(shapes[2])
    a = ventricle_bulge(bio_age)
    if a != 0.0:
        centre = template.ventricle_center[:, None, None, None]
        p -= centre
        r2 = np.zeros(out_shape, dtype=np.float32)
        for c in range(3):
            r2 += np.square(p[c] * np.float32(1.0 / template.ventricle_sigma[c]))
        r2 *= np.float32(-0.5)
        factor = np.exp(r2, out=r2)
        factor *= np.float32(-a)
        factor += np.float32(1.0)
        p *= factor
        p += centre
    for c in range(3):
        p[c] -= np.float32(template.affine[c, 3])
        p[c] *= np.float32(1.0 / template.affine[c, c])
    return p


def aged_tissue(template: Template, bio_age: float, thalamic_loss: float,
                lesion: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GM, WM, CSF maps after atrophy (GM turns into CSF) and lesions (tissue turns hypointense).

    ``thalamic_loss`` is the MS-specific fraction of thalamic GM lost, placed by
    ``template.thalamic_weight`` so that it shows as a wider third ventricle and a darker thalamic rim.
    Lesion tissue is split between the GM and CSF channels so that its T1 signal lies between them.
    """
    gm, wm, csf = template.gm, template.wm, template.csf
    cortical_loss = GM_LOSS_PER_YEAR * max(bio_age - 30.0, 0.0)
    loss = np.where(template.deep_gm, DEEP_GM_AGEING * cortical_loss + thalamic_loss * template.thalamic_weight,
                    cortical_loss * template.ribbon)
    lost = gm * np.clip(loss, 0.0, 0.95).astype(np.float32)
    gm = gm - lost
    csf = csf + lost
    if lesion is not None:
        keep = 1.0 - lesion
        tissue = (gm + wm + csf) * lesion
        gm = gm * keep + 0.55 * tissue
        wm = wm * keep
        csf = csf * keep + 0.45 * tissue
    return gm, wm, csf


def warp(maps: tuple[np.ndarray, ...], coords: np.ndarray) -> list[np.ndarray]:
    """Sample every map at ``coords`` with linear interpolation; outside the template is empty.

    Only the bounding box of output voxels that land inside the (brain-cropped) template is
    interpolated, which skips the empty part of the field of view.
    """
    inside = np.ones(coords.shape[1:], dtype=bool)
    for c, n in enumerate(maps[0].shape):
        inside &= (coords[c] > -1.0) & (coords[c] < n)
    box = []
    for axis in range(3):
        hit = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        if len(hit) == 0:
            return [np.zeros(coords.shape[1:], dtype=np.float32) for _ in maps]
        box.append(slice(hit[0], hit[-1] + 1))
    box = tuple(box)
    points = coords[(slice(None), *box)]
    out = []
    for m in maps:
        full = np.zeros(coords.shape[1:], dtype=np.float32)
        full[box] = ndimage.map_coordinates(m, points, order=1, mode="constant", cval=0.0, prefilter=False)
        out.append(full)
    return out
