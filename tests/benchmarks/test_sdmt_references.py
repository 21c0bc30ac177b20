"""SDMT references: a ridge fitted from the sites' summed statistics, rows keyed like the runs' predictions."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

import replication  # noqa: E402
import sdmt_references as refs  # noqa: E402

from neurofed.data.synth import generate_site  # noqa: E402
from neurofed.models import BrainAgeModule  # noqa: E402
from neurofed.predictions import DERIVATIVE_DIR, RUNS_DIR, run_folder, write_site_table  # noqa: E402


def test_summed_site_statistics_give_the_pooled_ridge():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)) * [1.0, 5.0, 0.2] + [0.0, 10.0, -3.0]
    y = 2.0 + x @ np.array([1.5, -0.3, 4.0]) + rng.normal(0.0, 0.01, 60)
    pooled = refs.RidgeSums.of(x, y)
    summed = refs.RidgeSums.of(x[:10], y[:10]) + refs.RidgeSums.of(x[10:35], y[10:35]) + refs.RidgeSums.of(x[35:], y[35:])
    for penalty in (1e-6, 10.0):
        a, b = pooled.solve(penalty), summed.solve(penalty)
        assert a[0] == pytest.approx(b[0]) and np.allclose(a[1], b[1])
    intercept, coef = summed.solve(1e-9)  # almost no penalty: least squares on the stacked rows
    least_squares = np.linalg.lstsq(np.c_[np.ones(60), x], y, rcond=None)[0]
    assert intercept == pytest.approx(least_squares[0], abs=1e-5) and np.allclose(coef, least_squares[1:], atol=1e-6)
    assert np.allclose(coef, [1.5, -0.3, 4.0], atol=0.05)
    # a large penalty shrinks the standardised coefficients toward zero
    assert np.abs(summed.solve(1e4)[1]).sum() < 0.5 * np.abs(coef).sum()


def test_the_penalty_is_chosen_on_validation_scans():
    rng = np.random.default_rng(1)
    signal = lambda n: rng.normal(size=(n, 1))  # noqa: E731
    x = {"a": {"train": signal(40), "val": signal(20)}, "b": {"train": signal(30), "val": signal(10)}}
    y = {s: {sp: 3.0 * v[:, 0] + rng.normal(0, 0.1, len(v)) for sp, v in d.items()} for s, d in x.items()}
    _, coef, penalty = refs.federated_ridge(x, y, penalties=(0.01, 1e5))
    assert penalty == 0.01 and coef[0] == pytest.approx(3.0, abs=0.1)
    noise = {s: {sp: rng.normal(0, 1.0, len(v)) for sp, v in d.items()} for s, d in x.items()}
    assert refs.federated_ridge(x, noise, penalties=(0.01, 1e5))[2] == 1e5  # no signal: shrink it all


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("ms")
    roots = [generate_site(root, site, 8, resolution=4.0, session_fraction=0.5, seed=3, progress=False)
             for site in ("greifswald", "prague")]
    settings = refs.SplitSettings(split=(0.5, 0.25, 0.25), split_seed=5, cache_dir=str(root / "cache"), batch_size=4)
    seed_everything(0)
    source = BrainAgeModule(channels=[4, 4, 4, 4, 6], dropout=0.0, channels_last=False)
    batch = {"image": torch.randn(4, 1, 48, 56, 48).half(), "target": torch.rand(4) * 40 + 30,
             "participant_id": ["a"] * 4, "session": [""] * 4, "site": ["x"] * 4}
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, max_steps=1, default_root_dir=root)
    trainer.fit(source, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    checkpoint = root / "brain_age.ckpt"
    trainer.save_checkpoint(checkpoint)
    return roots, settings, checkpoint


def test_references_predict_the_test_scans_keyed_like_the_runs(tiny_cohort):
    roots, settings, checkpoint = tiny_cohort
    rows = refs.reference_predictions(roots, settings, checkpoint)
    assert list(rows) == list(refs.REFERENCES)
    # what a run writes at each site for this split, read back the way the replication reads it
    for site in refs.load_sites(roots, settings):
        table = [{"participant_id": r.participant_id, "session": r.session, "split": split, "target": r.label,
                  "prediction": 0.0, "gap": None, "gap_corrected": None}
                 for split, records in site.scans.items() for r in records]
        path = site.root / DERIVATIVE_DIR / RUNS_DIR / run_folder("run") / "desc-sdmt_predictions.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_site_table(table, path, "sdmt")
    expected, _ = replication.read_test_predictions([str(r) for r in roots], "run", "sdmt")
    keys = {(r["site"], r["subject"], r["session"]): r["target"] for r in expected}
    assert any(k[2].startswith("ses-") for k in keys) and any(k[2] == "n/a" for k in keys)
    for model, predicted in rows.items():
        assert {(r["site"], r["subject"], r["session"]) for r in predicted} == set(keys), model
        for r in predicted:
            assert r["target"] == pytest.approx(keys[(r["site"], r["subject"], r["session"])], abs=1e-3)
            assert np.isfinite(r["prediction"]), model


def test_the_linear_probe_reads_the_backbone_with_each_site_statistics(tiny_cohort):
    roots, settings, checkpoint = tiny_cohort
    sites = refs.load_sites(roots, settings)
    features = [refs.backbone_features(site, checkpoint) for site in sites]
    assert all(f["train"].shape == (len(s.scans["train"]), 6) for f, s in zip(features, sites))
    # the same scans seen through another site's statistics give other features: normalisation is per site
    swapped = refs.Site(sites[0].name, sites[0].root, sites[1].datamodule, sites[0].scans)
    assert not np.allclose(refs.backbone_features(swapped, checkpoint)["test"], features[0]["test"])
