"""FedYogi (Reddi et al. 2021, Algorithm 2; Zaheer et al. 2018): Yogi's second moment on the server.

    v ← v − (1−β2)·Δ²·sign(v − Δ²)

``v`` moves towards ``Δ²`` by an additive step instead of Adam's multiplicative decay, so a rare large
update cannot make the effective learning rate collapse. The rest is
:class:`~neurofed.federated.strategies.fedopt.FedOpt`'s. Flower's FedYogi, exactly (it has no bias correction):
``FedYogi(eta=0.01, beta1=0.9, beta2=0.99, tau=1e-3)``.
"""

from __future__ import annotations

from torch import Tensor

from neurofed.federated.strategies.fedopt import FedOpt

__all__ = ["FedYogi"]


class FedYogi(FedOpt):
    """Server-side Yogi over flat parameter vectors."""

    def second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return v - (1 - self.beta2) * delta_sq * (v - delta_sq).sign()
