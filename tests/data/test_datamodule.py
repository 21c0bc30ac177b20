import math

import pytest
import torch

from neurofed.data import BrainMRIDataModule, NeurofedDataError

SMALL = dict(spacing=4.0, shape=(24, 28, 24), batch_size=4)


def _dm(root, tmp_path, **kwargs):
    return BrainMRIDataModule(root, cache_dir=str(tmp_path / "cache"), **{**SMALL, **kwargs})


def test_end_to_end_batches(tiny_bids, tmp_path):
    dm = _dm(str(tiny_bids), tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_channels == 1 and dm.site_names == ["tiny"] and dm.report.ok
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "target", "participant_id", "session", "site", "augment"}
    assert batch["image"].dtype == torch.float16 and batch["image"].shape == (4, 1, 24, 28, 24)
    assert batch["target"].dtype == torch.float32 and batch["target"].shape == (4,)
    assert batch["augment"].dtype == torch.bool and batch["augment"].all()
    assert isinstance(batch["participant_id"], list) and batch["site"] == ["tiny"] * 4
    out = dm.on_after_batch_transfer(batch, 0)
    assert "augment" not in out and "augment" in batch
    assert out["image"].shape == batch["image"].shape and out["image"].dtype == torch.float16
    assert not torch.equal(out["image"], batch["image"])
    val = next(iter(dm.val_dataloader()))
    assert "augment" not in val and dm.on_after_batch_transfer(val, 0) is val
    total, count, squares = dm.train_target_stats()
    assert count == len(dm.train_records) and total == pytest.approx(sum(r.label for r in dm.train_records))
    # subjects never straddle splits; all scans are predictable
    train_ids = {r.participant_id for r in dm.train_records}
    held_out = {r.participant_id for r in dm.val_records + dm.test_records[0]}
    assert not train_ids & held_out and len(train_ids | held_out) == 12
    assert sum(len(b["target"]) for b in dm.predict_dataloader()) == 15


def test_shuffling_is_reproducible(tiny_bids, tmp_path):
    order = []
    for _ in range(2):
        dm = _dm(str(tiny_bids), tmp_path)
        dm.setup("fit")
        order.append([pid for b in dm.train_dataloader() for pid in b["participant_id"]])
    assert order[0] == order[1]


def test_missing_labels_excluded_but_predicted(make_bids, tmp_path):
    root = make_bids(tmp_path / "ds", n_subjects=6, sessions_every=0, label_columns=("age", "sex"))
    dm = _dm(str(root), tmp_path, augment=False)
    tsv = root / "participants.tsv"
    lines = tsv.read_text().splitlines()
    lines[1] = lines[1].split("\t")[0] + "\tn/a\tF"
    tsv.write_text("\n".join(lines) + "\n")
    dm.setup("fit")
    assert dm.report.counts["missing_label"] == 1
    labeled = dm.train_records + dm.val_records + dm.test_records[0]
    assert len(labeled) == 5 and "sub-01" not in {r.participant_id for r in labeled}
    assert any(math.isnan(r.label) for r in dm.predict_records) and len(dm.predict_records) == 6
    assert "augment" not in next(iter(dm.train_dataloader()))
    with pytest.raises(NeurofedDataError):
        _dm(str(root), tmp_path, strict=True).setup("fit")


def test_several_sites(tiny_sites, tmp_path):
    dm = _dm([str(p) for p in tiny_sites], tmp_path, max_subjects=5)
    dm.setup("fit")
    assert dm.site_names == ["ixi", "sald", "camcan"]
    tests = dm.test_dataloader()
    assert isinstance(tests, list) and len(tests) == 3
    for loader, site in zip(tests, dm.site_names):
        assert {s for b in loader for s in b["site"]} == {site}
    sites = {s for b in dm.val_dataloader() for s in b["site"]}
    assert sites == {"ixi", "sald", "camcan"}
    assert len({r.participant_id + r.site for r in dm.predict_records}) == 15
    # z-scoring removes the site intensity scales (raw scales differ 3000x)
    means = [float(next(iter(t))["image"].float().abs().mean()) for t in tests]
    assert max(means) / min(means) < 10.0


