"""Hand-made image features of MS damage, computed on what the SDMT models see: the floor a CNN must beat.

A baseline that does not detect what the generator draws is no floor. The synthetic MS brains
(``neurofed.data.synth``) carry three kinds of damage, each with its own footprint in a T1w image:

- **lesions**: soft blobs of T1-hypointense tissue (about half-way between grey matter and CSF), mostly
  periventricular and juxtacortical white matter (``lesions.py``);
- **thalamic loss**: thalamic grey matter turned into CSF, most next to the ventricles: a wider third ventricle and
  a darker thalamus (``anatomy.aged_tissue``, ``template.thalamic_weight``); other deep grey matter loses half as
  much, so the thalamus darkens *relative to* the basal ganglia;
- **atrophy** (a biological age above the calendar one): larger ventricles and thinner cortex.

The features are read from the preprocessed input of the models (the datamodule's cache: 4 mm, z-scored) and
the MNI152 template's tissue maps and regions, what an atlas would give; never from the generator's latent
variables. Per scan:

1. **intensity normalisation**: background set to zero (the z-scored array is an affine map of the scan), then a
   bias-field correction (a second-order polynomial fitted to log intensities of template white matter, outliers
   such as lesions dropped and refitted), so white matter is 1 everywhere in the scan;
2. **alignment**: the brain's centre, principal axes and size (second moments of its mask) matched to the
   template's: the input contract says "registered to MNI152", but the scans carry a few degrees and millimetres
   of pose error, enough to put white-matter masks on grey matter at 4 mm;
3. **resampling** onto a 4 mm grid centred on the template brain, where the regions live.

Then (``scan_features``):

``ventricle_darkening``  1 − mean intensity in a ring around the template's lateral ventricles (ventricles that
                         grow into it darken it): atrophy, brain age.
``thalamic_darkening``   mean intensity of the basal ganglia minus that of the thalami: thalamic loss beyond the
                         deep grey-matter loss of ageing, which both share.
``lesion_burden``        log(1 + Σ max(0, −z − 3)) over template white matter, z being each voxel's deviation from
                         the per-voxel mean and SD of the *training* scans (:class:`NormativeReference`):
                         hypointense blobs where the training scans are white.

The normative reference is a per-voxel sum and sum of squares over training scans, an aggregate statistic that a
federation can sum over sites like the model's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from neurofed.data.registration import sample_on_grid, template_grid
from neurofed.data.synth.template import DEEP_GM_BOX, THALAMUS_BOX, VENTRICLE_BOX, load_template

__all__ = ["FEATURES", "NormativeReference", "Regions", "regions", "scan_features", "template_space"]

FEATURES = ("ventricle_darkening", "thalamic_darkening", "lesion_burden")
GRID_SPACING = 4.0
GRID_SHAPE = (40, 48, 40)  # covers the template brain at 4 mm
LESION_Z = 3.0  # a voxel counts toward the burden by how far it lies beyond 3 SD below the training scans
_BIAS_ITERATIONS = 4
_BIAS_OUTLIER = 2.5  # robust SDs; lesions and partial-volume voxels are dropped from the bias fit


@dataclass(frozen=True)
class Regions:
    """Template tissue probabilities and regions on the 4 mm feature grid (``affine``)."""

    affine: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    white_matter: np.ndarray  # bool: WM probability > 0.9, where lesions are counted
    ventricle_ring: np.ndarray  # bool: two voxels around the lateral ventricles, ventricles excluded
    thalamus: np.ndarray  # bool: deep grey matter inside the thalamus box
    basal_ganglia: np.ndarray  # bool: deep grey matter outside it

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.wm.shape


def _box(affine: np.ndarray, shape: tuple[int, ...], box) -> np.ndarray:
    axes = [np.arange(n) * affine[a, a] + affine[a, 3] for a, n in enumerate(shape)]
    inside = [(x > lo) & (x < hi) for x, (lo, hi) in zip(axes, box)]
    return inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]


@lru_cache(maxsize=1)
def regions() -> Regions:
    """The template's tissue maps (2 mm) and regions, carried onto the feature grid."""
    template = load_template(2.0)
    affine = template_grid(GRID_SPACING, GRID_SHAPE)
    gm, wm, csf = (sample_on_grid(m, template.affine, affine, GRID_SHAPE) for m in (template.gm, template.wm,
                                                                                   template.csf))
    ventricles = (csf > 0.5) & _box(affine, GRID_SHAPE, VENTRICLE_BOX)
    ring = ndimage.binary_dilation(ventricles, iterations=2) & ~ventricles
    deep_gm = (gm > 0.5) & _box(affine, GRID_SHAPE, DEEP_GM_BOX)
    thalamus = deep_gm & _box(affine, GRID_SHAPE, THALAMUS_BOX)
    return Regions(affine=affine, gm=gm, wm=wm, csf=csf, white_matter=wm > 0.9, ventricle_ring=ring,
                   thalamus=thalamus, basal_ganglia=deep_gm & ~thalamus)


@lru_cache(maxsize=8)
def _polynomial(shape: tuple[int, int, int]) -> np.ndarray:
    """The ten terms of a second-order polynomial over the field of view, ``[10, *shape]``."""
    u = [np.linspace(-1.0, 1.0, n).reshape([-1 if a == i else 1 for a in range(3)]) for i, n in enumerate(shape)]
    terms = [np.ones(shape), *u, *(u[i] * u[j] for i in range(3) for j in range(i, 3))]
    return np.stack([np.broadcast_to(t, shape) for t in terms]).astype(np.float64)


