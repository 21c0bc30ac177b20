"""Input QC: does a preprocessed scan look like a brain-extracted scan registered to MNI152?

neurofed trains on whatever it is given; a scan in native pose, with its skull, flipped by a wrong header
or cut off by the field of view trains a model on framing instead of anatomy, silently. So every cached
scan can be compared with the MNI152 2009 template and brain mask shipped in nilearn's package, placed on
the scan's own preprocessing grid (world coordinates, ``preprocessing.output_affine``):

- ``ncc``: normalised cross-correlation with the template inside the brain mask dilated by 6 mm;
- ``ncc_lr`` / ``ncc_ap``: the same with the template mirrored left-right (about x = 0) or
  anterior-posterior (about the brain centre, y = -18 mm): a flipped scan matches a mirrored template better;
- ``coverage``: fraction of the template brain in which the scan has signal (the field of view ends inside
  the brain otherwise);
- ``outside``: fraction of the scan's signal (above background) outside the dilated brain mask: skull, scalp
  and neck.

Intensities are rescaled per scan from background (1st percentile) to the 99th percentile inside the mask,
so the measures are the same for z-scored and min-max outputs. One scan costs about 13 ms of CPU at 2 mm
once the template is on the grid (cached per grid; placing it takes about a second, once per process).

Thresholds, from distributions measured with ``benchmarks/registration.py qc`` (2 mm, 80x96x80; 4 scans
from each of the synthetic sites ixi, sald and camcan, ``--subjects 40``, seed 0; min-max over 12 scans per
condition; "registered" is the default synthetic output: ±5°, ±4 mm, head size ±5 %, ageing):

==================  =========  =========  =========  =========  =========  =========  =========
measure             registered raw, none  raw,affine flip A-P   flip L-R   cut-off    skull-on
==================  =========  =========  =========  =========  =========  =========  =========
ncc                 0.56-0.83  0.21-0.41  0.91-0.98  0.49-0.57  0.69-0.83  0.51-0.64  0.87-0.94
ncc A-P - ncc       < 0        < 0        < 0        0.20-0.33  < 0        < 0        < 0
coverage            0.85-0.99  0.83-0.94  1.00       0.76-0.86  0.86-0.97  0.73-0.80  0.99-1.00
outside             0.04-0.07  0.31-0.40  0.00       0.08-0.11  0.04-0.07  0.04-0.06  0.31-0.33
==================  =========  =========  =========  =========  =========  =========  =========

(cut-off: top 35 % of the slices removed; skull-on: a raw-like scan put into MNI pose by its true transform,
no mask.) Real files: nilearn's MNI152 T1 passes (ncc 0.99, coverage 1.00); nibabel's ``anatomical.nii``
(a 2 mm real T1w with a partial field of view) has coverage 0.14 and is flagged as cut off. The margins are
narrow for coverage (0.80 vs 0.85: a small head fills less of the template mask) and similarity (0.41 vs
0.56), and the sample is small; the thresholds sit in the gaps. Left-right flips are not detectable by
intensity: nilearn's template is the *symmetric* ICBM 2009a, so ``ncc_lr`` equals ``ncc``; a wrong
left-right header has to be caught by checking the header against the scanner's DICOM orientation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from neurofed.data.registration import load_reference, sample_on_grid

# Chosen between the distributions above (see the module docstring for the numbers).
MIN_NCC = 0.50  # registered >= 0.56, raw unregistered <= 0.41
FLIP_MARGIN = 0.05  # mirrored template better by this much: A-P flips gain >= 0.20, others < 0
MIN_COVERAGE = 0.82  # registered >= 0.85, cut-off <= 0.80
MAX_OUTSIDE = 0.20  # brain-extracted <= 0.07 (A-P flipped 0.11), skull and neck >= 0.31
DILATE_MM = 6.0
AP_MIRROR_Y_MM = -18.0

FIXES = {
    "flipped left-right": "check the orientation in the NIfTI header (qform/sform); fslreorient2std or a "
                          "re-export from DICOM fixes a wrong header",
    "flipped anterior-posterior": "check the orientation in the NIfTI header (qform/sform); fslreorient2std "
                                  "or a re-export from DICOM fixes a wrong header",
    "brain cut off": "the field of view ends inside the brain; use a scan that covers the whole brain, or "
                     "check that the registration to MNI152 succeeded",
    "not brain-extracted": "skull, scalp or neck present; brain-extract (FSL bet, ANTs, SynthStrip, "
                           "fMRIPrep desc-brain) or set registration: affine, which applies the MNI152 mask",
    "not registered to MNI152": "register to MNI152 (fMRIPrep space-MNI152NLin2009cAsym, FSL flirt, ANTs "
                                "antsRegistrationSyNQuick.sh) or set registration: affine",
}


@dataclass(frozen=True)
class QCResult:
    ncc: float
    ncc_lr: float
    ncc_ap: float
    coverage: float
    outside: float

    def problems(self) -> list[str]:
        """Reasons (keys of ``FIXES``) this scan is outside the input contract, most specific first."""
        found = []
        if self.ncc_lr - self.ncc > FLIP_MARGIN:
            found.append("flipped left-right")
        if self.ncc_ap - self.ncc > FLIP_MARGIN:
            found.append("flipped anterior-posterior")
        if self.coverage < MIN_COVERAGE:
            found.append("brain cut off")
        if self.outside > MAX_OUTSIDE:
            found.append("not brain-extracted")
        if self.ncc < MIN_NCC and not found:
            found.append("not registered to MNI152")
        return found

    def describe(self) -> str:
        return (f"ncc {self.ncc:.2f} (mirrored L-R {self.ncc_lr:.2f}, A-P {self.ncc_ap:.2f}; need >= {MIN_NCC}), "
                f"brain coverage {self.coverage:.2f} (need >= {MIN_COVERAGE}), signal outside the brain "
                f"{self.outside:.2f} (need <= {MAX_OUTSIDE})")

    def to_json(self) -> str:
        return json.dumps({k: round(v, 4) for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> QCResult:
        return cls(**json.loads(text))


@lru_cache(maxsize=8)
def _reference_on_grid(affine_key: bytes, shape: tuple[int, int, int]):
    """Template, its two mirror images, brain mask and dilated mask on one preprocessing grid."""
    affine = np.frombuffer(affine_key).reshape(4, 4)
    ref = load_reference()
    spacing = float(np.linalg.norm(affine[:3, 0]))
    t1 = ndimage.gaussian_filter(ref.t1, 0.4 * spacing) if spacing > 1.5 else ref.t1
    lr, ap = np.eye(4), np.eye(4)
    lr[0, 0] = -1.0
    ap[1, 1], ap[1, 3] = -1.0, 2 * AP_MIRROR_Y_MM
    template = sample_on_grid(t1, ref.affine, affine, shape)
    mirrored_lr = sample_on_grid(t1, ref.affine, lr @ affine, shape)
    mirrored_ap = sample_on_grid(t1, ref.affine, ap @ affine, shape)
    mask = sample_on_grid(ref.mask, ref.affine, affine, shape) > 0.5
    region = ndimage.binary_dilation(mask, iterations=max(1, int(round(DILATE_MM / spacing))))
    return template, mirrored_lr, mirrored_ap, mask, region


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def inspect(volume: np.ndarray, affine: np.ndarray) -> QCResult:
    """QC measures of a preprocessed ``[C, D, H, W]`` (or 3D) array whose grid has RAS ``affine``."""
    scan = np.asarray(volume[0] if volume.ndim == 4 else volume, dtype=np.float32)
    template, mirrored_lr, mirrored_ap, mask, region = _reference_on_grid(
        np.ascontiguousarray(affine, dtype=np.float64).tobytes(), tuple(scan.shape))
    if not mask.any():
        return QCResult(0.0, 0.0, 0.0, 0.0, 1.0)
    background = float(np.percentile(scan, 1))
    top = float(np.percentile(scan[mask], 99))
    signal = np.clip((scan - background) / max(top - background, 1e-6), 0.0, None)
    total = float(signal.sum())
    inside = signal[region]
    return QCResult(
        ncc=_ncc(inside, template[region]),
        ncc_lr=_ncc(inside, mirrored_lr[region]),
        ncc_ap=_ncc(inside, mirrored_ap[region]),
        coverage=float((signal[mask] > 0.1).mean()),
        outside=float(signal[~region].sum() / total) if total > 0 else 1.0,
    )
