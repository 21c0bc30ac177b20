"""Batched augmentation on the device that holds the batch.

Per-volume CPU augmentation (torchio RandomAffine + RandomFlip, ~0.26 s per
1 mm volume) caps training throughput far below the GPU; these cheap
transforms (integer shift, left-right flip, intensity jitter) run on the
whole batch at once on the GPU.

Random parameters are drawn on the CPU (reproducible under one seed on any
device) and reach the device in one non-blocking copy from pinned memory: a
plain ``.to("cuda")`` from pageable memory makes the host wait for every
kernel already queued, which would stall the GPU once per training step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GPUAugment(nn.Module):
    """Random shift (+-``max_shift`` voxels, edge-replicated), L-R flip, intensity scale/offset/gamma.

    Input ``[B, C, D, H, W]`` (fp16 or fp32, any device; the first spatial axis
    is left-right after RAS canonicalisation). Output has the same shape,
    dtype and device. Parameters are drawn per sample from ``generator`` (a CPU
    ``torch.Generator``) or from torch's global RNG when it is None, so runs
    are reproducible under ``seed_everything``.
    """

    def __init__(
        self,
        max_shift: int = 4,
        flip_p: float = 0.5,
        scale: float = 0.1,
        offset: float = 0.1,
        gamma: float = 0.0,
        enabled: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.max_shift = int(max_shift)
        self.flip_p = float(flip_p)
        self.scale = float(scale)
        self.offset = float(offset)
        self.gamma = float(gamma)
        self.enabled = enabled
        self.generator = generator

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.generator)

    def _draw(self, b: int) -> tuple[list[list[int]], torch.Tensor]:
        """Per-sample shifts (host ints) and ``[4, b]`` flip / gamma / scale / offset, in a fixed draw order."""
        m = self.max_shift
        shifts = torch.randint(-m, m + 1, (b, 3), generator=self.generator).tolist() if m > 0 else []
        flip = (torch.rand(b, generator=self.generator) < self.flip_p).float() if self.flip_p > 0 else torch.zeros(b)
        gamma = torch.exp(self._uniform(b, -self.gamma, self.gamma)) if self.gamma > 0 else torch.ones(b)
        if self.scale > 0 or self.offset > 0:
            scale = self._uniform(b, 1 - self.scale, 1 + self.scale)
            offset = self._uniform(b, -self.offset, self.offset)
        else:
            scale, offset = torch.ones(b), torch.zeros(b)
        return shifts, torch.stack([flip, gamma, scale, offset])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if x.ndim != 5:
            raise ValueError(f"GPUAugment expects [B, C, D, H, W], got shape {tuple(x.shape)}")
        b, dtype = x.shape[0], x.dtype
        shifts, params = self._draw(b)
        flip, gamma, scale, offset = to_device(params, x.device).view(4, b, 1, 1, 1, 1)
        out = x.float()
        if shifts:
            m = self.max_shift
            padded = F.pad(out, (m, m, m, m, m, m), mode="replicate")
            d, h, w = out.shape[2:]
            out = torch.stack([
                padded[i, :, m + sd:m + sd + d, m + sh:m + sh + h, m + sw:m + sw + w]
                for i, (sd, sh, sw) in enumerate(shifts)
            ])
        if self.flip_p > 0:
            out = torch.where(flip > 0.5, out.flip(2), out)
        if self.gamma > 0:
            low = out.amin(dim=(1, 2, 3, 4), keepdim=True)
            span = (out.amax(dim=(1, 2, 3, 4), keepdim=True) - low).clamp_min(1e-6)
            out = ((out - low) / span).pow(gamma) * span + low
        if self.scale > 0 or self.offset > 0:
            out = out * scale + offset
        return out.to(dtype)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t.to(device)`` that does not make the host wait for queued GPU work (pinned, non-blocking on CUDA).

    The pinned copy comes from torch's caching host allocator, which keeps it alive until the transfer ends.
    """
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
