"""registration: affine recovers a known pose on a small scan, and is part of the cache key."""

import hashlib
import json

import numpy as np
import pytest

from neurofed.data import PreprocessConfig, VolumeCache
from neurofed.data.registration import estimate_transform, load_reference, register_to_template, sample_on_grid
from neurofed.data.synth.raw import template_to_scan


def _moved_template(scale: float, angles, shift, spacing: float = 3.0):
    """The MNI152 template at ``spacing`` mm, moved by a known pose into a larger, off-centre field of view."""
    ref = load_reference()
    truth = template_to_scan(scale, angles, shift)
    shape = (64, 72, 64)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.array([5.0, -10.0, 0.0]) - spacing * (np.array(shape) - 1) / 2
    data = sample_on_grid(ref.t1, ref.affine, np.linalg.inv(truth) @ affine, shape)
    return data.astype(np.float32), affine, truth


def _residual(truth, estimate):
    d = np.linalg.inv(truth) @ estimate
    u, _, vt = np.linalg.svd(d[:3, :3])
    angle = np.degrees(np.arccos(np.clip((np.trace(u @ vt) - 1) / 2, -1, 1)))
    centre = np.array([0.0, -18.0, 12.0])
    return angle, np.linalg.norm(d[:3, :3] @ centre + d[:3, 3] - centre)


@pytest.mark.parametrize("scale, angles, shift", [
    (1.0, (10.0, -8.0, 5.0), (12.0, -15.0, 8.0)),  # rigid
    (1.06, (-6.0, 12.0, -4.0), (-10.0, 6.0, -18.0)),  # with a head 6 % larger than the template
])
def test_recovers_known_transform(scale, angles, shift):
    data, affine, truth = _moved_template(scale, angles, shift)
    estimate = estimate_transform(data, affine)
    rotation, translation = _residual(truth, estimate)
    assert rotation < 1.0 and translation < 1.5  # degrees, mm: within half a 3 mm voxel
    assert np.allclose(np.linalg.svd(estimate[:3, :3])[1], scale, atol=0.03)


def test_output_on_template_grid_and_masked():
    data, affine, _ = _moved_template(1.0, (5.0, 0.0, 0.0), (0.0, 10.0, 0.0))
    arrays, grid, _ = register_to_template([(data, affine)], 3.0, (56, 64, 56))
    assert arrays[0].shape == (56, 64, 56) and np.allclose(np.diag(grid)[:3], 3.0)
    ref = load_reference()
    mask = sample_on_grid(ref.mask, ref.affine, grid, (56, 64, 56))
    assert not arrays[0][mask == 0].any()  # the template brain mask was applied
    assert np.allclose(grid[:3, :3] @ (np.array([55, 63, 55]) / 2) + grid[:3, 3], [0.0, -18.0, 12.0])


@pytest.mark.slow
def test_deterministic():
    data, affine, _ = _moved_template(1.0, (8.0, 0.0, -6.0), (5.0, 5.0, 5.0))
    assert np.array_equal(estimate_transform(data, affine), estimate_transform(data, affine))


def test_cache_key_changes_with_registration(tiny_bids, tmp_path):
    from neurofed.data import index_bids

    records, _ = index_bids(tiny_bids)
    cache = VolumeCache(tmp_path / "cache")
    none = PreprocessConfig(spacing=4.0, shape=(16, 20, 16))
    affine = PreprocessConfig(spacing=4.0, shape=(16, 20, 16), registration="affine")
    assert cache.key(records[0].paths, none) != cache.key(records[0].paths, affine)
    # entries cached before the option existed keep their key
    payload = json.dumps({"intensity": "zscore", "shape": [16, 20, 16], "spacing": 4.0, "version": 1},
                         sort_keys=True)
    assert none.key() == hashlib.sha256(payload.encode()).hexdigest()[:16]


def test_unknown_mode_names_value_and_fix():
    with pytest.raises(ValueError, match="'rigid'.*registration: none|'rigid'.*'affine'"):
        PreprocessConfig(registration="rigid")
