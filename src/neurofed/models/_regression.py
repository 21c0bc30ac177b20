"""Shared LightningModule machinery for models that predict one number per scan (brain age, SDMT).

Why one base class: both tasks need identical step contracts (see docs/architecture.md), identical epoch metrics
built from poolable sufficient statistics, and identical behaviour under Lightning's ``Trainer`` and under
the Fabric-based federated trainer. Subclasses supply only the head and the loss.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn

from neurofed.metrics import RegressionStats

__all__ = ["RegressionModule", "require_out_features"]

log = logging.getLogger(__name__)

_N = len(RegressionStats.FIELDS)
# Per-dataloader accumulator layout: model stats, baseline stats, loss sum, example count.
_ACC_SIZE = 2 * _N + 2


def require_out_features(backbone: nn.Module, owner: str) -> int:
    """The backbone's feature size, read from its ``out_features`` attribute (the head is built from it)."""
    out_features = getattr(backbone, "out_features", None)
    if not isinstance(out_features, int) or isinstance(out_features, bool) or out_features <= 0:
        raise ValueError(
            f"{owner}: backbone {type(backbone).__name__} has no positive integer `out_features` attribute. "
            "Set `self.out_features = <size of the [B, F] features forward() returns>` in its __init__."
        )
    return out_features


