"""neurofed synth --raw: head and neck in native pose, true transforms kept in sourcedata."""

import nibabel as nib
import numpy as np
import pytest

from neurofed.data import index_bids
from neurofed.data.synth.generate import generate_site
from neurofed.data.synth.raw import MAX_ROTATION_DEG, MAX_TRANSLATION_MM, read_transforms, template_to_scan


@pytest.mark.slow
def test_raw_site_writes_transforms_and_differs_from_registered(tmp_path):
    raw = generate_site(tmp_path / "raw", "ixi", 2, resolution=4.0, progress=False, session_fraction=0.0,
                        raw=True)
    reg = generate_site(tmp_path / "reg", "ixi", 2, resolution=4.0, progress=False, session_fraction=0.0)
    transforms = read_transforms(raw)
    records, report = index_bids(raw)
    assert report.ok and len(records) == 2
    assert set(transforms) == {str(r.paths["T1w"].relative_to(raw)) for r in records}
    assert not (reg / "sourcedata" / "transforms.tsv").exists()
    for rel, matrix in transforms.items():
        scale = np.cbrt(np.linalg.det(matrix[:3, :3]))
        assert 0.9 < scale < 1.1
        rotation = matrix[:3, :3] / scale
        assert np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-5)
        raw_img, reg_img = nib.load(str(raw / rel)), nib.load(str(reg / rel))
        assert raw_img.shape != reg_img.shape  # head-and-neck field of view
        # more signal far from the brain centre: scalp and neck
        def far_fraction(img):
            data = np.asarray(img.dataobj, dtype=np.float32)
            ijk = np.indices(data.shape).reshape(3, -1)
            xyz = (img.affine[:3, :3] @ ijk + img.affine[:3, 3:]).T - np.array([0.0, -18.0, 12.0])
            far = np.linalg.norm(xyz, axis=1) > 90
            return data.ravel()[far].sum() / data.sum()
        assert far_fraction(raw_img) > far_fraction(reg_img) + 0.1


def test_pose_convention_and_bounds():
    m = template_to_scan(1.0, (0.0, 0.0, 0.0), (3.0, -2.0, 1.0))
    assert np.allclose(m[:3, 3], [3.0, -2.0, 1.0])
    assert MAX_ROTATION_DEG == 15.0 and MAX_TRANSLATION_MM == 20.0
