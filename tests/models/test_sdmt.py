"""SDMTModule: transfer modes freeze the right parts, learning rates, weights from a brain-age checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from neurofed.models import BrainAgeModule, SDMTModule

TINY = [4, 4, 4, 4, 4, 4]


def make_batch(size: int = 4, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(size, 1, 32, 32, 32, generator=g).half(),
        "target": torch.rand(size, generator=g) * 40 + 30,
        "participant_id": [f"sub-{i}" for i in range(size)],
        "session": [""] * size,
        "site": ["A"] * size,
    }


def _batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm3d)]


def test_deep_trains_everything_with_scaled_backbone_lr() -> None:
    model = SDMTModule(channels=TINY, transfer="deep", backbone_lr_scale=0.1, lr=1e-3)
    assert all(p.requires_grad for p in model.parameters())
    groups = model.configure_optimizers().param_groups
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == pytest.approx(1e-4) and groups[1]["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.head.parameters()}


def test_shallow_freezes_backbone_and_keeps_batchnorm_in_eval() -> None:
    model = SDMTModule(channels=TINY, transfer="shallow")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    assert model.training and model.head.training and not model.backbone.training
    assert all(not bn.training for bn in _batchnorms(model.backbone))
    groups = model.configure_optimizers().param_groups
    assert [g["name"] for g in groups] == ["head"]
    before = [bn.running_mean.clone() for bn in _batchnorms(model.backbone)]
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimizer = model.configure_optimizers()
    loss = model.training_step(make_batch(), 0)
    loss.backward()
    optimizer.step()
    for bn, mean in zip(_batchnorms(model.backbone), before):
        torch.testing.assert_close(bn.running_mean, mean)
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, frozen[key])


def test_freeze_until_block3() -> None:
    model = SDMTModule(channels=TINY, transfer="freeze_until=block3").train()
    for i in range(1, 7):
        block = getattr(model.backbone, f"block{i}")
        frozen = i <= 3
        assert all(p.requires_grad != frozen for p in block.parameters()), i
        assert block.training != frozen, i
    groups = model.configure_optimizers().param_groups
    trainable_backbone = {id(p) for i in range(4, 7) for p in getattr(model.backbone, f"block{i}").parameters()}
    assert {id(p) for p in groups[0]["params"]} == trainable_backbone


@pytest.mark.parametrize("transfer", ["medium", "freeze_until=block9", "freeze_until=3", "freeze_until=block0"])
def test_bad_transfer(transfer: str) -> None:
    with pytest.raises(ValueError, match="transfer"):
        SDMTModule(channels=TINY, transfer=transfer)


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="brain_age_checkpoint"):
        SDMTModule(brain_age_checkpoint=str(tmp_path / "missing.ckpt"))


def _brain_age_checkpoint(tmp_path: Path) -> tuple[Path, BrainAgeModule]:
    seed_everything(0)
    source = BrainAgeModule(channels=[4, 4, 4, 4, 4, 6], dropout=0.2)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, max_steps=1, default_root_dir=tmp_path)
    trainer.fit(source, train_dataloaders=torch.utils.data.DataLoader([make_batch()], batch_size=None))
    path = tmp_path / "brain_age.ckpt"
    trainer.save_checkpoint(path)
    return path, source


def test_weights_come_from_brain_age_checkpoint(tmp_path: Path) -> None:
    path, source = _brain_age_checkpoint(tmp_path)
    model = SDMTModule(brain_age_checkpoint=str(path), transfer="shallow")
    assert list(model.hparams.channels) == [4, 4, 4, 4, 4, 6] and model.hparams.dropout == pytest.approx(0.2)
    assert model.head.in_features == 6 and model.head.out_features == 1
    source_state = source.backbone.state_dict()
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, source_state[key], rtol=0, atol=0)
    model.set_target_mean(50.0)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, max_steps=1, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([make_batch(seed=1)], batch_size=None))
    saved = tmp_path / "sdmt.ckpt"
    trainer.save_checkpoint(saved)
    path.unlink()  # the SDMT checkpoint must not need the brain-age one any more
    reloaded = SDMTModule.load_from_checkpoint(saved, brain_age_checkpoint=None, map_location="cpu")
    batch = make_batch(size=2)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(model._image(batch)), model(model._image(batch)), rtol=0, atol=0)
    assert reloaded.hparams.transfer == "shallow" and not any(p.requires_grad for p in reloaded.backbone.parameters())


def test_validation_reports_baseline_under_lightning_trainer() -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    model = SDMTModule(channels=TINY, label="sdmt").eval()
    batch = make_batch(size=5)
    model.set_target_mean(45.0)
    with torch.no_grad():
        out = model.validation_step(batch, 0)
    assert set(out) == {"loss", "pred", "target"}
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False)
    trainer.validate(model, dataloaders=DataLoader([batch], batch_size=None))
    metrics = model.last_epoch_metrics["val"]
    assert metrics["baseline_mae"] == pytest.approx((batch["target"] - 45.0).abs().mean().item(), rel=1e-6)
    assert metrics["loss"] == pytest.approx(out["loss"].item(), rel=1e-6)
    assert trainer.callback_metrics["val/baseline_mae"].item() == pytest.approx(metrics["baseline_mae"], rel=1e-6)
