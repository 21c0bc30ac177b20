"""FedAdagrad (Reddi et al. 2021, Algorithm 2): Adagrad's second moment on the server.

    v ← v + Δ²

The squared pseudo-gradients accumulate, so the server step shrinks where updates have been large;
``beta2`` is not used. The rest is :class:`~neurofed.federated.strategies.fedopt.FedOpt`'s, first moment
included (β1 = 0.9 by default, as in the paper). Flower's FedAdagrad fixes β1 = 0; exactly:
``FedAdagrad(eta=0.1, beta1=0.0, tau=1e-9)``.
"""

from __future__ import annotations

from torch import Tensor

from neurofed.federated.strategies.fedopt import FedOpt

__all__ = ["FedAdagrad"]


class FedAdagrad(FedOpt):
    """Server-side Adagrad over flat parameter vectors."""

    def second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return v + delta_sq
