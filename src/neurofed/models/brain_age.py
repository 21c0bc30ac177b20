"""Brain-age regression from T1-weighted MRI: SFCN features + soft-label bins (KL) or a plain L1 head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from neurofed.models.losses import AgeBins, expected_value, soft_label_kl
from neurofed.models.regression import RegressionModule, require_out_features
from neurofed.models.sfcn import SFCN

__all__ = ["BrainAgeModule"]


class BrainAgeModule(RegressionModule):
    """Predicts age in years from a ``[B, C, D, H, W]`` scan.

    ``loss="kl"``: the head gives a distribution over ``age_range`` bins, trained against a Gaussian soft
    label (σ = ``sigma``) and read out as its expectation. ``loss="l1"``: one output added to
    ``target_mean`` (the mean training age), trained with L1. ``in_channels``, ``channels``, ``dropout`` and
    ``norm`` (``"batch"``, or ``"group"`` for DP-SGD and scanner shift) configure the default SFCN and are ignored when a ``backbone`` is given (it must expose
    ``out_features``; it is not saved as a hyperparameter, so pass it again to ``load_from_checkpoint``).

    Args:
        backbone: Feature extractor to use instead of the default SFCN (any ``nn.Module`` with
            ``out_features``, given by class_path and init_args); the SFCN options below are then ignored.
        in_channels: Input channels of the SFCN: one per modality (set from the data's modalities by the CLI).
        channels: Output channels of the SFCN's blocks; the last is the feature size. Peng et al.'s SFCN:
            32, 64, 128, 256, 256, 64; divide them for a CPU (the CPU configs use a quarter).
        dropout: Dropout before the head.
        loss: ``"kl"``: soft-label KL over age bins (Peng et al.); ``"l1"``: mean absolute error in years.
        age_range: Lowest and highest age of the bins (years; ``loss="kl"`` only).
        bin_width: Width of an age bin in years (``loss="kl"`` only).
        sigma: Standard deviation of the Gaussian soft label in years (``loss="kl"`` only).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        channels_last: Use the channels_last_3d memory format (faster on GPUs with bf16).
        norm: ``"batch"`` (BatchNorm, the paper's) or ``"group"`` (GroupNorm: needed by DP-SGD).
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256, 256, 64),
        dropout: float = 0.5,
        loss: Literal["l1", "kl"] = "kl",
        age_range: tuple[float, float] = (14.0, 94.0),
        bin_width: float = 1.0,
        sigma: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        channels_last: bool = True,
        norm: Literal["batch", "group"] = "batch",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        if loss not in ("l1", "kl"):
            raise ValueError(f"neurofed.models.brain_age: loss must be 'l1' or 'kl', got {loss!r}.")
        self.backbone = backbone if backbone is not None else SFCN(in_channels, channels, dropout, norm)
        features = require_out_features(self.backbone, "neurofed.models.brain_age.BrainAgeModule")
        bins = AgeBins(age_range, bin_width)
        self.register_buffer("bin_centers", bins.centers, persistent=False)
        self.head = nn.Linear(features, bins.n_bins if loss == "kl" else 1)
        if loss == "l1":
            nn.init.zeros_(self.head.bias)
        self._apply_memory_format(channels_last)

    def _head_output(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(image)).float()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``[B]`` predicted ages."""
        out = self._head_output(image)
        if self.hparams.loss == "kl":
            return expected_value(out.log_softmax(dim=-1), self.bin_centers)
        return self.target_mean + self.target_scale * out.squeeze(-1)

    def _loss_and_pred(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._head_output(image)
        if self.hparams.loss == "kl":
            log_probs = out.log_softmax(dim=-1)
            loss = soft_label_kl(log_probs, target, self.bin_centers, self.hparams.sigma)
            return loss, expected_value(log_probs, self.bin_centers)
        pred = self.target_mean + self.target_scale * out.squeeze(-1)
        return F.l1_loss(pred, target), pred
