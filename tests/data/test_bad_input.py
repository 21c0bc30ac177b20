"""Each kind of broken input gives a message naming the file (or a counted skip) and fails under strict."""

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from neurofed.data import NeurofedDataError, PreprocessConfig, VolumeCache, index_bids, load_volume

CONFIG = PreprocessConfig(spacing=4.0, shape=(16, 16, 16))


def _dataset(make_bids, tmp_path, n=3):
    return make_bids(tmp_path / "ds", n_subjects=n, sessions_every=0, shape=(16, 16, 16))


def _t1(root, sub="sub-02"):
    return root / sub / "anat" / f"{sub}_T1w.nii.gz"


def _ensure(root, tmp_path, strict=False):
    records, report = index_bids(root)
    cache = VolumeCache(tmp_path / "cache")
    return cache.ensure(records, CONFIG, report=report, strict=strict)


def _assert_skipped_and_strict(root, tmp_path, bad, pattern):
    with pytest.raises(NeurofedDataError, match=pattern) as info:
        load_volume(bad)
    assert str(bad) in str(info.value)
    report = _ensure(root, tmp_path)
    assert report.counts["unreadable"] == 1 and report["unreadable"][0].path == str(bad)
    assert "unreadable=1" in report.summary()
    with pytest.raises(NeurofedDataError, match="strict"):
        _ensure(root, tmp_path, strict=True)


def test_zero_byte_file(make_bids, tmp_path):
    root = _dataset(make_bids, tmp_path)
    _t1(root).write_bytes(b"")
    _assert_skipped_and_strict(root, tmp_path, _t1(root), "0-byte")


def test_corrupt_gzip(make_bids, tmp_path):
    root = _dataset(make_bids, tmp_path)
    raw = _t1(root).read_bytes()
    garbage = np.random.default_rng(0).integers(0, 256, len(raw) - 10, dtype=np.uint8).tobytes()
    _t1(root).write_bytes(raw[:10] + garbage)  # valid gzip header, broken deflate stream
    _assert_skipped_and_strict(root, tmp_path, _t1(root), "corrupt gzip")


def test_truncated_nifti(make_bids, tmp_path):
    root = _dataset(make_bids, tmp_path)
    bad = _t1(root)
    data = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(data[: len(data) // 2]))
    _assert_skipped_and_strict(root, tmp_path, bad, "truncated")


def test_4d_volume(make_bids, tmp_path):
    root = _dataset(make_bids, tmp_path)
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16, 5), np.float32), np.eye(4)), str(_t1(root)))
    _assert_skipped_and_strict(root, tmp_path, _t1(root), "4D volume with 5 frames: pass a 3D T1w")


def test_nan_voxels(make_bids, tmp_path):
    root = _dataset(make_bids, tmp_path)
    data = np.ones((16, 16, 16), np.float32)
    data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(_t1(root)))
    _assert_skipped_and_strict(root, tmp_path, _t1(root), "NaN/inf")


def test_missing_participants_tsv(make_bids, tmp_path):
    root = _dataset(make_bids, tmp_path)
    (root / "participants.tsv").unlink()
    with pytest.raises(NeurofedDataError, match="missing participants.tsv") as info:
        index_bids(root)
    assert str(root / "participants.tsv") in str(info.value)


def test_missing_label_column(make_bids, tmp_path):
    root = _dataset(make_bids, tmp_path)
    with pytest.raises(NeurofedDataError, match="'bmi' not found; available columns: participant_id, age"):
        index_bids(root, label="bmi")


def test_non_numeric_age(make_bids, tmp_path):
    root = _dataset(make_bids, tmp_path)
    tsv = root / "participants.tsv"
    lines = tsv.read_text().splitlines()
    cells = lines[2].split("\t")
    cells[1] = "forty"
    lines[2] = "\t".join(cells)
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(NeurofedDataError, match="non-numeric 'age' value 'forty' for sub-02") as info:
        index_bids(root)
    assert str(tsv) in str(info.value)


def test_duplicate_participant_ids(make_bids, tmp_path):
    root = _dataset(make_bids, tmp_path)
    tsv = root / "participants.tsv"
    lines = tsv.read_text().splitlines()
    tsv.write_text("\n".join(lines + [lines[1]]) + "\n")
    records, report = index_bids(root)
    assert report.counts["duplicate_id"] == 1 and "sub-01" in report["duplicate_id"][0].message
    assert len(records) == 3
    with pytest.raises(NeurofedDataError, match="duplicate_id"):
        index_bids(root, strict=True)


def test_subject_folder_without_t1w(make_bids, tmp_path):
    root = _dataset(make_bids, tmp_path)
    shutil.rmtree(root / "sub-03" / "anat")
    (root / "sub-03" / "anat").mkdir()
    records, report = index_bids(root)
    assert [r.participant_id for r in records] == ["sub-01", "sub-02"]
    assert report.counts["missing_image"] == 1
    assert report["missing_image"][0].path == str(root / "sub-03")
    with pytest.raises(NeurofedDataError, match="no T1w"):
        index_bids(root, strict=True)


def test_datamodule_skips_unreadable_and_strict_raises(make_bids, tmp_path):
    from neurofed.data import BrainMRIDataModule

    root = make_bids(tmp_path / "ds", n_subjects=6, sessions_every=0, shape=(16, 16, 16))
    _t1(root).write_bytes(b"")
    kwargs = dict(spacing=4.0, shape=(16, 16, 16), cache_dir=str(tmp_path / "c"), batch_size=2)
    dm = BrainMRIDataModule(str(root), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.report.counts["unreadable"] == 1
    assert len(dm.predict_records) == 5
    with pytest.raises(NeurofedDataError):
        BrainMRIDataModule(str(root), strict=True, **kwargs).setup("fit")
