import nibabel as nib
import numpy as np
import pytest

from neurofed.data import NeurofedDataError, load_volume
from neurofed.data.nifti import header_version


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


def _cifti(path):
    """A tiny dense time series (5 frames over 8 grayordinates), written as a real CIFTI-2 file."""
    mask = np.zeros((2, 2, 2), bool)
    mask[:] = True
    brain = nib.cifti2.BrainModelAxis.from_mask(mask, affine=np.eye(4))
    series = nib.cifti2.SeriesAxis(start=0, step=1, size=5)
    nib.save(nib.Cifti2Image(np.zeros((5, 8), np.float32), header=(series, brain)), str(path))
    return path


@pytest.mark.parametrize("name", ["sub-01_task-rest_bold.dtseries.nii", "sub-01_T1w.nii"])
def test_cifti_is_named_as_such(tmp_path, name):
    """By its file name, or by its header when it hides behind a NIfTI name."""
    path = _cifti(tmp_path / "x.dtseries.nii").rename(tmp_path / name)
    with pytest.raises(NeurofedDataError, match=r"CIFTI-2 file .*not a 3D volume") as info:
        load_volume(path)
    assert str(path) in str(info.value) and info.value.reason == "CIFTI-2 file"


def test_nifti2_volume_loads(tmp_path):
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    nib.save(nib.Nifti2Image(data, np.eye(4)), str(tmp_path / "x.nii.gz"))
    assert header_version(tmp_path / "x.nii.gz") == "NIfTI-2"
    out, _ = load_volume(tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(out, data)


def test_unreadable_nifti2_header_is_named(tmp_path):
    path = tmp_path / "x.nii"
    nib.save(nib.Nifti2Image(np.ones((3, 4, 5), np.float32), np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    raw[4:12] = b"\xff" * 8  # damage the magic and datatype fields
    path.write_bytes(bytes(raw))
    with pytest.raises(NeurofedDataError, match="NIfTI-2 header, but not readable"):
        load_volume(path)
