"""Update-norm clipping around any rule: each site's update ``Δ_k = w_k − w_global`` is scaled to norm ≤ C.

    Δ_k ← Δ_k · min(1, C / ‖Δ_k‖₂)

before the site sends its parameters ``w_global + Δ_k``. It bounds how far one site (a faulty scanner
protocol, a poisoned site, a diverging local run) can move a round, and it is the sensitivity bound that
DP-FedAvg (McMahan et al. 2018, Learning Differentially Private Recurrent Language Models) needs. The
count of rounds in which this site was clipped and its last update norm are reported in the round metrics
(``clip/clipped_rounds``, ``clip/update_norm``); they stay at the site.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from neurofed.federated.strategies.base import RoundContext, Strategy
from neurofed.federated.strategies.wrapper import StrategyWrapper

__all__ = ["ClipUpdates", "clip_update"]


def clip_update(update: Tensor, max_norm: float) -> tuple[Tensor, float, bool]:
    """``update`` scaled to L2 norm at most ``max_norm``; also its norm before clipping and whether it was clipped."""
    norm = float(torch.linalg.vector_norm(update.double()))
    if norm > max_norm:
        return update * (max_norm / norm), norm, True
    return update, norm, False


class ClipUpdates(StrategyWrapper):
    """Clip each site's update to L2 norm ``max_norm`` before ``inner`` sends and aggregates it.

    Args:
        inner: The rule whose input is clipped.
        max_norm: The bound C on ``‖w_k − w_global‖₂``.
    """

    def __init__(self, inner: Strategy, max_norm: float) -> None:
        super().__init__(inner)
        if not max_norm > 0:
            raise ValueError(f"ClipUpdates: max_norm must be > 0 (an L2 bound on each update), got {max_norm}")
        self.max_norm = float(max_norm)
        self.clipped_rounds = 0
        self.last_norm = float("nan")

    def hparams(self) -> dict[str, Any]:
        return {"inner": self.inner, "max_norm": self.max_norm}

    def client_update(self, params: Tensor, global_params: Tensor, context: RoundContext) -> Tensor:
        update, self.last_norm, clipped = clip_update(params - global_params, self.max_norm)
        self.clipped_rounds += int(clipped)
        return self.inner.client_update(global_params + update, global_params, context)

    def round_metrics(self) -> dict[str, float]:
        return {**self.inner.round_metrics(), "clip/clipped_rounds": float(self.clipped_rounds),
                "clip/update_norm": self.last_norm}
