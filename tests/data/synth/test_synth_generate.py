"""BIDS layout, reproducibility and input checks of the synthetic site generator (4 mm: fast)."""

import json

import nibabel as nib
import numpy as np
import pytest

from neurofed.data.synth import generate_site, get_site, read_tsv
from neurofed.data.synth.generate import site_grid

RES = 4.0


@pytest.fixture(scope="module")
def ixi(tmp_path_factory):
    return generate_site(tmp_path_factory.mktemp("a"), "ixi", 8, resolution=RES, seed=1,
                         session_fraction=0.25, progress=False)


def test_bids_layout(ixi):
    desc = json.loads((ixi / "dataset_description.json").read_text())
    assert desc["Name"] == "ixi" and desc["DatasetType"] == "raw" and desc["BIDSVersion"]
    assert desc["GeneratedBy"][0]["Name"] == "neurofed synth"
    rows = read_tsv(ixi / "participants.tsv")
    assert len(rows) == 8
    assert list(rows[0]) == ["participant_id", "age", "sex", "sdmt"]
    assert set(json.loads((ixi / "participants.json").read_text())) >= set(rows[0]) - {"participant_id"}
    for row in rows:
        assert row["participant_id"].startswith("sub-") and row["sex"] in {"M", "F"}
        assert 20 <= float(row["age"]) <= 86 and 0 <= float(row["sdmt"]) <= 110
    longitudinal = [r["participant_id"] for r in rows if (ixi / r["participant_id"] / "ses-1").exists()]
    assert len(longitudinal) == 2
    for pid in longitudinal:
        assert (ixi / pid / "ses-2" / "anat" / f"{pid}_ses-2_T1w.nii.gz").exists()
        assert not (ixi / pid / "anat").exists()
        sessions = read_tsv(ixi / pid / f"{pid}_sessions.tsv")
        assert [s["session_id"] for s in sessions] == ["ses-1", "ses-2"]
        first_age = float(next(r["age"] for r in rows if r["participant_id"] == pid))
        assert float(sessions[0]["age"]) == first_age
        assert 1.0 <= float(sessions[1]["age"]) - first_age <= 3.05
    single = next(r["participant_id"] for r in rows if r["participant_id"] not in longitudinal)
    img = nib.load(ixi / single / "anat" / f"{single}_T1w.nii.gz")
    assert np.allclose(nib.affines.voxel_sizes(img.affine), RES)
    assert img.shape == site_grid(get_site("ixi"), RES)[0]
    assert img.get_data_dtype() == np.int16
    data = np.asarray(img.dataobj)
    assert data.max() > 500 and (data > 0.3 * data.max()).mean() > 0.1


def test_sites_differ_in_matrix_and_dtype():
    assert site_grid(get_site("ixi"), 2.0)[0] != site_grid(get_site("sald"), 2.0)[0]
    assert get_site("sald").dtype == "float32"


def test_same_seed_same_bytes_other_seed_differs(ixi, tmp_path):
    again = generate_site(tmp_path / "b", "ixi", 8, resolution=RES, seed=1, session_fraction=0.25,
                          progress=False)
    other = generate_site(tmp_path / "c", "ixi", 8, resolution=RES, seed=2, session_fraction=0.25,
                          progress=False)
    scan = "sub-0003/anat/sub-0003_T1w.nii.gz"
    if not (ixi / scan).exists():
        scan = "sub-0003/ses-1/anat/sub-0003_ses-1_T1w.nii.gz"
    assert (ixi / scan).read_bytes() == (again / scan).read_bytes()
    assert (ixi / "participants.tsv").read_bytes() == (again / "participants.tsv").read_bytes()
    assert (ixi / "participants.tsv").read_bytes() != (other / "participants.tsv").read_bytes()
    other_scans = sorted((other / "sub-0003").glob("**/*_T1w.nii.gz"))
    assert other_scans[0].read_bytes() != sorted((ixi / "sub-0003").glob("**/*_T1w.nii.gz"))[0].read_bytes()


def test_regenerating_replaces_old_subjects(tmp_path):
    generate_site(tmp_path, "sald", 7, resolution=RES, session_fraction=0, progress=False)
    site = generate_site(tmp_path, "sald", 6, resolution=RES, session_fraction=0, progress=False)
    assert not (site / "sub-0007").exists() and len(read_tsv(site / "participants.tsv")) == 6


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "ixi").mkdir()
    (tmp_path / "ixi" / "notes.txt").write_text("real data")
    with pytest.raises(FileExistsError, match="not written by neurofed synth"):
        generate_site(tmp_path, "ixi", 6, resolution=RES, progress=False)


def test_unknown_site_and_cohort_errors(tmp_path):
    with pytest.raises(ValueError, match="known sites: ixi, sald, camcan, brussels"):
        generate_site(tmp_path, "oxford", 6, resolution=RES)
    with pytest.raises(ValueError, match="cohort"):
        generate_site(tmp_path, "ixi", 6, resolution=RES, cohort="elderly")
