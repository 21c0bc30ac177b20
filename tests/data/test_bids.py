import math
import shutil

import numpy as np
import pytest

from neurofed.data import NeurofedDataError, dataset_name, index_bids


def _copy_scan(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst


def test_index_finds_sessions_labels_and_site(tiny_bids):
    records, report = index_bids(tiny_bids)
    assert report.ok, report.summary()
    assert len(records) == 15  # 12 subjects, 3 of them with two sessions
    assert {r.site for r in records} == {"tiny"} and dataset_name(tiny_bids) == "tiny"
    sub01 = [r for r in records if r.participant_id == "sub-01"]
    assert [r.session for r in sub01] == ["1", "2"]
    assert sub01[1].label == pytest.approx(sub01[0].label + 2.0)  # sessions.tsv overrides age
    flat = next(r for r in records if r.participant_id == "sub-02")
    assert flat.session == "" and flat.paths["T1w"].name == "sub-02_T1w.nii.gz"


def test_session_filter_and_label_column(tiny_bids):
    records, _ = index_bids(tiny_bids, session="ses-2", label="sdmt")
    assert [r.participant_id for r in records] == ["sub-01", "sub-05", "sub-09"]
    assert all(20 < r.label < 80 for r in records)


def test_missing_label_is_counted_and_record_kept(make_bids, tmp_path):
    root = make_bids(tmp_path / "ds", n_subjects=4, sessions_every=0)
    tsv = root / "participants.tsv"
    lines = tsv.read_text().splitlines()
    cells = lines[2].split("\t")
    cells[1] = "n/a"
    lines[2] = "\t".join(cells)
    tsv.write_text("\n".join(lines) + "\n")
    records, report = index_bids(root)
    assert report.counts["missing_label"] == 1 and "sub-02" in report["missing_label"][0].message
    assert math.isnan(next(r.label for r in records if r.participant_id == "sub-02"))
    with pytest.raises(NeurofedDataError, match="missing_label"):
        index_bids(root, strict=True)


def test_runs_acq_and_multimodal(make_bids, tmp_path):
    root = make_bids(tmp_path / "ds", n_subjects=3, sessions_every=0)
    t1 = root / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    anat = t1.parent
    for name in ("sub-01_run-1_T1w.nii.gz", "sub-01_run-2_T1w.nii.gz", "sub-01_run-2_FLAIR.nii.gz",
                 "sub-01_acq-mp2rage_T1w.nii.gz"):
        _copy_scan(t1, anat / name)
    t1.unlink()
    records, report = index_bids(root)
    chosen = records[0].paths["T1w"].name
    assert chosen == "sub-01_run-2_T1w.nii.gz"
    assert any("matching scans" in note for note in report.notes)
    records, _ = index_bids(root, run="1")
    assert records[0].paths["T1w"].name == "sub-01_run-1_T1w.nii.gz"
    records, _ = index_bids(root, acq="mp2rage")
    assert [r.paths["T1w"].name for r in records] == ["sub-01_acq-mp2rage_T1w.nii.gz"]
    records, report = index_bids(root, modalities=("T1w", "FLAIR"))
    assert [r.participant_id for r in records] == ["sub-01"]
    assert list(records[0].paths) == ["T1w", "FLAIR"]
    assert records[0].paths["FLAIR"].name == "sub-01_run-2_FLAIR.nii.gz"
    assert report.counts["missing_image"] == 2  # sub-02, sub-03 lack FLAIR


def test_derivatives_images_with_raw_labels(make_bids, tmp_path):
    root = make_bids(tmp_path / "ds", n_subjects=3, sessions_every=0)
    deriv = root / "derivatives" / "fmriprep"
    for sub in ("sub-01", "sub-02"):
        _copy_scan(root / sub / "anat" / f"{sub}_T1w.nii.gz",
                   deriv / sub / "anat" / f"{sub}_desc-preproc_T1w.nii.gz")
    records, report = index_bids(root, derivatives="fmriprep")
    assert [r.participant_id for r in records] == ["sub-01", "sub-02"]
    assert all("derivatives" in str(r.paths["T1w"]) and not np.isnan(r.label) for r in records)
    assert report.counts["missing_image"] == 1  # sub-03 has no derivative
    with pytest.raises(NeurofedDataError, match="available: fmriprep"):
        index_bids(root, derivatives="freesurfer")


def test_missing_root(tmp_path):
    with pytest.raises(NeurofedDataError, match="BIDS root not found"):
        index_bids(tmp_path / "nope")


def test_subject_without_participants_row(make_bids, tmp_path):
    root = make_bids(tmp_path / "ds", n_subjects=3, sessions_every=0)
    _copy_scan(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", root / "sub-99" / "anat" / "sub-99_T1w.nii.gz")
    records, report = index_bids(root)
    assert report.counts["not_in_participants"] == 1
    assert math.isnan(next(r.label for r in records if r.participant_id == "sub-99"))
