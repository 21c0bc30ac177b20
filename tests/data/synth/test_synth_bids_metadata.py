"""Sidecars and JSON descriptions: every TSV column described, every T1w image with a sidecar."""

import json

import pytest
from timeouts import scaled
from conftest import NO_VALIDATOR, bids_validator

from neurofed.data.synth import generate_site, read_tsv

RES = 4.0


@pytest.fixture(scope="module")
def ms_site(tmp_path_factory):
    return generate_site(tmp_path_factory.mktemp("ms"), "brussels", 6, resolution=RES, seed=3,
                         session_fraction=0.5, progress=False)


def test_every_t1w_has_a_sidecar_that_says_synthetic(ms_site):
    images = sorted(ms_site.glob("sub-*/**/anat/*_T1w.nii.gz"))
    assert len(images) == 9
    for image in images:
        sidecar = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["MagneticFieldStrength"] in (1.5, 3.0) and sidecar["Manufacturer"]
        assert "ynthetic" in sidecar["ImageComments"]


def test_every_column_is_described(ms_site):
    participants = json.loads((ms_site / "participants.json").read_text())
    assert set(read_tsv(ms_site / "participants.tsv")[0]) <= set(participants)
    assert participants["age"]["Units"] == "year"
    sessions = json.loads((ms_site / "sessions.json").read_text())
    for path in ms_site.glob("sub-*/sub-*_sessions.tsv"):
        assert set(read_tsv(path)[0]) <= set(sessions)
    latents = json.loads((ms_site / "sourcedata" / "latents.json").read_text())
    assert set(read_tsv(ms_site / "sourcedata" / "latents.tsv")[0]) <= set(latents)


def test_dataset_description_names_authors_and_generator(ms_site):
    desc = json.loads((ms_site / "dataset_description.json").read_text())
    assert desc["Authors"] and desc["GeneratedBy"][0]["Name"] == "neurofed synth"
    assert desc["GeneratedBy"][0]["Version"] and "site effect 1" in desc["GeneratedBy"][0]["Description"]


def test_latents_hold_every_scan(ms_site):
    rows = read_tsv(ms_site / "sourcedata" / "latents.tsv")
    assert len(rows) == 9
    assert all(float(r["thalamic_loss"]) >= 0 and float(r["lesion_ml"]) > 0 for r in rows)


def test_same_seed_same_metadata_bytes(ms_site, tmp_path):
    again = generate_site(tmp_path, "brussels", 6, resolution=RES, seed=3, session_fraction=0.5, progress=False)
    for name in ("sourcedata/latents.tsv", "participants.tsv", "sessions.json", "dataset_description.json"):
        assert (again / name).read_bytes() == (ms_site / name).read_bytes(), name
    image = min(ms_site.glob("sub-*/**/anat/*_T1w.nii.gz")).relative_to(ms_site)
    assert (again / image).read_bytes() == (ms_site / image).read_bytes()


@pytest.mark.skipif(bids_validator() is None, reason=NO_VALIDATOR)
def test_synthetic_raw_data_passes_the_bids_validator(ms_site):
    import json
    import subprocess

    result = subprocess.run([bids_validator(), "--format", "json", str(ms_site)], capture_output=True, text=True,
                            timeout=scaled(120), check=False)
    issues = json.loads(result.stdout)["issues"]["issues"]
    assert [f"{i['code']} {i.get('location')}" for i in issues if i["severity"] == "error"] == []
    # only warnings that do not matter for synthetic data remain (no made-up DwellTime, one author, no HED)
    assert {i["code"] for i in issues} <= {"TOO_FEW_AUTHORS", "JSON_KEY_RECOMMENDED", "SIDECAR_KEY_RECOMMENDED"}
