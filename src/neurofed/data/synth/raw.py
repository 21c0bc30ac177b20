"""Raw-like synthetic scans: head and neck around the brain, native pose, off-centre field of view.

The default synthetic scans are skull-free and within a few millimetres of MNI152, as a registered,
brain-extracted scan would be. A hospital's raw T1w is not: the head sits in the scanner with its own
rotation (±15° here) and offset (±20 mm), the field of view is centred on the head and neck rather than on
the brain, and skull, scalp fat and neck muscle carry most of the signal outside the brain. These scans
exercise ``registration: affine`` and the input QC; the true template-to-scan transform of every scan is
written to ``sourcedata/transforms.tsv`` (not read by training), so registration accuracy can be measured.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from neurofed.data.synth import anatomy, intensity
from neurofed.data.synth.demographics import Subject, scan_state
from neurofed.data.synth.sites import SiteProfile

MAX_ROTATION_DEG = 15.0
MAX_TRANSLATION_MM = 20.0
RAW_FOV_MM = (220.0, 256.0, 256.0)
FOV_CENTRE_MM = np.array([0.0, -10.0, -28.0])  # head and neck framing: below the brain centre
FOV_JITTER_MM = 8.0
# Head layers outside the brain mask (mm from its surface) and their tissue class in the renderer.
SKULL_MM, SCALP_MM = (3.0, 9.0), (9.0, 15.0)
TRANSFORM_COLUMNS = ("path", "scale", "rot_x_deg", "rot_y_deg", "rot_z_deg", "tx_mm", "ty_mm", "tz_mm",
                     "template_to_scan")


@lru_cache(maxsize=2)
def head_maps(resolution: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Skull, scalp (fat) and neck-muscle maps in MNI space, on a box that holds head and neck."""
    from nilearn.datasets import load_mni152_brain_mask

    img = load_mni152_brain_mask(resolution=1 if resolution < 2 else 2)
    step = float(img.affine[0, 0])
    lo, hi = np.array([-110.0, -150.0, -200.0]), np.array([110.0, 120.0, 120.0])
    shape = tuple(int(n) for n in np.ceil((hi - lo) / step) + 1)
    affine = np.diag([step, step, step, 1.0])
    affine[:3, 3] = lo
    brain = np.zeros(shape, dtype=bool)
    mask = np.asarray(img.get_fdata()) > 0.5
    off = np.round((img.affine[:3, 3] - lo) / step).astype(int)
    brain[tuple(slice(o, o + n) for o, n in zip(off, mask.shape))] = mask
    x, y, z = (lo[a] + step * np.arange(shape[a]).reshape([-1 if i == a else 1 for i in range(3)])
               for a in range(3))
    # Neck: an elliptic cylinder below the cerebellum, joined to the head.
    neck = (((x / 52.0) ** 2 + ((y + 22.0) / 58.0) ** 2) < 1.0) & (z < -35.0)
    inside = brain | neck
    depth = ndimage.distance_transform_edt(~inside, sampling=step)
    skull = (depth > SKULL_MM[0]) & (depth <= SKULL_MM[1]) & ~neck
    scalp = (depth > SCALP_MM[0]) & (depth <= SCALP_MM[1])
    muscle = neck & ~brain
    return (*(ndimage.gaussian_filter(m.astype(np.float32), 0.5) for m in (skull, scalp, muscle)), affine)


def draw_raw_pose(rng: np.random.Generator) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """Rotation (±15°), translation (±20 mm) and field-of-view offset (±8 mm) of one raw scan."""
    angles = tuple(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3).tolist())
    shift = tuple(rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, 3).tolist())
    return angles, shift, rng.uniform(-FOV_JITTER_MM, FOV_JITTER_MM, 3)


def template_to_scan(scale: float, angles: tuple[float, ...], translation: tuple[float, ...]) -> np.ndarray:
    """4x4 world map MNI -> scanner mm of a pose: x = s R (p - c) + c + t (as ``anatomy.sampling_grid``)."""
    centre = anatomy.BRAIN_CENTER_MM.astype(np.float64)
    out = np.eye(4)
    out[:3, :3] = scale * anatomy.rotation_matrix(angles)
    out[:3, 3] = centre + np.asarray(translation) - out[:3, :3] @ centre
    return out


def raw_grid(resolution: float, offset: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
    shape = tuple(int(round(f / resolution)) for f in RAW_FOV_MM)
    affine = np.diag([resolution] * 3 + [1.0])
    affine[:3, 3] = FOV_CENTRE_MM + offset - resolution * (np.array(shape) - 1) / 2
    return shape, affine


def synthesize_raw_scan(subject: Subject, years: float, session_index: int, profile: SiteProfile,
                        resolution: float, template) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """Image data, affine and true pose of a raw-like scan of ``subject`` (same anatomy as the default)."""
    state = scan_state(subject, years)
    scale, elastic = anatomy.draw_shape(np.random.default_rng([subject.seed, 0]), subject.sex)
    scan_rng = np.random.default_rng([subject.seed, 1, session_index])
    angles, translation, fov_offset = draw_raw_pose(np.random.default_rng([subject.seed, 3, session_index]))
    geometry = anatomy.Geometry(scale, angles, translation, elastic)
    gm, wm, csf = anatomy.aged_tissue(template, state.bio_age, state.thalamic_loss, None)
    shape, affine = raw_grid(resolution, fov_offset)
    coords = anatomy.sampling_grid(template, shape, affine, geometry, state.bio_age)
    gm, wm, csf = anatomy.warp((gm, wm, csf), coords)
    *layers, head_affine = head_maps(resolution)
    forward = template_to_scan(scale, angles, translation)
    to_head = np.linalg.inv(head_affine) @ np.linalg.inv(forward) @ affine
    skull, scalp, muscle = (ndimage.affine_transform(m, to_head[:3, :3], to_head[:3, 3], output_shape=shape,
                                                     order=1, mode="constant", prefilter=False)
                            for m in layers)
    free = np.clip(1.0 - gm - wm - csf, 0.0, 1.0)
    # Scalp fat is about as bright as WM on T1w, muscle a little darker than GM, bone nearly black.
    wm = wm + 0.9 * scalp * free
    gm = gm + 0.85 * muscle * free
    csf = csf + 0.15 * skull * free
    image = intensity.render(gm, wm, csf, profile, scan_rng, resolution)
    pose = {"scale": scale, "angles": angles, "translation": translation, "template_to_scan": forward}
    return intensity.to_dtype(image, profile.dtype), affine, pose


def transform_row(path: str, pose: dict[str, object]) -> dict[str, str]:
    """One row of ``sourcedata/transforms.tsv``; the matrix is row-major, 16 numbers."""
    angles, shift = pose["angles"], pose["translation"]
    matrix = " ".join(f"{v:.6f}" for v in np.asarray(pose["template_to_scan"]).ravel())
    values = [f"{pose['scale']:.6f}", *(f"{a:.4f}" for a in angles), *(f"{t:.4f}" for t in shift), matrix]
    return dict(zip(TRANSFORM_COLUMNS, [path, *values]))


def read_transforms(site_dir) -> dict[str, np.ndarray]:
    """``{relative scan path: 4x4 template-to-scan matrix}`` from a raw site's ``sourcedata``."""
    import csv
    from pathlib import Path

    with (Path(site_dir) / "sourcedata" / "transforms.tsv").open() as f:
        return {row["path"]: np.array(row["template_to_scan"].split(), dtype=float).reshape(4, 4)
                for row in csv.DictReader(f, delimiter="\t")}
