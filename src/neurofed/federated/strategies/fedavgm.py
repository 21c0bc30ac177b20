"""FedAvgM (Hsu et al. 2019, Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification): FedAvg with momentum on the server.

With the weighted mean ``w̄`` of the sites' parameters and the pseudo-gradient ``Δ = w_global − w̄``:

    v ← β·v + Δ                  (v starts at 0)
    w_global ← w_global − η·v

``β = 0, η = 1`` is FedAvg. Momentum smooths the direction of the global model across rounds, which helps
when sites differ (scanners, age ranges) and each round pulls towards the sites that trained. Flower's
FedAvgM is the same rule (``server_learning_rate`` η, ``server_momentum`` β). The velocity is the same at
every site and is part of the round checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from neurofed.federated.collectives import Collectives
from neurofed.federated.strategies.base import Contribution, RoundContext, Strategy

__all__ = ["FedAvgM"]


class FedAvgM(Strategy):
    """Weighted averaging followed by a server SGD step with heavy-ball momentum.

    Args:
        server_lr: Server learning rate η.
        momentum: Server momentum β in [0, 1).
        weighted: Weight sites by their example counts in the mean.
    """

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9, weighted: bool = True) -> None:
        super().__init__(weighted=weighted)
        if server_lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"FedAvgM: need server_lr > 0 and 0 <= momentum < 1; got server_lr={server_lr}, "
                             f"momentum={momentum}")
        self.server_lr, self.momentum = float(server_lr), float(momentum)
        self.velocity: Tensor | None = None

    def hparams(self) -> dict[str, Any]:
        return {"server_lr": self.server_lr, "momentum": self.momentum, "weighted": self.weighted}

    def aggregate(self, contribution: Contribution, comm: Collectives, context: RoundContext) -> Tensor:
        mean = comm.weighted_mean(contribution.params, contribution.weight)
        return self.server_step(contribution.global_params, mean)

    def server_step(self, global_vec: Tensor, mean_vec: Tensor) -> Tensor:
        """One momentum step from the global vector towards the sites' mean."""
        delta = global_vec.float() - mean_vec.float()
        if self.velocity is None:
            self.velocity = torch.zeros_like(delta)
        elif self.velocity.shape != delta.shape:
            raise ValueError(f"FedAvgM: velocity has {self.velocity.numel()} elements but the update has "
                             f"{delta.numel()}; the model or the aggregated keys changed since it was created")
        self.velocity = self.momentum * self.velocity + delta
        return global_vec.float() - self.server_lr * self.velocity

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": None if self.velocity is None else self.velocity.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"velocity"}
        if unknown:
            raise ValueError(f"FedAvgM.load_state_dict: unexpected keys {sorted(unknown)}")
        v = state.get("velocity")
        self.velocity = None if v is None else v.detach().clone().float().cpu()
