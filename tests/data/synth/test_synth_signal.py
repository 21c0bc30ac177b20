"""The synthetic cohorts carry the signals the models are meant to learn."""

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from neurofed.data.synth import generate_site, get_site, read_tsv
from neurofed.data.synth.demographics import draw_subject, scan_state
from neurofed.data.synth.generate import synthesize_scan
from neurofed.data.synth.lesions import lesion_layout, render_lesions
from neurofed.data.synth.template import load_template

BENCH = Path(__file__).parents[3] / "benchmarks" / "synth_signal.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("synth_signal", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_feature_tracks_age(tmp_path, bench):
    site = generate_site(tmp_path, "camcan", 20, resolution=4.0, session_fraction=0, progress=False)
    result = bench.site_signal(site)
    assert result["n"] == 20
    assert result["r_feat_age"] > 0.6, result


def test_benchmark_prints_table(tmp_path, bench, capsys):
    generate_site(tmp_path, "brussels", 6, resolution=4.0, session_fraction=0, progress=False)
    assert bench.main(["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "brussels" in out and "r(sdmt,lesion)" in out
    assert "oracle R2" in out and "mean MAE" in out and "latents only" in out


def test_ms_scores_fall_with_lesion_load_and_age():
    rng = np.random.default_rng(0)
    subjects = [draw_subject(rng, f"sub-{i}", "ms", (20.0, 65.0)) for i in range(3000)]
    states = [scan_state(s) for s in subjects]
    sdmt = np.array([s.sdmt for s in states])
    lesion = np.array([s.lesion_ml for s in states])
    bio = np.array([s.bio_age for s in states])
    assert 45 < sdmt.mean() < 55 and 9 < sdmt.std() < 15
    assert lesion.min() < 0.5 and lesion.max() > 20
    assert np.corrcoef(np.log1p(lesion), sdmt)[0, 1] < -0.2
    assert -0.5 <= np.corrcoef(bio, sdmt)[0, 1] <= -0.25  # brain age explains only part of SDMT


def test_healthy_scores_fall_with_age():
    rng = np.random.default_rng(0)
    states = [scan_state(draw_subject(rng, "s", "healthy", (20.0, 86.0))) for _ in range(2000)]
    age = np.array([s.age for s in states])
    sdmt = np.array([s.sdmt for s in states])
    slope = np.polyfit(age, sdmt, 1)[0]
    assert -0.4 < slope < -0.2
    assert 55 < sdmt[age < 25].mean() < 65


def test_lesions_render_their_volume_and_darken_the_image():
    template = load_template(4.0)
    spacing = np.diag(template.affine)[:3]
    blobs = lesion_layout(np.random.default_rng(0), template, "ms", 5.0)
    rendered = render_lesions(template.gm.shape, spacing, blobs, 5.0).sum() * np.prod(spacing) / 1000
    assert 4.0 < rendered < 5.5
    subject = draw_subject(np.random.default_rng(1), "sub-1", "ms", (20.0, 65.0))
    heavy, _ = synthesize_scan(replace(subject, lesion_ml=30.0), 0.0, 0, get_site("prague"), 4.0)
    light, _ = synthesize_scan(replace(subject, lesion_ml=0.0), 0.0, 0, get_site("prague"), 4.0)
    darker = (light.astype(float) - heavy.astype(float)) > 0.15 * float(light.max())
    darker_ml = darker.sum() * 4.0**3 / 1000
    assert 5.0 < darker_ml < 60.0  # the 30 ml lesions show as hypointense tissue
    assert ((heavy.astype(float) - light.astype(float)) > 0.15 * float(light.max())).sum() == 0


def test_ms_site_writes_clinical_columns(tmp_path):
    site = generate_site(tmp_path, "greifswald", 6, resolution=4.0, session_fraction=0.5, progress=False)
    rows = read_tsv(site / "participants.tsv")
    assert {"lesion_ml", "disease_duration"} <= set(rows[0])
    assert all(float(r["lesion_ml"]) > 0 and 20 <= float(r["age"]) <= 65 for r in rows)
    sessions = read_tsv(next(site.glob("sub-*/sub-*_sessions.tsv")))
    assert float(sessions[1]["disease_duration"]) > float(sessions[0]["disease_duration"])
