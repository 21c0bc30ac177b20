"""Built-in affine registration to the MNI152 template (``registration: affine``).

SFCN-style brain-age models are trained on linearly registered, brain-extracted scans. A raw T1w (native
pose, skull, neck, the scanner's own field of view) makes a network learn head position and framing
instead of anatomy. This module maps each scan onto the MNI152 2009 template that nilearn ships inside its
package (no download), then applies the template brain mask, so raw scans meet the input contract.

Method (SimpleITK): Mattes mutual information, centre-of-mass initialisation and a coarse grid search at
8 mm, rigid (8, 4, 2 mm pyramid) then affine (4, 2 mm) on a 2 mm template, a dilated brain mask
restricting the samples, and
a fixed random sampling seed, so the same file always gives the same transform. The moving scan is
block-averaged to about 2 mm before registration, and the original scan is resampled only once, at the
end, straight onto the final grid (``spacing`` and ``shape`` of the preprocessing, centred on the template
brain): registration never blurs the data twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

# Centre of the MNI152 2009 brain (mm): the output grid is centred here, as the synthetic sites are.
MNI_BRAIN_CENTRE_MM = np.array([0.0, -18.0, 12.0])
REGISTRATION_MODES = ("none", "affine")
_FIXED_SPACING = 2.0  # mm, finest registration level
_SEED = 20240914  # metric sampling seed: same file, same transform
_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Reference:
    """The MNI152 2009 T1w template (brain-extracted) and brain mask at 1 mm, RAS."""

    t1: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


@lru_cache(maxsize=1)
def load_reference() -> Reference:
    """Template and mask from nilearn's package data (no network)."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    t1 = load_mni152_template(resolution=1)
    mask = load_mni152_brain_mask(resolution=1)
    return Reference(np.asarray(t1.get_fdata(dtype=np.float32)), np.asarray(mask.get_fdata(dtype=np.float32)),
                     np.asarray(t1.affine, dtype=np.float64))


def template_grid(spacing: float, shape: tuple[int, int, int]) -> np.ndarray:
    """RAS affine of a ``shape`` grid at ``spacing`` mm centred on the template brain."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = MNI_BRAIN_CENTRE_MM - spacing * (np.asarray(shape, dtype=float) - 1) / 2
    return affine


def sample_on_grid(data: np.ndarray, affine: np.ndarray, grid_affine: np.ndarray,
                   shape: tuple[int, int, int], order: int = 1) -> np.ndarray:
    """Values of ``data`` (world ``affine``) at the voxels of another grid; outside is 0."""
    matrix = np.linalg.inv(affine) @ grid_affine
    return ndimage.affine_transform(data, matrix[:3, :3], matrix[:3, 3], output_shape=tuple(shape),
                                    order=order, mode="constant", cval=0.0, prefilter=False)


def to_sitk(data: np.ndarray, affine: np.ndarray):
    """A SimpleITK image (LPS) from a RAS array and affine."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, np.float32).transpose(2, 1, 0)))
    lps = _LPS @ affine[:3, :4]
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


@lru_cache(maxsize=1)
def _fixed():
    """The 2 mm template and its dilated brain mask (sampling region), as SimpleITK images."""
    import SimpleITK as sitk

    ref = load_reference()
    affine = ref.affine.copy()
    affine[:3, :3] *= _FIXED_SPACING
    shape = tuple(int(n // _FIXED_SPACING) for n in ref.t1.shape)
    smooth = ndimage.gaussian_filter(ref.t1, 0.5 * _FIXED_SPACING)
    t1 = sample_on_grid(smooth, ref.affine, affine, shape)
    mask = sample_on_grid(ref.mask, ref.affine, affine, shape) > 0.5
    mask = ndimage.binary_dilation(mask, iterations=3)
    fixed_mask = to_sitk(mask.astype(np.float32), affine)
    return to_sitk(t1, affine), sitk.Cast(fixed_mask, sitk.sitkUInt8)


def _shrunk_moving(data: np.ndarray, affine: np.ndarray):
    """The scan block-averaged to about 2 mm (bins of whole voxels): fast and alias-free enough for MI."""
    import SimpleITK as sitk

    image = to_sitk(data, affine)
    factors = [max(1, int(round(_FIXED_SPACING / s))) for s in image.GetSpacing()]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def _method(shrink: list[int], sigmas: list[float], iterations: int):
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.25, _SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-3, numberOfIterations=iterations, relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(sigmas)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def _search(fixed, fixed_mask, moving, rigid) -> None:
    """Coarse grid search at 8 mm around the centre-of-mass start (in place).

    The centre of mass of a head with neck lies centimetres below the brain's, and a tilted head can
    start the gradient descent in the wrong basin; trying pitch ±15° and shifts of ±10 mm (x, y) and
    ±30 mm (z) first costs a fraction of a second and avoids both.
    """
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.5, _SEED)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsExhaustive([1, 1, 1, 1, 1, 3])
    method.SetOptimizerScales([np.deg2rad(15.0)] * 3 + [10.0] * 3)
    method.SetShrinkFactorsPerLevel([4])
    method.SetSmoothingSigmasPerLevel([4.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(rigid, inPlace=True)
    method.Execute(fixed, moving)


def estimate_transform(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """4x4 world (RAS, mm) map from template space to scan space, found by rigid then affine MI registration.

    Raises ``RuntimeError`` when the optimiser fails (the caller names the file).
    """
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # deterministic and fair to other workers
    fixed, fixed_mask = _fixed()
    moving = _shrunk_moving(data, affine)
    rigid = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    _search(fixed, fixed_mask, moving, rigid)
    method = _method([4, 2, 1], [4.0, 2.0, 1.0], 100)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInitialTransform(rigid, inPlace=True)
    method.Execute(fixed, moving)
    affine_tx = sitk.AffineTransform(3)
    affine_tx.SetCenter(rigid.GetCenter())
    affine_tx.SetMatrix(rigid.GetMatrix())
    affine_tx.SetTranslation(rigid.GetTranslation())
    method = _method([2, 1], [1.0, 0.0], 100)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInitialTransform(affine_tx, inPlace=True)
    method.Execute(fixed, moving)
    return _to_ras(affine_tx)


def _to_ras(transform) -> np.ndarray:
    """A SimpleITK affine (LPS, fixed -> moving points) as a 4x4 RAS matrix."""
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    centre = np.asarray(transform.GetCenter())
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = np.asarray(transform.GetTranslation()) + centre - matrix @ centre
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


def register_to_template(volumes: list[tuple[np.ndarray, np.ndarray]], spacing: float,
                         shape: tuple[int, int, int]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Register the first volume (T1w) and carry every volume onto the template grid, brain-masked.

    Other modalities get the T1w's transform, so they must already be aligned with it (as BIDS raw
    sessions usually are). Returns the resampled arrays, their RAS affine and the template-to-scan transform.
    """
    data, affine = volumes[0]
    transform = estimate_transform(data, affine)
    grid = template_grid(spacing, shape)
    ref = load_reference()
    mask = sample_on_grid(ref.mask, ref.affine, grid, shape)
    out = [sample_on_grid(d, a, transform @ grid, shape) * mask for d, a in volumes]
    return [o.astype(np.float32) for o in out], grid, transform
