import shutil

import numpy as np
import pytest

import neurofed.data.cache as cache_module
from neurofed.data import (
    PreprocessConfig,
    VolumeCache,
    default_cache_dir,
    file_digest,
    index_bids,
)

CONFIG = PreprocessConfig(spacing=4.0, shape=(16, 20, 16))


@pytest.fixture
def counting(monkeypatch):
    calls = []
    real = cache_module.preprocess

    def counted(paths, config, notes=None):
        calls.append(paths)
        return real(paths, config, notes)

    monkeypatch.setattr(cache_module, "preprocess", counted)
    return calls


def test_hit_does_not_rerun_preprocessing(tiny_bids, tmp_path, counting):
    records, _ = index_bids(tiny_bids)
    cache = VolumeCache(tmp_path / "cache")
    report = cache.ensure(records, CONFIG)
    assert report.ok and len(counting) == len(records)
    assert cache.ensure(records, CONFIG).ok and len(counting) == len(records)
    array = cache.get(records[0].paths, CONFIG)
    assert isinstance(array, np.memmap) and array.dtype == np.float16 and array.shape == (1, 16, 20, 16)
    assert len(counting) == len(records)
    # a fresh cache object (new process) still hits: the key is content-based
    assert VolumeCache(tmp_path / "cache").contains(records[0].paths, CONFIG)
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


def test_key_changes_with_config_and_content_not_path(tiny_bids, tmp_path):
    cache = VolumeCache(tmp_path / "cache")
    path = tiny_bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    key = cache.key(path, CONFIG)
    assert cache.key(path, PreprocessConfig(spacing=3.0, shape=(16, 20, 16))) != key
    assert cache.key(path, PreprocessConfig(spacing=4.0, shape=(16, 20, 16), intensity="minmax")) != key
    copy = tmp_path / "renamed.nii.gz"
    shutil.copy(path, copy)
    assert cache.key(copy, CONFIG) == key
    other = tiny_bids / "sub-03" / "anat" / "sub-03_T1w.nii.gz"
    shutil.copy(other, copy)
    assert cache.key(copy, CONFIG) != key
    assert file_digest(copy) == file_digest(other)


def test_get_fills_on_miss(tiny_bids, tmp_path, counting):
    cache = VolumeCache(tmp_path / "cache")
    path = tiny_bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    first = np.asarray(cache.get(path, CONFIG))
    second = np.asarray(cache.get(path, CONFIG))
    assert len(counting) == 1
    np.testing.assert_array_equal(first, second)


def test_parallel_ensure_matches_serial(tiny_bids, tmp_path):
    records, _ = index_bids(tiny_bids)
    records = records[:3]
    serial, parallel = VolumeCache(tmp_path / "a"), VolumeCache(tmp_path / "b")
    assert serial.ensure(records, CONFIG).ok
    assert parallel.ensure(records, CONFIG, num_workers=2).ok
    for record in records:
        np.testing.assert_array_equal(serial.get(record.paths, CONFIG), parallel.get(record.paths, CONFIG))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NEUROFED_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    assert VolumeCache().cache_dir == tmp_path / "x"
    monkeypatch.delenv("NEUROFED_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "neurofed")
