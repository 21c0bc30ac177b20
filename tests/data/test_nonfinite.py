"""NaN/inf outside the field of view becomes 0 with a note; NaN/inf in the brain refuses the scan."""

from __future__ import annotations

import numpy as np
import pytest

from neurofed.data import NeurofedDataError, PreprocessConfig, VolumeCache, index_bids
from neurofed.data.nonfinite import zero_nonfinite_background


def _head(margin: int = 4) -> np.ndarray:
    """A bright cube of tissue in a dark 24^3 volume, ``margin`` voxels from each face."""
    data = np.full((24, 24, 24), 0.05, np.float32)
    data[margin:-margin, margin:-margin, margin:-margin] = 1.0
    return data


def test_background_fill_outside_the_field_of_view_is_zeroed():
    data = _head()
    data[:2, :, :] = np.nan  # a resampling tool's fill along one face, next to dark background
    data[-1, -1, -1] = np.inf
    clean, n = zero_nonfinite_background(data, "x.nii.gz")
    assert n == 2 * 24 * 24 + 1
    assert np.isfinite(clean).all() and clean[0, 0, 0] == 0.0 and clean[5, 5, 5] == 1.0


def test_finite_scan_is_returned_unchanged():
    data = _head()
    clean, n = zero_nonfinite_background(data, "x.nii.gz")
    assert n == 0 and clean is data


def test_hole_inside_the_volume_is_refused():
    data = _head()
    data[10, 11, 12] = np.nan
    with pytest.raises(NeurofedDataError, match=r"x.nii.gz: 1 NaN/inf voxel\(s\) inside the field of view") as info:
        zero_nonfinite_background(data, "x.nii.gz")
    assert info.value.reason == "non-finite brain voxels"


def test_field_of_view_cutting_through_the_brain_is_refused():
    data = _head(margin=1)
    data[:, :, :10] = np.nan  # touches the edge, but its neighbours are mostly tissue
    with pytest.raises(NeurofedDataError, match="border brain tissue"):
        zero_nonfinite_background(data, "x.nii.gz")


def test_mostly_nonfinite_is_refused():
    data = _head()
    data[:, :, :14] = np.nan
    data[:, :, 14:] = 0.05
    with pytest.raises(NeurofedDataError, match="too few finite ones"):
        zero_nonfinite_background(data, "x.nii.gz")


def test_cache_notes_the_repair_on_build_and_on_hit(make_bids, tmp_path):
    import nibabel as nib

    root = make_bids(tmp_path / "ds", n_subjects=3, sessions_every=0, shape=(16, 16, 16))
    t1 = root / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    image = nib.load(str(t1))
    data = np.asarray(image.dataobj, np.float32)
    data[:, :, :2] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), str(t1))
    records, _ = index_bids(root)
    config = PreprocessConfig(spacing=4.0, shape=(16, 16, 16))
    for cache in (VolumeCache(tmp_path / "c"), VolumeCache(tmp_path / "c")):  # build, then a hit
        report = cache.ensure(records, config)
        assert report.ok
        (note,) = report.notes
        assert note.startswith("1 file(s) with NaN/inf background") and "512 NaN/inf" in note and str(t1) in note