class RegressionModule(LightningModule):
    """Backbone + head regressing a scalar; subclasses implement ``forward`` and ``_loss_and_pred``.

    Epoch metrics (``{stage}/mae, rmse, r, r2, loss, baseline_mae``) come from ``RegressionStats`` summed
    over the epoch (and over the processes of a site), so they equal the metrics of all predictions at once.
    The baseline predicts ``target_mean`` (the training-label mean) for every scan.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_scale", torch.ones(()))
        self._accumulators: dict[str, dict[int, torch.Tensor]] = {}
        self.last_epoch_metrics: dict[str, dict[str, float]] = {}
        self.fabric_log_every_n_steps = 50
        self._fabric_steps = 0

    # -- construction ------------------------------------------------------------------------------------
    def _apply_memory_format(self, channels_last: bool) -> None:
        """channels_last_3d makes cuDNN pick much faster 3-D kernels under bf16 (see DESIGN.md anchors)."""
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.to(memory_format=fmt)
        if channels_last:
            # A 1x1x1 kernel lies the same in memory either way, but its gradient comes back with contiguous
            # strides and DDP, which compares strides, warns once per parameter. Use the gradient's strides.
            for p in self.parameters():
                if p.dim() == 5 and tuple(p.shape[2:]) == (1, 1, 1):
                    p.data = p.data.clone(memory_format=torch.contiguous_format)

    def set_target_mean(self, value: float) -> None:
        """Mean training label: the L1 head's offset and the baseline prediction."""
        self.target_mean.fill_(float(value))

    def set_target_stats(self, mean: float, sd: float | None = None) -> None:
        """Mean and SD of the training labels: the L1 head predicts ``mean + sd * output``.

        Why: a freshly initialised head outputs values near zero; scaled by the label SD (about 17 years for
        brain age) it starts in the right range, so the optimizer need not first grow the head's weights
        by an order of magnitude. That matters most on small cohorts and short CPU runs.
        """
        self.set_target_mean(mean)
        if sd is not None and math.isfinite(sd) and sd > 0:
            self.target_scale.fill_(float(sd))

    @staticmethod
    def label_moments(stats: tuple) -> tuple[float, float | None]:
        """(mean, SD) from ``train_target_stats()``: (sum, count) or (sum, count, sum of squares)."""
        total, count = float(stats[0]), float(stats[1])
        mean = total / count
        if len(stats) < 3 or count < 2:
            return mean, None
        variance = max(float(stats[2]) / count - mean * mean, 0.0)
        return mean, math.sqrt(variance)

    # -- subclass interface ----------------------------------------------------------------------------------
    def _loss_and_pred(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar mean loss, [B] float32 predictions)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _loss_and_pred")

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; only trainable parameters."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "name": "all"}]

    # -- batch handling ----------------------------------------------------------------------------------------
    def _image(self, batch: dict[str, Any]) -> torch.Tensor:
        image = batch["image"]
        if self.hparams.get("channels_last", False) and image.dim() == 5:
            return image.to(dtype=torch.float32, memory_format=torch.channels_last_3d)
        return image.float()

    @staticmethod
    def _target(batch: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
        return batch["target"].to(device=like.device, dtype=torch.float32).reshape(-1)

    def _attached(self) -> bool:
        """True under Lightning's Trainer or Fabric; ``self.trainer`` itself raises when neither is attached."""
        return self._trainer is not None or self._fabric is not None

    # -- steps ---------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image = self._image(batch)
        loss, _ = self._loss_and_pred(image, self._target(batch, image))
        if self._trainer is not None:
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=image.shape[0])
        elif self._fabric is not None:
            # Fabric logs immediately, which reads the loss back to the host: doing that every step would
            # stall the GPU queue, so log every ``fabric_log_every_n_steps`` like Lightning's Trainer does.
            if self._fabric_steps % self.fabric_log_every_n_steps == 0:
                self.log("train/loss", loss.detach())
            self._fabric_steps += 1
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int) -> dict[str, torch.Tensor]:
        image = self._image(batch)
        target = self._target(batch, image)
        loss, pred = self._loss_and_pred(image, target)
        pred = pred.detach().float()
        loss = loss.detach()
        baseline = self.target_mean.float().expand_as(target)
        row = torch.cat([
            RegressionStats.tensor_from_predictions(pred, target),
            RegressionStats.tensor_from_predictions(baseline, target),
            (loss.double() * target.numel()).reshape(1),
            torch.full((1,), float(target.numel()), dtype=torch.float64, device=loss.device),  # a fill, not a copy
        ])
        stage_acc = self._accumulators.setdefault(stage, {})
        stage_acc[dataloader_idx] = stage_acc[dataloader_idx] + row if dataloader_idx in stage_acc else row
        return {"loss": loss, "pred": pred, "target": target}

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._eval_step("test", batch, dataloader_idx)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        image = self._image(batch)
        pred = self(image).detach().float()
        size = pred.shape[0]
        return {
            "pred": pred,
            "target": self._target(batch, pred) if "target" in batch else torch.full_like(pred, float("nan")),
            "participant_id": list(batch.get("participant_id", [""] * size)),
            "session": list(batch.get("session", [""] * size)),
            "site": list(batch.get("site", [""] * size)),
        }

    # -- epoch metrics -----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._accumulators.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._accumulators.pop("test", None)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _sum_across_processes(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the processes of this site (DDP); the federation pools across sites separately."""
        if self._fabric is not None:
            if self._fabric.world_size > 1:
                return self._fabric.all_reduce(t, reduce_op="sum")
        elif self._trainer is not None and self._trainer.world_size > 1:
            return self._trainer.strategy.reduce(t, reduce_op="sum")
        return t

    def _site_names(self, count: int) -> list[str]:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "site_names", None)
        if isinstance(names, (list, tuple)) and len(names) == count:
            return [str(n) for n in names]
        return [f"dataloader{i}" for i in range(count)]

    @staticmethod
    def _row_metrics(row: torch.Tensor) -> dict[str, float]:
        model = RegressionStats.from_tensor(row[:_N]).compute()
        baseline = RegressionStats.from_tensor(row[_N : 2 * _N]).compute()
        loss_sum, count = row[2 * _N].item(), row[2 * _N + 1].item()
        return {
            "mae": model["mae"],
            "rmse": model["rmse"],
            "r": model["r"],
            "r2": model["r2"],
            "loss": loss_sum / count if count > 0 else float("nan"),
            "baseline_mae": baseline["mae"],
        }

    def _log_epoch(self, stage: str) -> None:
        accumulated = self._accumulators.pop(stage, {})
        if not accumulated:
            return
        count = max(accumulated) + 1
        device = next(iter(accumulated.values())).device
        table = torch.zeros(count, _ACC_SIZE, dtype=torch.float64, device=device)
        for index, row in accumulated.items():
            table[index] = row
        table = self._sum_across_processes(table).cpu()
        results = {"pooled": self._row_metrics(table.sum(0))}
        if count > 1:
            for name, row in zip(self._site_names(count), table):
                results[name] = self._row_metrics(row)
        self.last_epoch_metrics[stage] = results["pooled"]
        if not self._attached():
            return
        metrics = {}
        for group, values in results.items():
            prefix = stage if group == "pooled" else f"{stage}/{group}"
            metrics.update({f"{prefix}/{k}": torch.tensor(v, dtype=torch.float32) for k, v in values.items()})
        self.log_dict(metrics, add_dataloader_idx=False)

    # -- fit setup -------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Take the label mean from the datamodule (Lightning's Trainer; the federated trainer pools it itself)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        stats = getattr(datamodule, "train_target_stats", None)
        if callable(stats):
            values = stats()
            if values[1] > 0:
                mean, sd = self.label_moments(values)
                self.set_target_stats(mean, sd)
                log.info("target mean %.4f, SD %s from %d training labels", mean, sd, values[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
