import nibabel as nib
import numpy as np

from neurofed.data import load_volume


def test_load_volume_float32_and_affine(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "x.nii.gz"))
    out, aff = load_volume(tmp_path / "x.nii.gz")
    assert out.dtype == np.float32 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, data)
    np.testing.assert_allclose(aff, affine)


def test_singleton_fourth_dimension_is_squeezed(tmp_path):
    data = np.ones((4, 5, 6, 1), dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "x.nii"))
    out, _ = load_volume(tmp_path / "x.nii")
    assert out.shape == (4, 5, 6)
