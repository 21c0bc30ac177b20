"""The MS SDMT follows the image-visible drivers with the published strength (latents only: fast)."""

import numpy as np
import pytest

from neurofed.data.synth import sdmt
from neurofed.data.synth.demographics import draw_subject, ms_latents, scan_state


@pytest.fixture(scope="module")
def cohort():
    rng = np.random.default_rng(0)
    subjects = [draw_subject(rng, f"sub-{i}", "ms", (20.0, 65.0)) for i in range(600)]
    states = [scan_state(s) for s in subjects]
    return subjects, states, np.array([s.sdmt for s in states])


def test_sdmt_mean_and_spread_match_ms_cohorts(cohort):
    _, _, score = cohort
    assert 46 < score.mean() < 54 and 9.5 < score.std() < 14.5


def test_sdmt_correlates_with_lesions_and_thalamus_in_the_published_range(cohort):
    subjects, states, score = cohort
    lat = ms_latents(states, subjects)
    assert -0.6 < np.corrcoef(lat["log_lesion"], score)[0, 1] < -0.3
    thalamic_volume = 1.0 - lat["thalamic_loss"]
    assert 0.4 < np.corrcoef(thalamic_volume, score)[0, 1] < 0.7
    assert -0.5 < np.corrcoef(lat["atrophy_gap"], score)[0, 1] < -0.2
    bio_age = np.array([s.bio_age for s in states])
    assert -0.5 <= np.corrcoef(bio_age, score)[0, 1] <= -0.25  # brain age explains only part of SDMT


def test_drivers_explain_part_not_all(cohort):
    subjects, states, score = cohort
    lat = ms_latents(states, subjects)
    x = np.column_stack([np.ones(len(score))] + [lat[k] for k in sdmt.MS_TARGET_R])
    resid = score - x @ np.linalg.lstsq(x, score, rcond=None)[0]
    r2 = 1 - resid.var() / score.var()
    assert 0.25 < r2 < 0.55


def test_recorded_weights_match_a_fresh_calibration():
    rng = np.random.default_rng(1)
    subjects = [draw_subject(rng, "s", "ms", (20.0, 65.0)) for _ in range(20_000)]
    lat = ms_latents([scan_state(s) for s in subjects], subjects)
    weights, centres, explained = sdmt.calibrate_ms_weights(lat)
    for key, w in weights.items():
        assert w == pytest.approx(sdmt.MS_WEIGHTS[key], rel=0.1), key
        assert centres[key] == pytest.approx(sdmt.MS_CENTRES[key], rel=0.05, abs=0.01), key
    assert 0.35 < explained < 0.45


def test_inconsistent_targets_are_refused(monkeypatch):
    monkeypatch.setitem(sdmt.MS_TARGET_R, "thalamic_loss", 0.55)  # wrong sign
    rng = np.random.default_rng(2)
    subjects = [draw_subject(rng, "s", "ms", (20.0, 65.0)) for _ in range(2000)]
    with pytest.raises(ValueError, match="MS_TARGET_R"):
        sdmt.calibrate_ms_weights(ms_latents([scan_state(s) for s in subjects], subjects))


def test_thalamic_loss_grows_with_disease():
    subject = draw_subject(np.random.default_rng(3), "s", "ms", (20.0, 65.0))
    assert scan_state(subject, 5.0).thalamic_loss > scan_state(subject, 0.0).thalamic_loss
    assert scan_state(subject, 5.0).sdmt <= scan_state(subject, 0.0).sdmt + 1e-9
