"""FedProx (Li et al. 2020): a proximal term keeps local models near the global one.

With heterogeneous sites, several local epochs pull each model towards its own data; the term
``μ/2 · Σ‖w − w_global‖²`` limits that drift while aggregation stays FedAvg's weighted mean.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from neurofed.federated.strategies.fedavg import FedAvg

__all__ = ["FedProx"]


class FedProx(FedAvg):
    """Weighted averaging plus a proximal local loss of strength ``mu``."""

    def __init__(self, mu: float = 0.01, weighted: bool = True) -> None:
        super().__init__(weighted=weighted)
        if mu < 0:
            raise ValueError(f"FedProx: mu must be >= 0, got {mu}")
        self.mu = float(mu)

    def hparams(self) -> dict[str, Any]:
        return {"mu": self.mu, "weighted": self.weighted}

    def local_loss(self, model: nn.Module, global_params: dict[str, Tensor]) -> Tensor | None:
        """``μ/2 · Σ‖w − w_global‖²`` over trainable parameters named in ``global_params``."""
        terms = [
            (p - global_params[name].detach().to(device=p.device, dtype=p.dtype)).pow(2).sum()
            for name, p in model.named_parameters()
            if p.requires_grad and name in global_params
        ]
        if not terms:
            if any(p.requires_grad for p in model.parameters()):
                raise ValueError(
                    "FedProx.local_loss: no trainable parameter of the model is named in global_params; "
                    "build global_params from this model's state_dict (same key names)"
                )
            return None
        return 0.5 * self.mu * torch.stack([t.float() for t in terms]).sum()
