"""An exponential moving average of the global model across rounds: what a site evaluates, keeps and tests.

Why: a few local steps at a few sites move the global model a lot from one round to the next, so the validation
loss of the round's model swings and the best round is partly luck. Averaging the weights over the last few
rounds (Polyak averaging; SWA and the EMA of modern training recipes) evaluates a model that moves smoothly
while training itself goes on from the round's own weights. With ``precise_bn`` the BatchNorm statistics are
re-estimated for the averaged weights, as SWA does (``torch.optim.swa_utils.update_bn``).

Every floating-point entry of the model is averaged except BatchNorm running statistics when they are
re-estimated anyway. The average of the aggregated entries is identical at every site (it is a function of the
global models alone); entries a strategy keeps local (FedBN) are averaged at their site.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """``average ← decay · average + (1 − decay) · weights`` once per round, over the entries ``keys``.

    Args:
        decay: Weight of the previous average, in [0, 1): 0 keeps only the current round's model; 0.5 halves
            a round's weight every round.
        keys: ``state_dict`` names of the averaged entries.
    """

    def __init__(self, decay: float, keys: list[str]) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"WeightAverage: decay must be in [0, 1), got {decay}")
        self.decay, self.keys = float(decay), list(keys)
        self.average: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (the first call starts it)."""
        state = model.state_dict()
        for k in self.keys:
            current = state[k].detach().to(torch.float64)
            if k not in self.average:
                self.average[k] = current.clone()
            else:
                self.average[k].mul_(self.decay).add_(current, alpha=1 - self.decay)

    @torch.no_grad()
    def swap_in(self, model: nn.Module) -> dict[str, Tensor]:
        """Load the average into ``model``; returns the weights it replaced (for :meth:`swap_out`)."""
        state = model.state_dict()
        saved = {k: state[k].detach().clone() for k in self.keys}
        for k in self.keys:
            state[k].copy_(self.average[k].to(state[k].dtype))
        return saved

    @torch.no_grad()
    def swap_out(self, model: nn.Module, saved: dict[str, Tensor]) -> None:
        """Put back the weights :meth:`swap_in` replaced."""
        state = model.state_dict()
        for k, v in saved.items():
            state[k].copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "average": {k: v.clone() for k, v in self.average.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average = {k: v.clone().to(torch.float64) for k, v in state["average"].items()}
