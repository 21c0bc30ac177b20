"""Filters on session, acq, run and the derivative entities space, desc, res; what they drop is noted."""

from __future__ import annotations

import shutil

import pytest

from neurofed.data import BrainMRIDataModule, index_bids

MNI = "MNI152NLin2009cAsym"


@pytest.fixture
def fmriprep(make_bids, tmp_path):
    """fMRIPrep-style derivatives: every subject in native space, MNI space, and MNI space at res-2."""
    root = make_bids(tmp_path / "ds", n_subjects=3, sessions_every=0, shape=(8, 8, 8))
    for sub in ("sub-01", "sub-02", "sub-03"):
        anat = root / "derivatives" / "fmriprep" / sub / "anat"
        anat.mkdir(parents=True)
        for entities in ("desc-preproc", f"space-{MNI}_desc-preproc", f"space-{MNI}_res-2_desc-preproc"):
            shutil.copy(root / sub / "anat" / f"{sub}_T1w.nii.gz", anat / f"{sub}_{entities}_T1w.nii.gz")
        (anat / f"{sub}_desc-brain_mask.nii.gz").write_bytes(b"")  # other suffixes are ignored
    return root


def test_several_spaces_choose_native_and_say_which_filter_to_set(fmriprep):
    records, report = index_bids(fmriprep, derivatives="fmriprep")
    assert [r.paths["T1w"].name for r in records] == [f"sub-0{i}_desc-preproc_T1w.nii.gz" for i in (1, 2, 3)]
    (note,) = report.notes  # one note for the three subjects, not three
    assert note.startswith("sub-01, sub-02, sub-03: 3 matching scans")
    assert f"space-{MNI}_res-2_desc-preproc" in note and "using desc-preproc" in note
    assert "native space" in note and "set space=, res= to choose" in note


def test_space_and_res_pick_the_derivative(fmriprep):
    records, report = index_bids(fmriprep, derivatives="fmriprep", space=MNI, res="2", desc="preproc")
    assert {r.paths["T1w"].name.split("_", 1)[1] for r in records} == {f"space-{MNI}_res-2_desc-preproc_T1w.nii.gz"}
    assert records[0].entities == {"space": MNI, "res": "2", "desc": "preproc"}
    assert report.notes == [] and report.ok
    dm = BrainMRIDataModule(str(fmriprep), derivatives="fmriprep", space=f"space-{MNI}", res="2")
    found, _ = dm._index()
    assert len(found) == 3 and all(r.entities.get("res") == "2" for r in found)


def test_space_that_matches_nothing_lists_the_spaces_present(fmriprep):
    records, report = index_bids(fmriprep, derivatives="fmriprep", space="MNI152NLin6Asym")
    assert records == []
    assert report.filtered == {"space=MNI152NLin6Asym": ["sub-01", "sub-02", "sub-03"]}
    assert any(n.startswith("space=MNI152NLin6Asym matches no scan of sub-01, sub-02, sub-03") for n in report.notes)
    assert any(n.startswith("nothing in") and f"space: (none), {MNI}" in n for n in report.notes)
    assert report.reasons() == {"no scan matches space=MNI152NLin6Asym": 3}


def test_acq_typo_is_not_silent(make_bids, tmp_path):
    root = make_bids(tmp_path / "ds", n_subjects=3, sessions_every=0, shape=(8, 8, 8))
    records, report = index_bids(root, acq="mprage")
    assert records == []
    assert "acq=mprage matches no scan of sub-01, sub-02, sub-03" in report.notes[0]
    assert "acq values present: (none)" in report.notes[0]
    assert "0 scans indexed" in report.notes[1]


def test_session_filter_names_the_subjects_it_drops(tiny_bids):
    records, report = index_bids(tiny_bids, session="ses-2")
    assert [r.participant_id for r in records] == ["sub-01", "sub-05", "sub-09"]
    dropped = report.filtered["session=2"]
    assert len(dropped) == 9 and dropped[0] == "sub-02"
    (note,) = report.notes
    assert note.startswith("session=2 matches no scan of sub-02, sub-03, sub-04, sub-06, sub-07 and 4 more")
    assert "ses values present: (none), 1, 2" in note


def test_run_filter_on_one_subject_only(make_bids, tmp_path):
    root = make_bids(tmp_path / "ds", n_subjects=2, sessions_every=0, shape=(8, 8, 8))
    t1 = root / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    shutil.copy(t1, t1.with_name("sub-01_run-02_T1w.nii.gz"))
    records, report = index_bids(root, run="2")
    assert [r.participant_id for r in records] == ["sub-01"]
    assert report.filtered == {"run=2": ["sub-02"]}
    assert not any(n.startswith("nothing") for n in report.notes)
