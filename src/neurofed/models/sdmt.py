"""SDMT regression by transfer learning from a brain-age model.

The study compared fine-tuning everything ("deep"), training only a new last layer on frozen features
("shallow"), and freezing the first blocks ("freeze_until=blockN"). Frozen parts stay in eval mode, so
their BatchNorm running statistics do not drift towards the (small) SDMT cohort.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from neurofed.models.brain_age import BrainAgeModule
from neurofed.models.regression import RegressionModule, require_out_features
from neurofed.models.sfcn import SFCN

__all__ = ["SDMTModule", "parse_transfer"]

log = logging.getLogger(__name__)

_FREEZE_UNTIL = re.compile(r"^freeze_until=block(\d+)$")


def parse_transfer(transfer: str, backbone: nn.Module) -> list[str]:
    """Names (relative to the module) of the submodules the transfer mode freezes."""
    if transfer == "deep":
        return []
    if transfer == "shallow":
        return ["backbone"]
    match = _FREEZE_UNTIL.match(transfer)
    if match is None:
        raise ValueError(
            f"neurofed.models.sdmt: unknown transfer {transfer!r}; use 'deep', 'shallow' or "
            "'freeze_until=blockN' (e.g. 'freeze_until=block3')."
        )
    last = int(match.group(1))
    available = [name for name, _ in backbone.named_children() if re.fullmatch(r"block\d+", name)]
    missing = [f"block{i}" for i in range(1, last + 1) if not hasattr(backbone, f"block{i}")]
    if last < 1 or missing:
        raise ValueError(
            f"neurofed.models.sdmt: transfer {transfer!r} names a block the backbone "
            f"{type(backbone).__name__} lacks; available blocks: {available or 'none'}."
        )
    return [f"backbone.block{i}" for i in range(1, last + 1)]


class SDMTModule(RegressionModule):
    """Predicts a cognitive score (SDMT by default) with an L1 head on a (pre-trained) backbone.

    ``brain_age_checkpoint``: a ``BrainAgeModule`` checkpoint whose backbone weights start the model; when
    None, a fresh SFCN(in_channels, channels, dropout) (training from scratch, tests). ``backbone_lr_scale``
    multiplies the learning rate of the trainable backbone parameters. ``label`` documents the target
    column and changes nothing else.

    Reloading a saved SDMTModule rebuilds the architecture from its hyperparameters and then loads all
    weights; if the brain-age checkpoint is no longer at its path, pass ``brain_age_checkpoint=None``.

    Args:
        brain_age_checkpoint: A BrainAgeModule checkpoint whose backbone starts the model; None trains from
            scratch.
        backbone: Feature extractor to use instead of the default SFCN (any ``nn.Module`` with
            ``out_features``, given by class_path and init_args).
        transfer: ``"deep"`` (fine-tune every layer), ``"shallow"`` (train the head only) or
            ``"freeze_until=blockN"`` (freeze SFCN blocks 1..N).
        backbone_lr_scale: Multiplies the learning rate of the backbone's trainable parameters.
        in_channels: Input channels of the SFCN (one per modality).
        channels: Output channels of the SFCN's blocks (must match the brain-age checkpoint's).
        dropout: Dropout before the head.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        channels_last: Use the channels_last_3d memory format (faster on GPUs with bf16).
        label: The target column (documentation only).
        norm: ``"batch"`` or ``"group"`` (GroupNorm: needed by DP-SGD).
    """

    def __init__(
        self,
        brain_age_checkpoint: str | None = None,
        backbone: nn.Module | None = None,
        transfer: str = "deep",
        backbone_lr_scale: float = 1.0,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256, 256, 64),
        dropout: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        channels_last: bool = True,
        label: str = "sdmt",
        norm: Literal["batch", "group"] = "batch",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        if backbone_lr_scale < 0:
            raise ValueError(f"neurofed.models.sdmt: backbone_lr_scale must be >= 0, got {backbone_lr_scale}.")
        if brain_age_checkpoint is not None:
            backbone = self._backbone_from_checkpoint(Path(brain_age_checkpoint), backbone)
        elif backbone is None:
            backbone = SFCN(in_channels, channels, dropout, norm)
        self.backbone = backbone
        self.head = nn.Linear(require_out_features(backbone, "neurofed.models.sdmt.SDMTModule"), 1)
        nn.init.zeros_(self.head.bias)
        self._frozen = parse_transfer(transfer, backbone)
        for name in self._frozen:
            for p in self.get_submodule(name).parameters():
                p.requires_grad_(False)
        self._apply_memory_format(channels_last)
        self.train(self.training)

    def _backbone_from_checkpoint(self, path: Path, backbone: nn.Module | None) -> nn.Module:
        if not path.is_file():
            raise FileNotFoundError(
                f"neurofed.models.sdmt: brain_age_checkpoint {str(path)!r} does not exist. Point it at a "
                "BrainAgeModule .ckpt; when reloading a saved SDMTModule, pass brain_age_checkpoint=None."
            )
        extra: dict[str, Any] = {"backbone": backbone} if backbone is not None else {}
        source = BrainAgeModule.load_from_checkpoint(str(path), map_location="cpu", **extra)
        if backbone is None:
            # Record the checkpoint's architecture so this module's own checkpoint rebuilds it.
            self.hparams.update(
                in_channels=source.hparams.in_channels,
                channels=list(source.hparams.channels),
                dropout=source.hparams.dropout,
                norm=source.hparams.get("norm", "batch"),
            )
        log.info("SDMT backbone initialised from %s", path)
        return source.backbone

    def train(self, mode: bool = True) -> SDMTModule:
        """Switch modes, keeping frozen parts in eval (fixed BatchNorm statistics, no dropout noise)."""
        super().train(mode)
        for name in getattr(self, "_frozen", []):
            self.get_submodule(name).eval()
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        """Backbone (lr × backbone_lr_scale) and head (lr) groups; frozen parameters are left out."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for p in self.head.parameters() if p.requires_grad]
        groups = [
            {"params": backbone, "lr": self.hparams.lr * self.hparams.backbone_lr_scale, "name": "backbone"},
            {"params": head, "lr": self.hparams.lr, "name": "head"},
        ]
        return [g for g in groups if g["params"]]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``[B]`` predicted scores."""
        return self.target_mean + self.target_scale * self.head(self.backbone(image)).float().squeeze(-1)

    def _loss_and_pred(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred = self(image)
        return F.l1_loss(pred, target), pred
