"""Soft-label age bins: the SFCN brain-age objective.

The network predicts a distribution over 1-year age bins; the target is a Gaussian (σ = 1 y) centred on the
true age, spread over the bins, and the loss is the KL divergence between the two. The predicted age is
the distribution's expectation. Soft labels make neighbouring ages near-equivalent targets, which is what
made SFCN train well on small cohorts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["AgeBins", "gaussian_soft_labels", "soft_label_kl", "expected_value"]


def _edges(bin_centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper edge of each (equal-width) bin."""
    width = bin_centers[1] - bin_centers[0] if bin_centers.numel() > 1 else bin_centers.new_tensor(1.0)
    return bin_centers - width / 2, bin_centers + width / 2


def gaussian_soft_labels(target_age: torch.Tensor, bin_centers: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """``[B, n_bins]`` probabilities: the N(age, σ²) mass in each bin, renormalised to sum to 1.

    Ages outside the bins' range are clipped into it, so every label has its mass inside the bins.
    """
    if sigma <= 0:
        raise ValueError(f"neurofed.models.losses: sigma must be > 0, got {sigma}.")
    centers = bin_centers.to(dtype=torch.float32)
    low, high = _edges(centers)
    age = target_age.to(device=centers.device, dtype=torch.float32).reshape(-1, 1)
    age = torch.minimum(torch.maximum(age, low[:1]), high[-1:])  # tensor bounds: no device sync
    # The normal CDF directly: torch.distributions would validate its arguments on the host every step.
    mass = (torch.special.ndtr((high - age) / sigma) - torch.special.ndtr((low - age) / sigma)).clamp_min(0.0)
    return mass / mass.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def soft_label_kl(
    log_probs: torch.Tensor, target_age: torch.Tensor, bin_centers: torch.Tensor, sigma: float = 1.0
) -> torch.Tensor:
    """Mean over the batch of KL(soft label ‖ predicted distribution); ``log_probs`` is ``[B, n_bins]``."""
    target = gaussian_soft_labels(target_age.to(log_probs.device), bin_centers.to(log_probs.device), sigma)
    return F.kl_div(log_probs.float(), target, reduction="batchmean")


def expected_value(log_probs: torch.Tensor, bin_centers: torch.Tensor) -> torch.Tensor:
    """``[B]`` expectation of the bin centres under ``exp(log_probs)``."""
    return (log_probs.float().exp() * bin_centers.to(log_probs.device, torch.float32)).sum(dim=-1)


class AgeBins:
    """Equal-width bins covering ``age_range`` (default 14–94 y in 1-year bins: 80 bins)."""

    def __init__(self, age_range: Sequence[float] = (14.0, 94.0), bin_width: float = 1.0) -> None:
        low, high = (float(a) for a in age_range)
        if bin_width <= 0 or high <= low:
            raise ValueError(
                f"neurofed.models.losses: need age_range low < high and bin_width > 0, got {age_range}, "
                f"{bin_width}."
            )
        n_bins = (high - low) / bin_width
        if abs(n_bins - round(n_bins)) > 1e-6:
            raise ValueError(
                f"neurofed.models.losses: age_range {age_range} is not a whole number of {bin_width}-year bins."
            )
        self.age_range = (low, high)
        self.bin_width = float(bin_width)
        self.n_bins = int(round(n_bins))
        self.centers = low + bin_width * (torch.arange(self.n_bins, dtype=torch.float32) + 0.5)