@pytest.mark.parametrize("resident", [False, True])
def test_lightning_trainer_calls_the_hook(tiny_bids, tmp_path, resident):
    import lightning as L

    seen = []

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, i):
            seen.append(set(batch))
            return (self.w * batch["image"].float().mean() - batch["target"].mean()).abs()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Probe(), datamodule=_dm(str(tiny_bids), tmp_path, resident=resident))
    assert seen and all("augment" not in keys and "volume" not in keys and "image" in keys for keys in seen)


def _small(make_bids, tmp_path, **kwargs):
    return make_bids(tmp_path / "ds", n_subjects=4, sessions_every=0, shape=(16, 16, 16), **kwargs)


def test_no_usable_training_scans_is_one_line_naming_root_and_causes(make_bids, tmp_path):
    root = _small(make_bids, tmp_path)
    for t1 in root.glob("sub-*/anat/*_T1w.nii.gz"):
        t1.write_bytes(b"")  # placeholders, as a half-finished copy leaves them
    dm = _dm(str(root), tmp_path)
    dm.prepare_data()
    with pytest.raises(NeurofedDataError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{root}: no usable training scans")
    assert "0 of 4 indexed scan(s) readable; unreadable (empty file): 4" in message
    assert all(issue.message.startswith(issue.path) for issue in dm.report["unreadable"])  # its own file each
    with pytest.raises(NeurofedDataError, match="no usable scans"):
        _dm(str(root), tmp_path).setup("predict")


def test_filter_that_empties_the_dataset_is_the_stated_cause(make_bids, tmp_path):
    root = _small(make_bids, tmp_path)
    with pytest.raises(NeurofedDataError, match="no usable training scans .*no scan matches acq=mprage: 4"):
        _dm(str(root), tmp_path, acq="mprage").setup("fit")


def test_strict_refuses_a_filter_that_matches_nothing_and_the_summary_says_so(make_bids, tmp_path):
    from neurofed.data import index_bids

    root = _small(make_bids, tmp_path)
    _, report = index_bids(root, acq="mprage")
    assert not report.ok
    assert report.summary().splitlines()[0] == (
        f"data validation: no issues; the filters match no scan at all in {root} (acq=mprage)")
    with pytest.raises(NeurofedDataError, match="strict mode: change the filters"):
        index_bids(root, acq="mprage", strict=True)
    _, partial = index_bids(make_bids(tmp_path / "ses", n_subjects=4, shape=(8, 8, 8)), session="ses-2")
    assert partial.ok and "the filters left out 3 subject(s)" in partial.summary().splitlines()[0]


@pytest.mark.parametrize("damage", ["no participants.tsv", "no label column"])
def test_predict_needs_no_labels_but_fit_does(make_bids, tmp_path, damage):
    root = _small(make_bids, tmp_path, label_columns=("sex",) if damage == "no label column" else ("age",))
    if damage == "no participants.tsv":
        (root / "participants.tsv").unlink()
    dm = _dm(str(root), tmp_path)
    dm.prepare_data()
    dm.setup("predict")
    assert len(dm.predict_records) == 4 and all(math.isnan(r.label) for r in dm.predict_records)
    assert dm.report.ok and any("fine for predict" in n for n in dm.report.notes)
    batch = next(iter(dm.predict_dataloader()))
    assert torch.isnan(batch["target"]).all()
    expected = "missing participants.tsv" if damage == "no participants.tsv" else "label column 'age' not found"
    with pytest.raises(NeurofedDataError, match=expected):
        dm.setup("fit")  # the same data module, now for training


def test_unreadable_file_is_decoded_and_warned_about_once(make_bids, tmp_path, caplog, monkeypatch):
    import neurofed.data.cache as cache_module

    root = _small(make_bids, tmp_path)
    bad = root / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"\x00" * 50)  # a gzip header and nothing readable after it
    decoded = []
    real = cache_module.preprocess
    monkeypatch.setattr(cache_module, "preprocess", lambda p, c, n=None: decoded.append(p) or real(p, c, n))
    dm = _dm(str(root), tmp_path)
    with caplog.at_level("INFO"):
        dm.prepare_data()
        dm.setup("fit")
        dm.setup("test")
    assert sum(str(bad) in str(p) for p in decoded) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum(str(bad) in w for w in warnings) == 1
    (line,) = [line for w in warnings for line in w.splitlines() if str(bad) in line]
    assert line.count(str(bad)) == 1 and "[unreadable]" in line