@lru_cache(maxsize=16)
def _scan_grid_masks(affine_bytes: bytes, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Outside-the-brain and white-matter masks of the template on a scan's grid (one per site's field of view)."""
    template = load_template(2.0)
    affine = np.frombuffer(affine_bytes).reshape(4, 4)
    brain = sample_on_grid(template.gm + template.wm + template.csf, template.affine, affine, shape)
    return brain < 0.01, sample_on_grid(template.wm, template.affine, affine, shape) > 0.9


def normalise(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The scan with background 0 and white matter 1 everywhere (bias field removed); ``volume`` is 3-D."""
    outside, wm = _scan_grid_masks(np.asarray(affine, dtype=np.float64).tobytes(), volume.shape)
    if outside.sum() < 100 or wm.sum() < 100:
        raise ValueError("the scan's field of view misses the template brain: is it in MNI152 space?")
    raw = volume.astype(np.float64) - float(np.median(volume[outside]))
    terms = _polynomial(volume.shape)
    fit = wm & (raw > 0)
    for _ in range(_BIAS_ITERATIONS):
        design, target = terms[:, fit].T, np.log(raw[fit])
        coef = np.linalg.lstsq(design, target, rcond=None)[0]
        residual = target - design @ coef
        spread = 1.4826 * np.median(np.abs(residual - np.median(residual)))
        keep = np.flatnonzero(fit)[np.abs(residual) < _BIAS_OUTLIER * max(spread, 1e-6)]
        fit = np.zeros(volume.shape, dtype=bool)
        fit.flat[keep] = True
    return (raw / np.exp(np.tensordot(coef, terms, axes=1))).astype(np.float32)


def _moments(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xyz = np.argwhere(mask) @ affine[:3, :3].T + affine[:3, 3]
    return xyz.mean(0), np.cov(xyz.T)


def alignment(normalised: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World map template → scan (4x4) that matches the brain mask's centre, principal axes and size."""
    rg = regions()
    mask = ndimage.binary_fill_holes(ndimage.gaussian_filter(normalised, 0.7) > 0.25)
    centre, cov = _moments(mask, affine)
    t_centre, t_cov = _moments(rg.gm + rg.wm + rg.csf > 0.5, rg.affine)
    values, axes = np.linalg.eigh(cov)
    t_values, t_axes = np.linalg.eigh(t_cov)
    axes = axes * np.sign(np.sum(axes * t_axes, axis=0))  # each axis the way round closest to the template's
    rotation = axes @ t_axes.T
    scale = float((np.prod(values) / np.prod(t_values)) ** (1 / 6))
    out = np.eye(4)
    out[:3, :3] = scale * rotation
    out[:3, 3] = centre - scale * rotation @ t_centre
    return out


def template_space(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A preprocessed scan (3-D, or ``[1, D, H, W]``) normalised, aligned and resampled onto the feature grid."""
    volume = np.asarray(volume, dtype=np.float32)
    volume = volume[0] if volume.ndim == 4 else volume
    normalised = normalise(volume, affine)
    to_scan = alignment(normalised, affine) @ regions().affine
    return sample_on_grid(normalised, affine, to_scan, GRID_SHAPE)


@dataclass(frozen=True)
class NormativeReference:
    """Per-voxel sums over training scans on the feature grid: n, Σx, Σx² (sites' sums add up, as a federation
    would sum them). The mean and SD per voxel follow from them.

    A training scan must be compared with the reference *without* itself (:meth:`without`): a scan inside the mean
    and SD it is measured against can lie at most √(n − 1) SDs from them, so its lesions would look smaller than
    the same lesions in a held-out scan, and a model fitted on training scans would not transfer.
    """

    n: int
    total: np.ndarray
    total_sq: np.ndarray

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ValueError(f"a normative reference needs at least 2 training scans, got {self.n}")

    @classmethod
    def fit(cls, images: np.ndarray) -> NormativeReference:
        """From training images ``[N, *GRID_SHAPE]`` (what each site would sum and send)."""
        images = np.asarray(images, dtype=np.float64)
        return cls(len(images), images.sum(0), (images**2).sum(0))

    def __add__(self, other: NormativeReference) -> NormativeReference:
        return NormativeReference(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)

    def without(self, image: np.ndarray) -> NormativeReference:
        """The reference of the other training scans (leave one out)."""
        image = np.asarray(image, dtype=np.float64)
        return NormativeReference(self.n - 1, self.total - image, self.total_sq - image**2)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and SD per voxel; the SD has a floor of 0.02 (white matter is 1) for voxels the scans agree on."""
        mean = self.total / self.n
        var = np.maximum(self.total_sq / self.n - mean**2, 0.0) * self.n / (self.n - 1)
        return mean, np.sqrt(var) + 0.02


def scan_features(image: np.ndarray, reference: NormativeReference) -> dict[str, float]:
    """The three features of one scan already in template space (:func:`template_space`)."""
    rg = regions()
    mean, sd = reference.moments()
    z = (image[rg.white_matter] - mean[rg.white_matter]) / sd[rg.white_matter]
    return {
        "ventricle_darkening": float(1.0 - image[rg.ventricle_ring].mean()),
        "thalamic_darkening": float(image[rg.basal_ganglia].mean() - image[rg.thalamus].mean()),
        "lesion_burden": float(np.log1p(np.clip(-z - LESION_Z, 0.0, None).sum())),
    }


def feature_matrix(images: np.ndarray, reference: NormativeReference, in_reference: bool = False) -> np.ndarray:
    """``[N, len(FEATURES)]`` for images ``[N, *GRID_SHAPE]``; ``in_reference``: the images are the reference's
    own training scans, each then measured against the others (:meth:`NormativeReference.without`)."""
    rows = [scan_features(im, reference.without(im) if in_reference else reference) for im in images]
    return np.array([[f[name] for name in FEATURES] for f in rows]).reshape(-1, len(FEATURES))
