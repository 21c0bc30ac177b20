"""nibabel's bundled real scan (big-endian int16, 2 mm) goes through load, preprocess and cache."""

import os

import nibabel.testing
import numpy as np

from neurofed.data import PreprocessConfig, VolumeCache, load_volume, preprocess

REAL = os.path.join(nibabel.testing.data_path, "anatomical.nii")


def test_real_file_load_preprocess_cache(tmp_path):
    data, affine = load_volume(REAL)
    assert data.dtype == np.float32 and data.ndim == 3 and data.max() > 0
    assert np.allclose(np.abs(np.diag(affine)[:3]), 2.0)
    config = PreprocessConfig(spacing=4.0, shape=(32, 32, 32))
    out = preprocess(REAL, config)
    assert out.shape == (1, 32, 32, 32) and out.dtype == np.float16 and np.isfinite(out).all()
    cache = VolumeCache(tmp_path)
    cached = cache.get(REAL, config)
    np.testing.assert_array_equal(cached, out)
    minmax = preprocess(REAL, PreprocessConfig(spacing=4.0, shape=(32, 32, 32), intensity="minmax"))
    assert float(minmax.min()) >= -1e-3 and float(minmax.max()) <= 1.0 + 1e-3
