"""Input QC flags flipped, cut-off and skull-on scans, passes registered ones, and strict refuses."""

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from neurofed.data import PreprocessConfig, VolumeCache, index_bids
from neurofed.data.cache import qc_path
from neurofed.data.nifti import load_volume
from neurofed.data.preprocessing import output_affine
from neurofed.data.qc import QCResult, inspect
from neurofed.data.registration import load_reference, sample_on_grid
from neurofed.data.validation import NeurofedDataError

CONFIG = PreprocessConfig(spacing=3.0, shape=(56, 64, 56))


def _scan(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A 2 mm brain-extracted MNI-space scan (the template plus noise), or a broken variant of it."""
    ref = load_reference()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    shape = (88, 108, 92)
    affine[:3, 3] = np.array([0.0, -18.0, 12.0]) - 2.0 * (np.array(shape) - 1) / 2
    data = sample_on_grid(ref.t1, ref.affine, affine, shape)
    data = data + np.random.default_rng(0).normal(0, 0.02, shape).astype(np.float32)
    if kind == "flipped":
        data = data[:, ::-1]
    elif kind == "cut-off":
        data = data[:, :, : int(0.6 * shape[2])]
    elif kind == "skull-on":
        from scipy import ndimage

        brain = sample_on_grid(ref.mask, ref.affine, affine, shape) > 0.5
        depth = ndimage.distance_transform_edt(~brain, sampling=2.0)
        data = data + 0.9 * ((depth > 8) & (depth < 16)) + 0.6 * ((depth > 0) & (depth < 20))
    return np.abs(data).astype(np.float32), affine


def _qc(kind: str, tmp_path) -> QCResult:
    data, affine = _scan(kind)
    path = tmp_path / f"{kind}.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))
    return inspect(VolumeCache(tmp_path / "cache").get(path, CONFIG), output_affine(path, CONFIG))


@pytest.mark.parametrize("kind, reason", [
    ("registered", None), ("flipped", "flipped anterior-posterior"), ("cut-off", "brain cut off"),
    ("skull-on", "not brain-extracted"),
])
def test_flags_what_is_outside_the_contract(kind, reason, tmp_path):
    problems = _qc(kind, tmp_path).problems()
    assert (problems[:1] == [reason]) if reason else problems == []


def test_output_affine_matches_torchio(tmp_path):
    data, affine = _scan("registered")
    path = tmp_path / "scan.nii.gz"
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])  # stored L-R reversed: ToCanonical has to reorder it
    flip[0, 3] = data.shape[0] - 1
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data[::-1]), affine @ flip), str(path))
    for config in (CONFIG, PreprocessConfig()):
        volume, a = load_volume(path)
        subject = tio.Subject(m=tio.ScalarImage(tensor=torch.from_numpy(volume)[None], affine=a))
        out = tio.Compose([tio.ToCanonical(), tio.Resample(config.spacing), tio.CropOrPad(config.shape)])(subject)
        assert np.allclose(out["m"].affine, output_affine(path, config))


def _site(make_bids, tmp_path, kinds):
    root = make_bids(tmp_path / "site", n_subjects=len(kinds), sessions_every=0)
    for (record, kind) in zip(sorted(index_bids(root)[0], key=lambda r: r.participant_id), kinds):
        data, affine = _scan(kind)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(record.paths["T1w"]))
    return root


def test_report_counts_reasons_and_strict_refuses(make_bids, tmp_path):
    root = _site(make_bids, tmp_path, ["registered", "registered", "flipped", "skull-on"])
    records, _ = index_bids(root)
    cache = VolumeCache(tmp_path / "cache")
    report = cache.ensure(records, CONFIG, qc=True)
    assert report.counts["qc"] == 2 and report.counts["unreadable"] == 0
    assert report.reasons() == {"qc (flipped anterior-posterior)": 1, "qc (not brain-extracted)": 1}
    assert "fslreorient2std" in str(report["qc"][0]) or "fslreorient2std" in str(report["qc"][1])
    # cached with the entry: a second pass reads the measures, it does not recompute them
    target = cache.path_for(cache.key(records[0].paths, CONFIG))
    assert qc_path(target).is_file()
    assert cache.ensure(records, CONFIG).counts["qc"] == 0  # off unless asked for
    with pytest.raises(NeurofedDataError, match="not brain-extracted"):
        cache.ensure(records, CONFIG, qc=True, strict=True)
