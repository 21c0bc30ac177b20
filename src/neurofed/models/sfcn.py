"""SFCN: the Simple Fully Convolutional Network of Peng et al. (2021) as a feature extractor.

Written from the paper's description: five blocks of 3×3×3 convolution, batch norm, 2× max-pooling and
ReLU, a 1×1×1 convolution block, global average pooling and dropout. The classifier is left to the
LightningModule so the same backbone serves brain age (soft-label bins) and SDMT (one regression output).

``norm="group"`` replaces each BatchNorm by a GroupNorm, as Opacus' ``ModuleValidator.fix`` does: batch
statistics mix examples, which per-sample gradients (DP-SGD) forbid, and they are site statistics that
plain FedAvg averages across scanners; GroupNorm normalises each scan on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

__all__ = ["SFCN", "norm_layer"]

#: Channels per group of the GroupNorm variant (at most; fewer groups when a block is narrower).
GROUP_SIZE = 8


def norm_layer(kind: str, channels: int) -> nn.Module:
    """``BatchNorm3d(channels)`` or ``GroupNorm`` with groups of about ``GROUP_SIZE`` channels."""
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        groups = max(1, channels // GROUP_SIZE)
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"neurofed.models.sfcn: norm must be 'batch' or 'group', got {kind!r}.")


class SFCN(nn.Module):
    """3-D CNN mapping ``[B, in_channels, D, H, W]`` to features ``[B, channels[-1]]``.

    Blocks are the attributes ``block1`` .. ``blockN`` (N = len(channels)), so transfer learning can freeze
    "up to block k". Each spatial dimension of the input must be at least ``2 ** (N - 1)``. ``norm`` is
    ``"batch"`` (the paper's) or ``"group"`` (DP-SGD, scanner shift).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256, 256, 64),
        dropout: float = 0.5,
        norm: Literal["batch", "group"] = "batch",
    ) -> None:
        super().__init__()
        norm_layer(norm, 1)  # reject an unknown kind before building anything
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError(
                f"neurofed.models.sfcn: channels needs at least 2 entries (pooling blocks + the 1×1×1 block), "
                f"got {channels}."
            )
        self.in_channels = int(in_channels)
        self.channels = tuple(channels)
        self.norm = norm
        self.num_blocks = len(channels)
        previous = self.in_channels
        for index, width in enumerate(channels[:-1], start=1):
            block = nn.Sequential(
                nn.Conv3d(previous, width, kernel_size=3, padding=1),
                norm_layer(norm, width),
                nn.MaxPool3d(2),
                nn.ReLU(inplace=True),
            )
            self.add_module(f"block{index}", block)
            previous = width
        last = nn.Sequential(
            nn.Conv3d(previous, channels[-1], kernel_size=1),
            norm_layer(norm, channels[-1]),
            nn.ReLU(inplace=True),
        )
        self.add_module(f"block{self.num_blocks}", last)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.out_features = channels[-1]

    def blocks(self) -> list[nn.Module]:
        """The blocks in forward order (block1 first)."""
        return [getattr(self, f"block{i}") for i in range(1, self.num_blocks + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks():
            x = block(x)
        return self.dropout(torch.flatten(self.pool(x), 1))
