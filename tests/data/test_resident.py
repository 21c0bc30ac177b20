"""Resident scans: the same batches as streaming from the cache, indices through the loader, and a site too
large for the device falls back to reading files instead of failing."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from neurofed.data import BrainMRIDataModule, ResidentVolumes
from neurofed.data import resident as resident_module
from neurofed.federated import FederatedTrainer
from neurofed.models import BrainAgeModule

SMALL = dict(spacing=4.0, shape=(24, 28, 24), batch_size=4)


def _dm(root, tmp_path, **kwargs) -> BrainMRIDataModule:
    dm = BrainMRIDataModule(str(root), cache_dir=str(tmp_path / "cache"), **{**SMALL, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _images(dm: BrainMRIDataModule, loader) -> list[torch.Tensor]:
    torch.manual_seed(0)  # augmentation draws from the global RNG
    return [dm.on_after_batch_transfer(batch, 0)["image"] for batch in loader]


def test_store_gathers_the_cached_arrays(tiny_bids, tmp_path):
    dm = _dm(tiny_bids, tmp_path, resident=True)
    store = dm.volumes
    assert len(store) == len(dm.predict_records) == 15
    assert store.nbytes == 15 * 24 * 28 * 24 * 2 and store.device is None
    index = torch.tensor([3, 0, 3, 14])
    batch = store.gather(index)
    assert store.device == torch.device("cpu") and batch.dtype == torch.float16 and batch.shape == (4, 1, 24, 28, 24)
    for row, i in zip(batch, index.tolist()):
        assert torch.equal(row, torch.from_numpy(np.load(store.files[i])))
    store.release()
    assert store.device is None and torch.equal(store.gather(index), batch)


def test_loaders_carry_indices_and_batches_equal_the_streamed_ones(tiny_bids, tmp_path):
    streamed = _dm(tiny_bids, tmp_path, num_workers=1)
    resident = _dm(tiny_bids, tmp_path, num_workers=1, resident=True)
    loader = resident.train_dataloader()
    assert loader.num_workers == 0 and not loader.pin_memory
    first = next(iter(loader))
    assert "image" not in first and first["volume"].dtype == torch.long and first["volume"].shape == (4,)
    assert streamed.train_dataloader().num_workers == 1
    for name in ("train_dataloader", "val_dataloader", "predict_dataloader"):
        a = _images(streamed, getattr(streamed, name)())
        b = _images(resident, getattr(resident, name)())
        assert len(a) == len(b) > 0
        assert all(torch.equal(x, y) for x, y in zip(a, b)), name


def test_resident_training_is_identical_to_streamed_training(tiny_bids, tmp_path):
    weights = []
    for resident in (False, True):
        dm = _dm(tiny_bids, tmp_path, resident=resident)
        torch.manual_seed(0)
        model = BrainAgeModule(channels=[4, 4, 4, 4, 4], dropout=0.0, loss="l1")
        trainer = FederatedTrainer(rounds=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                                   default_root_dir=str(tmp_path / f"run-{resident}"), seed=3)
        trainer.fit(model, dm)
        trainer.close()
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_site_too_large_for_the_device_streams_from_the_cache(tiny_bids, tmp_path, monkeypatch, caplog):
    dm = _dm(tiny_bids, tmp_path, resident=True)
    monkeypatch.setattr(resident_module, "free_device_bytes", lambda device: dm.volumes.nbytes)  # limit is half
    index = torch.tensor([1, 2])
    with caplog.at_level(logging.WARNING, logger="neurofed.data.resident"):
        batch = dm.volumes.gather(index)
        again = dm.volumes.gather(index)
    assert dm.volumes.device is None
    assert sum("reading each batch from the cache" in r.getMessage() for r in caplog.records) == 1
    expected = torch.from_numpy(np.stack([np.load(dm.volumes.files[i]) for i in (1, 2)]))
    assert torch.equal(batch, expected) and torch.equal(again, expected)


def test_resident_batches_need_a_store(tiny_bids, tmp_path):
    dm = _dm(tiny_bids, tmp_path)
    with pytest.raises(RuntimeError, match="resident=True"):
        dm.on_after_batch_transfer({"volume": torch.tensor([0]), "target": torch.zeros(1)}, 0)
    with pytest.raises(ValueError, match="at least one"):
        ResidentVolumes([])


def test_scans_with_identical_contents_share_one_slot(make_bids, tmp_path):
    import shutil

    root = make_bids(tmp_path / "ds", n_subjects=6, sessions_every=0)
    shutil.copyfile(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", root / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
    dm = _dm(root, tmp_path, resident=True, augment=False)
    assert len(dm.predict_records) == 6 and len(dm.volumes) == 5
    positions = {r.participant_id: p for r, p in zip(dm._datasets["predict"].records, dm._datasets["predict"].positions)}
    assert positions["sub-01"] == positions["sub-02"] and len(set(positions.values())) == 5
