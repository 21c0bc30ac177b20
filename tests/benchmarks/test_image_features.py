"""The SDMT floor's image features track the damage the generator draws, one driver at a time.

One MS patient is rendered several times with a single latent variable changed (lesion load, thalamic loss,
biological age), preprocessed as the SDMT models see it (4 mm, 48x56x48), and the feature meant to detect that
change must rise with it. A feature that stops tracking its driver fails here.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

import image_features  # noqa: E402

from neurofed.data.preprocessing import PreprocessConfig, output_affine, preprocess  # noqa: E402
from neurofed.data.synth import get_site  # noqa: E402
from neurofed.data.synth.demographics import draw_subject  # noqa: E402
from neurofed.data.synth.generate import synthesize_scan, write_nifti  # noqa: E402

MODEL_INPUT = PreprocessConfig(spacing=4.0, shape=(48, 56, 48))


def _model_view(subject, path: Path, site: str = "prague") -> np.ndarray:
    """The subject's scan (4 mm) written, preprocessed as the models see it, and put in template space."""
    data, affine = synthesize_scan(subject, 0.0, 0, get_site(site), 4.0)
    write_nifti(path, data, affine)
    return image_features.template_space(preprocess(path, MODEL_INPUT), output_affine(path, MODEL_INPUT))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The normative reference of six MS patients' scans (a site's training split in miniature)."""
    folder = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    images = [_model_view(draw_subject(rng, f"sub-{i}", "ms", (20.0, 65.0)), folder / f"r{i}.nii.gz")
              for i in range(6)]
    return image_features.NormativeReference.fit(np.stack(images))


@pytest.fixture(scope="module")
def patient():
    """A patient with little damage of every kind, so that each driver can be raised alone."""
    drawn = draw_subject(np.random.default_rng(7), "sub-x", "ms", (20.0, 65.0))
    return replace(drawn, age=44.0, duration=5.0, lesion_ml=1.0, thalamic_offset=0.0, gap=0.0)


@pytest.mark.parametrize("driver, values, feature, rise", [
    ("lesion_ml", (0.3, 5.0, 25.0), "lesion_burden", 1.5),
    ("thalamic_offset", (-0.05, 0.05, 0.15), "thalamic_darkening", 0.02),
    ("gap", (-8.0, 4.0, 16.0), "ventricle_darkening", 0.03),
])
def test_each_feature_rises_with_its_driver(tmp_path, reference, patient, driver, values, feature, rise):
    measured = [image_features.scan_features(_model_view(replace(patient, **{driver: v}), tmp_path / f"{i}.nii.gz"),
                                             reference)[feature] for i, v in enumerate(values)]
    assert all(b > a for a, b in zip(measured, measured[1:])), (driver, values, measured)
    assert measured[-1] - measured[0] > rise, (driver, measured)


def test_intensity_normalisation_removes_scale_and_bias(tmp_path, patient):
    """The same brain seen by two scanners (contrast, intensity scale, bias field) gives nearly the same
    template-space image: the features compare brains, not scanners."""
    a = _model_view(patient, tmp_path / "a.nii.gz", site="prague")
    b = _model_view(patient, tmp_path / "b.nii.gz", site="greifswald")
    wm = image_features.regions().white_matter
    assert abs(np.median(a[wm]) - 1.0) < 0.03 and abs(np.median(b[wm]) - 1.0) < 0.03
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_site_sums_add_up_to_the_pooled_reference_and_leave_one_out_is_the_others():
    rng = np.random.default_rng(1)
    shape = image_features.GRID_SHAPE
    site_a, site_b = rng.normal(1.0, 0.1, (5, *shape)), rng.normal(1.0, 0.2, (3, *shape))
    pooled = image_features.NormativeReference.fit(np.concatenate([site_a, site_b]))
    summed = image_features.NormativeReference.fit(site_a) + image_features.NormativeReference.fit(site_b)
    for a, b in zip(summed.moments(), pooled.moments()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    others = image_features.NormativeReference.fit(np.concatenate([site_a[1:], site_b]))
    for a, b in zip(pooled.without(site_a[0]).moments(), others.moments()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        image_features.NormativeReference.fit(site_a[:1])


def test_a_training_scan_is_measured_without_itself(tmp_path, reference, patient):
    """A lesioned scan looks as lesioned when it is one of the reference's training scans as when it is not."""
    from neurofed.data.synth.demographics import draw_subject as draw

    lesioned = _model_view(replace(patient, lesion_ml=25.0), tmp_path / "lesioned.nii.gz")
    healthy_looking = [_model_view(draw(np.random.default_rng(i), "s", "ms", (20.0, 65.0)), tmp_path / f"{i}.nii.gz")
                       for i in range(10, 13)]
    held_out = image_features.feature_matrix(lesioned[None], reference)[0]
    inside = reference + image_features.NormativeReference.fit(np.stack([lesioned, *healthy_looking]))
    as_member = image_features.feature_matrix(np.stack([lesioned]), inside, in_reference=True)[0]
    naive = image_features.feature_matrix(np.stack([lesioned]), inside)[0]
    burden = image_features.FEATURES.index("lesion_burden")
    assert naive[burden] < as_member[burden]  # measured against a mean it is part of, the lesions shrink
    assert as_member[burden] == pytest.approx(held_out[burden], rel=0.35)


def test_a_scan_outside_template_space_is_refused():
    far = np.eye(4)
    far[:3, 3] = 1000.0  # the field of view lies a metre from the template brain
    with pytest.raises(ValueError, match="MNI152"):
        image_features.normalise(np.ones((48, 56, 48), np.float32), far)
