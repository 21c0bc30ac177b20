"""The base of neurofed's heads: a LightningModule that predicts one number per scan (brain age, SDMT, ...).

Why one base class: every head needs the same step contract (see docs/architecture.md), the same epoch
metrics built from poolable sufficient statistics (:class:`~neurofed.metrics.SplitStats`), and the same
behaviour under Lightning's ``Trainer`` and under the federated trainer. A new head subclasses
:class:`RegressionModule` and supplies only ``forward`` and ``_loss_and_pred``.

Who logs what: under Lightning's ``Trainer`` the module logs its own ``train/loss`` and epoch metrics. Under
the federated trainer it logs nothing; the trainer logs each round's site and pooled metrics itself, so
one quantity has one name and one curve.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn

from neurofed.federated.dp_sgd import is_empty_batch
from neurofed.lightning_compat import attached_trainer
from neurofed.metrics import SplitStats

__all__ = ["RegressionModule", "require_out_features"]

log = logging.getLogger(__name__)


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

    Under Lightning's ``Trainer``, epoch metrics (``{stage}/mae, rmse, r, r2, loss, baseline_mae``) come from
    :class:`~neurofed.metrics.SplitStats` summed over the epoch (and over the processes), so they equal the
    metrics of all predictions at once. The baseline predicts ``target_mean`` (the training-label mean) for
    every scan.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_scale", torch.ones(()))
        self._accumulators: dict[str, dict[int, torch.Tensor]] = {}
        self.last_epoch_metrics: dict[str, dict[str, float]] = {}

    # -- construction ------------------------------------------------------------------------------------
    def _apply_memory_format(self, channels_last: bool) -> None:
        """channels_last_3d makes cuDNN pick much faster 3-D kernels under bf16 (2.5x on an H100, README)."""
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

    # -- steps ---------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if is_empty_batch(batch):  # DP-SGD's Poisson sampling drew no scan: the step is noise only
            return None
        image = self._image(batch)
        loss, _ = self._loss_and_pred(image, self._target(batch, image))
        if attached_trainer(self) is not None:
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=image.shape[0])
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int) -> dict[str, torch.Tensor]:
        image = self._image(batch)
        target = self._target(batch, image)
        loss, pred = self._loss_and_pred(image, target)
        pred, loss = pred.detach().float(), loss.detach()
        if attached_trainer(self) is not None:  # the federated trainer accumulates the returned outputs itself
            row = SplitStats.batch(loss, pred, target, self.target_mean.float())
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

    def _log_epoch(self, stage: str) -> None:
        accumulated = self._accumulators.pop(stage, {})
        trainer = attached_trainer(self)
        if not accumulated or trainer is None:
            return
        count = max(accumulated) + 1
        device = next(iter(accumulated.values())).device
        table = torch.zeros(count, SplitStats.WIDTH, dtype=torch.float64, device=device)
        for index, row in accumulated.items():
            table[index] = row
        if trainer.world_size > 1:
            table = trainer.strategy.reduce(table, reduce_op="sum")
        table = table.cpu()
        results = {"pooled": _epoch_metrics(table.sum(0))}
        if count > 1:
            for name, row in zip(_site_names(trainer, count), table):
                results[name] = _epoch_metrics(row)
        self.last_epoch_metrics[stage] = results["pooled"]
        metrics = {}
        for group, values in results.items():
            prefix = stage if group == "pooled" else f"{stage}/{group}"
            metrics.update({f"{prefix}/{k}": torch.tensor(v, dtype=torch.float32) for k, v in values.items()})
        self.log_dict(metrics, add_dataloader_idx=False)

    # -- fit setup -------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Take the label mean from the datamodule (Lightning's Trainer; the federated trainer pools it itself)."""
        datamodule = getattr(attached_trainer(self), "datamodule", None)
        stats = getattr(datamodule, "train_target_stats", None)
        if callable(stats):
            values = stats()
            if values[1] > 0:
                mean, sd = self.label_moments(values)
                self.set_target_stats(mean, sd)
                log.info("target mean %.4f, SD %s from %d training labels", mean, sd, values[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


_EPOCH_KEYS = ("mae", "rmse", "r", "r2", "loss", "baseline_mae")


def _epoch_metrics(row: torch.Tensor) -> dict[str, float]:
    """The logged subset of :meth:`SplitStats.compute` for one summed row."""
    computed = SplitStats.from_row(row, with_baseline=True).compute()
    return {k: computed[k] for k in _EPOCH_KEYS}


def _site_names(trainer: Any, count: int) -> list[str]:
    """Names of a pooled datamodule's roots (one per test loader), else ``dataloader<i>``."""
    names = getattr(getattr(trainer, "datamodule", None), "site_names", None)
    if isinstance(names, (list, tuple)) and len(names) == count:
        return [str(n) for n in names]
    return [f"dataloader{i}" for i in range(count)]
