"""Non-finite voxels: a harmless background fill, or lost brain data.

Tools that resample a scan (registration, reorientation, defacing) often fill voxels outside the original
field of view with NaN. Refusing those scans throws away good data, while zero-filling every NaN would hide a
scan whose brain itself is damaged. The rule, in order:

1. more than half of the volume non-finite: refused (too little left to be a scan);
2. a non-finite region that does not touch the edge of the volume (a hole inside the image): refused, since
   it lies within the field of view, where the head is;
3. a non-finite region whose finite neighbours are mostly tissue (above a robust threshold, 25% of the way
   from the 2nd to the 98th intensity percentile): refused, since the field of view then cuts through the head;
4. anything else is background outside the field of view: set to 0, and the caller notes how many voxels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from neurofed.data.validation import NeurofedDataError

#: Rule 1: the largest non-finite fraction of the volume accepted as background.
MAX_NONFINITE_FRACTION = 0.5
#: Rule 3: tissue threshold, as a fraction of the way from the 2nd to the 98th percentile.
TISSUE_LEVEL = 0.25
#: Rule 3: the largest fraction of the region's finite neighbours that may be tissue.
MAX_TISSUE_NEIGHBOURS = 0.5

_REASON = "non-finite brain voxels"


def zero_nonfinite_background(data: np.ndarray, path: str | Path) -> tuple[np.ndarray, int]:
    """Return ``(data, n)``: ``n`` non-finite background voxels set to 0 (``data`` itself when ``n == 0``).

    Raises :class:`NeurofedDataError` naming the file when the non-finite voxels are not background.
    """
    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return data, 0
    fix = "re-run the tool that wrote it, or mask the scan before using it"
    if n_bad > MAX_NONFINITE_FRACTION * data.size:
        raise NeurofedDataError(
            f"{path}: {n_bad} of {data.size} voxels are NaN/inf, too few finite ones to be a scan; {fix}.",
            reason=_REASON,
        )
    regions, _ = ndimage.label(bad)
    faces = [regions[0], regions[-1], regions[:, 0], regions[:, -1], regions[:, :, 0], regions[:, :, -1]]
    at_edge = np.unique(np.concatenate([f.ravel() for f in faces]))
    inside = bad & ~np.isin(regions, at_edge[at_edge > 0])
    if inside.any():
        first = tuple(int(i) for i in np.argwhere(inside)[0])
        raise NeurofedDataError(
            f"{path}: {int(inside.sum())} NaN/inf voxel(s) inside the field of view (first at voxel {first}); "
            f"{fix} (NaN/inf outside the field of view is accepted and set to 0).",
            reason=_REASON,
        )
    finite_values = data[~bad]
    lo, hi = np.percentile(finite_values, [2.0, 98.0])
    threshold = lo + TISSUE_LEVEL * (hi - lo)
    rim = ndimage.binary_dilation(bad) & ~bad
    if rim.any() and hi > lo and float(np.mean(data[rim] > threshold)) > MAX_TISSUE_NEIGHBOURS:
        raise NeurofedDataError(
            f"{path}: {n_bad} NaN/inf voxel(s) border brain tissue (the field of view cuts through the head); "
            f"{fix}.",
            reason=_REASON,
        )
    return np.where(bad, np.float32(0.0), data).astype(np.float32, copy=False), n_bad
