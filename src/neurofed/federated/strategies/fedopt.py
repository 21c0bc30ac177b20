"""The FedOpt family (Reddi et al. 2021, Adaptive Federated Optimization): an adaptive optimizer on the server.

The weighted mean of the sites' parameters minus the global ones, ``Δ = mean − global``, is a pseudo-gradient
(it points downhill). With first and second moments ``m`` and ``v``, starting at 0, at server step ``t``
(1, 2, ...; one step per round, so ``t`` is Flower's ``server_round``):

    m ← β1·m + (1−β1)·Δ
    v ← second_moment(v, Δ²)            # Adam, Yogi or Adagrad: see the subclasses
    global ← global + η_t · m̂ / (√v̂ + τ)

``bias_correction`` chooses ``η_t``, ``m̂`` and ``v̂``:

- ``"none"`` (or ``False``, the default): ``η_t = η``, ``m̂ = m``, ``v̂ = v``, as in the paper's Algorithm 2.
  This is also Flower's FedYogi and FedAdagrad, which correct nothing.
- ``"adam"`` (or ``True``): Adam's ``m̂ = m / (1−β1ᵗ)``, ``v̂ = v / (1−β2ᵗ)``, ``η_t = η``.
- ``"flower"``: Flower's FedAdam, which corrects the step size instead (Kingma & Ba's ``α_t``) with the
  exponent ``t + 1``: ``η_t = η·√(1−β2^(t+1)) / (1−β1^(t+1))``, ``m̂ = m``, ``v̂ = v`` (τ is added to the
  uncorrected ``√v``).

Flower 1.42's rules, exactly (its defaults; ``tests/federated/test_strategies.py`` checks them against
Flower's formulas written out): ``FedAdam(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-9,
bias_correction="flower")``, ``FedYogi(eta=0.01, beta1=0.9, beta2=0.99, tau=1e-3)`` and ``FedAdagrad(eta=0.1,
beta1=0.0, tau=1e-9)``: Flower's FedAdagrad fixes β1 = 0 (no momentum), where the paper and neurofed's default
keep β1 = 0.9. Every site applies the same update to the same numbers, so the moments stay identical across
sites; they are part of the round checkpoint.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, Literal

import torch
from torch import Tensor

from neurofed.federated.collectives import Collectives
from neurofed.federated.strategies.base import Contribution, RoundContext, Strategy

__all__ = ["BIAS_CORRECTIONS", "FedOpt"]

#: The accepted ``bias_correction`` values (``False``/``True`` stand for ``"none"``/``"adam"``).
BIAS_CORRECTIONS = ("none", "adam", "flower")


class FedOpt(Strategy):
    """Server-side adaptive optimizer over flat parameter vectors; subclasses give the second moment.

    Args:
        eta: Server learning rate η.
        beta1: Decay of the first moment (0: no momentum, as Flower's FedAdagrad).
        beta2: Decay of the second moment (unused by Adagrad).
        tau: Adaptivity τ, added to √v.
        bias_correction: ``"none"`` (the paper), ``"adam"`` (Adam's corrected moments) or ``"flower"``
            (Flower's FedAdam step size); ``False``/``True`` mean ``"none"``/``"adam"``. See the module.
        weighted: Weight sites by their example counts in the mean.
    """

    def __init__(self, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 bias_correction: bool | Literal["none", "adam", "flower"] = False, weighted: bool = True) -> None:
        super().__init__(weighted=weighted)
        if eta <= 0 or tau <= 0 or not (0 <= beta1 < 1) or not (0 <= beta2 < 1):
            raise ValueError(
                f"{type(self).__name__}: need eta > 0, tau > 0, 0 <= beta1, beta2 < 1; got eta={eta}, "
                f"beta1={beta1}, beta2={beta2}, tau={tau}"
            )
        correction = {False: "none", True: "adam"}.get(bias_correction, bias_correction)
        if correction not in BIAS_CORRECTIONS:
            raise ValueError(f"{type(self).__name__}: bias_correction must be one of {', '.join(BIAS_CORRECTIONS)} "
                             f"(or false/true), got {bias_correction!r}")
        self.eta, self.beta1, self.beta2, self.tau = float(eta), float(beta1), float(beta2), float(tau)
        self.bias_correction: str = correction
        self.m: Tensor | None = None
        self.v: Tensor | None = None
        self.step = 0

    def hparams(self) -> dict[str, Any]:
        return {"eta": self.eta, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau,
                "bias_correction": self.bias_correction, "weighted": self.weighted}

    @abstractmethod
    def second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        """The new second moment from the previous one and the squared pseudo-gradient."""

    def aggregate(self, contribution: Contribution, comm: Collectives, context: RoundContext) -> Tensor:
        mean = comm.weighted_mean(contribution.params, contribution.weight)
        return self.server_step(contribution.global_params, mean)

    def server_step(self, global_vec: Tensor, mean_vec: Tensor) -> Tensor:
        """One step of the server optimizer from the global vector towards the sites' mean."""
        if global_vec.shape != mean_vec.shape:
            raise ValueError(f"{type(self).__name__}: global {tuple(global_vec.shape)} and mean "
                             f"{tuple(mean_vec.shape)} differ")
        delta = mean_vec.float() - global_vec.float()
        if self.m is None or self.v is None:
            self.m, self.v = torch.zeros_like(delta), torch.zeros_like(delta)
        elif self.m.shape != delta.shape:
            raise ValueError(
                f"{type(self).__name__}: moments have {self.m.numel()} elements but the update has "
                f"{delta.numel()}; the model or the aggregated keys changed since the moments were created"
            )
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        self.v = self.second_moment(self.v, delta.pow(2))
        self.step += 1
        t, m, v, eta = self.step, self.m, self.v, self.eta
        if self.bias_correction == "adam":
            m, v = m / (1 - self.beta1**t), v / (1 - self.beta2**t)
        elif self.bias_correction == "flower":
            eta = eta * math.sqrt(1 - self.beta2 ** (t + 1)) / (1 - self.beta1 ** (t + 1))
        return global_vec.float() + eta * m / (v.sqrt() + self.tau)

    def state_dict(self) -> dict[str, Any]:
        return {"m": None if self.m is None else self.m.clone(),
                "v": None if self.v is None else self.v.clone(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"m", "v", "step"}
        if unknown:
            raise ValueError(f"{type(self).__name__}.load_state_dict: unexpected keys {sorted(unknown)}")
        self.m = None if state.get("m") is None else state["m"].detach().clone().float().cpu()
        self.v = None if state.get("v") is None else state["v"].detach().clone().float().cpu()
        self.step = int(state.get("step", 0))
