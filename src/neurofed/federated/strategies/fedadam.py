"""FedAdam (Reddi et al. 2021, Adaptive Federated Optimization): Adam on the server.

The mean site update ``Δ = mean − global`` is treated as a pseudo-gradient (pointing downhill):

    m = β1·m + (1−β1)·Δ;   v = β2·v + (1−β2)·Δ²;   global ← global + η·m / (√v + τ)

``m`` and ``v`` start at zero at the first call (as Flower does; the paper's ``v₀ ≥ τ²`` differs from this
by at most ``β2·τ²`` in ``v``). There is no bias correction, as in the paper. Every site applies the same
update to the same numbers, so the moments stay identical across sites; they are part of the checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from neurofed.federated.strategies.base import Strategy

__all__ = ["FedAdam"]


class FedAdam(Strategy):
    """Server-side Adam over flat parameter vectors."""

    def __init__(
        self,
        eta: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        weighted: bool = True,
    ) -> None:
        super().__init__(weighted=weighted)
        if eta <= 0 or tau <= 0 or not (0 <= beta1 < 1) or not (0 <= beta2 < 1):
            raise ValueError(
                f"FedAdam: need eta > 0, tau > 0, 0 <= beta1, beta2 < 1; got eta={eta}, beta1={beta1}, "
                f"beta2={beta2}, tau={tau}"
            )
        self.eta, self.beta1, self.beta2, self.tau = float(eta), float(beta1), float(beta2), float(tau)
        self.m: Tensor | None = None
        self.v: Tensor | None = None
        self.step = 0

    def hparams(self) -> dict[str, Any]:
        return {"eta": self.eta, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau, "weighted": self.weighted}

    def server_update(self, global_vec: Tensor, mean_vec: Tensor) -> Tensor:
        if global_vec.shape != mean_vec.shape:
            raise ValueError(f"FedAdam: global {tuple(global_vec.shape)} and mean {tuple(mean_vec.shape)} differ")
        delta = mean_vec.float() - global_vec.float()
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(delta)
            self.v = torch.zeros_like(delta)
        elif self.m.shape != delta.shape:
            raise ValueError(
                f"FedAdam: moments have {self.m.numel()} elements but the update has {delta.numel()}; "
                "the model or the aggregated keys changed since the moments were created"
            )
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        self.v = self.beta2 * self.v + (1 - self.beta2) * delta.pow(2)
        self.step += 1
        return global_vec.float() + self.eta * self.m / (self.v.sqrt() + self.tau)

    def state_dict(self) -> dict[str, Any]:
        return {
            "m": None if self.m is None else self.m.clone(),
            "v": None if self.v is None else self.v.clone(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"m", "v", "step"}
        if unknown:
            raise ValueError(f"FedAdam.load_state_dict: unexpected keys {sorted(unknown)}")
        self.m = None if state.get("m") is None else state["m"].detach().clone().float().cpu()
        self.v = None if state.get("v") is None else state["v"].detach().clone().float().cpu()
        self.step = int(state.get("step", 0))
