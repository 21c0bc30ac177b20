"""BrainAgeModule under Lightning's Trainer and Fabric: steps, metrics, checkpoints, custom backbones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import Logger as FabricLogger
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader

from neurofed.metrics import RegressionStats, SplitStats
from neurofed.models import BrainAgeModule

TINY = [4, 4, 4, 4, 4, 4]


def make_batch(size: int = 4, seed: int = 0, shape: int = 32) -> dict[str, Any]:
    """A batch in the batch format of docs/architecture.md (fp16 images)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(size, 1, shape, shape, shape, generator=g).half(),
        "target": torch.rand(size, generator=g) * 60 + 20,
        "participant_id": [f"sub-{seed}{i}" for i in range(size)],
        "session": [""] * size,
        "site": ["A"] * size,
    }


class FakeDataModule(LightningDataModule):
    """Stands in for BrainMRIDataModule: fixed pre-made batches and aggregate label stats."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        super().__init__()
        self.batches = batches

    def _loader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)

    train_dataloader = val_dataloader = test_dataloader = predict_dataloader = _loader

    def train_target_stats(self) -> tuple[float, int]:
        targets = torch.cat([b["target"] for b in self.batches])
        return float(targets.sum()), targets.numel()


def tiny_trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    options = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return Trainer(**options)


def test_trainer_fit_logs_metrics_and_sets_target_mean(tmp_path: Path) -> None:
    seed_everything(0)
    batches = [make_batch(seed=0), make_batch(seed=1)]
    model = BrainAgeModule(channels=TINY)
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=FakeDataModule(batches))
    expected_mean = torch.cat([b["target"] for b in batches]).mean()
    assert model.target_mean.item() == pytest.approx(expected_mean.item(), rel=1e-6)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "val/mae", "val/rmse", "val/r", "val/r2", "val/loss", "val/baseline_mae"):
        assert key in metrics, key
    model.eval()
    with torch.no_grad():
        outputs = [model.validation_step(b, 0) for b in batches]
    stats = sum(RegressionStats.from_predictions(o["pred"], o["target"]) for o in outputs)
    assert metrics["val/mae"].item() == pytest.approx(stats.compute()["mae"], rel=1e-5)
    baseline = RegressionStats.from_predictions(expected_mean.expand(8), torch.cat([b["target"] for b in batches]))
    assert metrics["val/baseline_mae"].item() == pytest.approx(baseline.compute()["mae"], rel=1e-5)


class TwoSiteDataModule(FakeDataModule):
    """Like BrainMRIDataModule with two roots: one test loader per site, in ``site_names`` order."""

    site_names = ["siteA", "siteB"]

    def test_dataloader(self) -> list[DataLoader]:
        return [DataLoader([b], batch_size=None) for b in self.batches]


def test_per_site_and_pooled_test_metrics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    batches = [make_batch(seed=6), make_batch(seed=7)]
    model = BrainAgeModule(channels=TINY).eval()
    results = tiny_trainer(tmp_path).test(model, datamodule=TwoSiteDataModule(batches), verbose=False)
    metrics = {k: v for r in results for k, v in r.items()}
    with torch.no_grad():
        outputs = [model.test_step(b, 0) for b in batches]
    per_site = [RegressionStats.from_predictions(o["pred"], o["target"]) for o in outputs]
    assert metrics["test/siteA/mae"] == pytest.approx(per_site[0].compute()["mae"], rel=1e-5)
    assert metrics["test/siteB/rmse"] == pytest.approx(per_site[1].compute()["rmse"], rel=1e-5)
    assert metrics["test/r"] == pytest.approx(sum(per_site).compute()["r"], rel=1e-4)


@pytest.mark.parametrize(("loss", "lr", "ratio"), [("kl", 1e-2, 0.5), ("l1", 5e-2, 0.75)])
def test_overfits_one_batch(loss: str, lr: float, ratio: float) -> None:
    torch.manual_seed(0)
    model = BrainAgeModule(channels=[8, 8, 8, 8, 8, 8], dropout=0.0, loss=loss, lr=lr)
    batch = make_batch(size=4)
    model.set_target_mean(batch["target"].mean().item())
    optimizer = model.configure_optimizers()
    losses = []
    for step in range(20):
        optimizer.zero_grad()
        loss_value = model.training_step(batch, step)
        loss_value.backward()
        optimizer.step()
        losses.append(loss_value.item())
    assert losses[-1] < ratio * losses[0]


def test_step_contracts() -> None:
    model = BrainAgeModule(channels=TINY).eval()
    batch = make_batch(size=3)
    with torch.no_grad():
        out = model.validation_step(batch, 0)
        assert set(out) == {"loss", "pred", "target"}
        assert out["pred"].shape == (3,) and out["pred"].dtype == torch.float32 and out["loss"].dim() == 0
        assert model.test_step(batch, 0)["pred"].shape == (3,)
        predicted = model.predict_step(batch, 0)
    assert set(predicted) == {"pred", "target", "participant_id", "session", "site"}
    assert predicted["participant_id"] == batch["participant_id"]
    assert model.backbone.block1[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    plain = BrainAgeModule(channels=TINY, channels_last=False)
    assert plain.backbone.block1[0].weight.is_contiguous()
    torch.testing.assert_close(plain.configure_optimizers().param_groups[0]["lr"], 1e-3)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    seed_everything(1)
    batches = [make_batch(seed=2), make_batch(seed=3)]
    model = BrainAgeModule(channels=TINY, loss="l1")
    trainer = tiny_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=FakeDataModule(batches))
    path = tmp_path / "brain_age.ckpt"
    trainer.save_checkpoint(path)
    loaded = BrainAgeModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.hparams.loss == "l1" and list(loaded.hparams.channels) == TINY
    model.eval()
    loaded.eval()
    with torch.no_grad():
        x = model._image(batches[0])
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.target_mean.item() == model.target_mean.item() != 0.0


class TinyBackbone(nn.Module):
    def __init__(self, out_features: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, out_features, 3, stride=4)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3, 4))


def test_custom_backbone() -> None:
    model = BrainAgeModule(backbone=TinyBackbone(), loss="kl", age_range=(20.0, 80.0), bin_width=2.0)
    assert model.head.in_features == 5 and model.head.out_features == 30
    pred = model(model._image(make_batch(size=2)))
    assert pred.shape == (2,) and ((pred > 20) & (pred < 80)).all()


def test_backbone_without_out_features() -> None:
    backbone = nn.Sequential(nn.Conv3d(1, 4, 3), nn.AdaptiveAvgPool3d(1), nn.Flatten())
    with pytest.raises(ValueError, match="out_features"):
        BrainAgeModule(backbone=backbone)
    with pytest.raises(ValueError, match="'l1' or 'kl'"):
        BrainAgeModule(channels=TINY, loss="mse")


class RecordingLogger(FabricLogger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def test_runs_under_fabric_and_leaves_logging_to_the_loop_that_drives_it() -> None:
    # Under Fabric the federated trainer logs each round's site and pooled metrics itself; a module that logged
    # too would put a second curve under the same names (one metric path, one name per quantity).
    torch.manual_seed(0)
    logger = RecordingLogger()
    fabric = Fabric(accelerator="cpu", devices=1, loggers=[logger])
    module = BrainAgeModule(channels=TINY)
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    batches = [make_batch(seed=4), make_batch(seed=5)]
    model.train()
    loss = model.training_step(batches[0], 0)
    fabric.backward(loss)
    optimizer.step()
    model.eval()
    with torch.no_grad():
        outputs = [model.validation_step(b, i) for i, b in enumerate(batches)]
    module.on_validation_epoch_end()
    assert logger.metrics == []
    stats = sum(RegressionStats.from_predictions(o["pred"], o["target"]) for o in outputs)
    rows = sum(SplitStats.batch(o["loss"], o["pred"], o["target"], module.target_mean) for o in outputs)
    assert SplitStats.from_row(rows, with_baseline=True).compute()["mae"] == pytest.approx(stats.compute()["mae"], rel=1e-9)


def test_channels_last_weights_and_the_strides_ddp_expects():
    model = BrainAgeModule(channels=TINY, channels_last=True)
    convs = [p for p in model.parameters() if p.dim() == 5]
    wide = [p for p in convs if tuple(p.shape[2:]) != (1, 1, 1)]
    pointwise = [p for p in convs if tuple(p.shape[2:]) == (1, 1, 1)]
    assert wide and pointwise
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in wide)
    # 1x1x1 kernels: the strides their gradients come back with, so DDP's bucket views match them
    assert all(p.stride() == torch.empty(p.shape).stride() for p in pointwise)
