"""FedAdam (Reddi et al. 2021, Algorithm 2): Adam's second moment on the server.

    v ← β2·v + (1−β2)·Δ²

The rest of the update is :class:`~neurofed.federated.strategies.fedopt.FedOpt`'s. Flower's FedAdam, exactly:
``FedAdam(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-9, bias_correction="flower")``.
"""

from __future__ import annotations

from torch import Tensor

from neurofed.federated.strategies.fedopt import FedOpt

__all__ = ["FedAdam"]


class FedAdam(FedOpt):
    """Server-side Adam over flat parameter vectors."""

    def second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta_sq
