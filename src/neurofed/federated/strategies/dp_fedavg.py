"""DP-FedAvg (McMahan et al. 2018, Learning Differentially Private Recurrent Language Models): site-level
differential privacy around a mean-based rule.

Each sampled site clips its update to norm C (``client_update``) and adds Gaussian noise of variance
``σ²C²/m`` before the sum, where ``m`` is the number of sites that trained this round (public: every site
draws the same sample). The sum then carries noise of standard deviation ``σ·C`` — the Gaussian mechanism
for a sum whose sensitivity to one site is C — while no single site's noise is large; under
:class:`~neurofed.federated.strategies.secure_aggregation.SecureAggregation` (wrap it outside:
``SecureAggregation(DPFedAvg(FedAvg(), ...))``) no party ever sees a sum without the noise. The estimate
is the paper's unweighted mean over the sampled sites:

    w̄ = w_global + (Σ_k clip(Δ_k) + N(0, σ²C²)) / m

and the inner rule applies its server step to ``w̄`` (FedAvg: none; FedAvgM: server momentum as in the
paper). Example-count weights are ignored (a site's count is not private-safe and would raise its
sensitivity).

**Accounting, per site, without amplification.** The paper's ε assumes that who trains in a round is
secret (amplification by sampling, ``q = m / num_sites``). Here it is not: every site draws the same sample
from ``(seed, round)``. So each site accounts only the rounds it took part in, each a Gaussian mechanism at
σ with ``q = 1`` (Opacus' RDP accountant; never stepped with ``q = 0``). The unit is one site's whole
contribution to a round (its update replaced by zero), with participation public. Reported per round as
this site's ``privacy/site_epsilon`` and ``privacy/site_delta``; the busiest site has the largest.

**Nesting.** ``SecureAggregation`` must be the outermost wrapper (``StrategyWrapper`` refuses it inside any
other): ``DPFedAvg(SecureAggregation(...))`` would add no noise. One ``DPFedAvg`` per rule.

**Noise.** Each site draws its share from a generator seeded from ``os.urandom`` every round
(:mod:`~neurofed.federated.private_random`), never from a value another site knows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from neurofed.federated.collectives import Collectives
from neurofed.federated.private_random import private_generator
from neurofed.federated.strategies.base import Contribution, RoundContext, Strategy
from neurofed.federated.strategies.clip_updates import clip_update
from neurofed.federated.strategies.wrapper import StrategyWrapper

__all__ = ["DPFedAvg"]


class _NoisyMean(Collectives):
    """``weighted_mean`` replaced by DP-FedAvg's noisy unweighted mean over the sites that trained."""

    def __init__(self, comm: Collectives, global_params: Tensor, noise_std: float, generator: torch.Generator) -> None:
        super().__init__(comm.link, comm.round)
        self.comm, self.global_params, self.noise_std, self.generator = comm, global_params, noise_std, generator
        self.sampled = 0

    def weighted_mean(self, vec: Tensor, weight: float) -> Tensor:
        active = 1.0 if weight > 0 else 0.0
        m = self.comm.total_weight(active)  # the number of sites that trained (public)
        self.sampled = round(m)
        g = self.global_params.double()
        noisy = (vec.double() - g) * active
        if active:
            noisy += torch.randn(vec.shape, dtype=torch.float64, generator=self.generator) * (self.noise_std / math.sqrt(m))
        return (g + self.comm.sum(noisy) / m).to(vec.dtype)

    def sum(self, vec: Tensor) -> Tensor:
        return self.comm.sum(vec)

    def gather(self, vec: Tensor) -> list[Tensor]:
        raise ValueError("DPFedAvg: a rule that gathers individual vectors cannot be made differentially private "
                         "by distributed noise; wrap a mean-based rule such as FedAvg or FedAvgM")


class DPFedAvg(StrategyWrapper):
    """Clip each site's update to ``clip_norm`` and add distributed Gaussian noise of total std ``σ·C``.

    Args:
        inner: A mean-based rule (FedAvg, FedAvgM, the FedOpt family); its ``weighted_mean`` becomes the
            noisy unweighted mean.
        noise_multiplier: σ.
        clip_norm: C, the L2 bound on each site's update.
        delta: δ of the reported (ε, δ).
    """

    def __init__(self, inner: Strategy, noise_multiplier: float, clip_norm: float, delta: float = 1e-5) -> None:
        if inner.needs_individual_updates:
            raise ValueError(f"DPFedAvg cannot wrap {inner!r}: it needs individual updates; wrap FedAvg or FedAvgM")
        if any(isinstance(rule, DPFedAvg) for rule in StrategyWrapper.chain(inner)):
            raise ValueError(f"DPFedAvg cannot wrap {inner!r}, which already holds a DPFedAvg: the inner one's noise "
                             "would be accounted twice and the outer one's never added; use one DPFedAvg")
        super().__init__(inner)
        if noise_multiplier < 0 or not clip_norm > 0 or not 0 < delta < 1:
            raise ValueError(f"DPFedAvg: need noise_multiplier >= 0, clip_norm > 0 and 0 < delta < 1; got "
                             f"{noise_multiplier}, {clip_norm}, {delta}")
        self.noise_multiplier, self.clip_norm, self.delta = float(noise_multiplier), float(clip_norm), float(delta)
        from opacus.accountants import RDPAccountant  # imported here: loading Opacus is slow

        self.accountant = RDPAccountant()
        self.clipped_rounds = 0

    def hparams(self) -> dict[str, Any]:
        return {"inner": self.inner, "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "delta": self.delta}

    def client_update(self, params: Tensor, global_params: Tensor, context: RoundContext) -> Tensor:
        update, _, clipped = clip_update(params - global_params, self.clip_norm)
        self.clipped_rounds += int(clipped)
        return self.inner.client_update(global_params + update, global_params, context)

    def _generator(self, context: RoundContext) -> torch.Generator:
        """This site's noise generator for one round: fresh entropy, never ``context`` (which every site knows)."""
        return private_generator()

    def aggregate(self, contribution: Contribution, comm: Collectives, context: RoundContext) -> Tensor:
        noisy = _NoisyMean(comm, contribution.global_params, self.noise_multiplier * self.clip_norm,
                           self._generator(context))
        out = self.inner.aggregate(contribution, noisy, context)
        if self.noise_multiplier > 0 and contribution.weight > 0 and noisy.sampled > 0:
            # this site took part: one Gaussian mechanism at σ, no amplification (the sample is public)
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0)
        return out

    @property
    def epsilon(self) -> float:
        """ε spent so far at ``delta`` (∞ without noise, 0 before the first round)."""
        if self.noise_multiplier == 0:
            return math.inf
        return float(self.accountant.get_epsilon(self.delta)) if self.accountant.history else 0.0

    def round_metrics(self) -> dict[str, float]:
        return {**self.inner.round_metrics(), "privacy/site_epsilon": self.epsilon, "privacy/site_delta": self.delta,
                "clip/clipped_rounds": float(self.clipped_rounds)}

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "accountant_history": list(self.accountant.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"inner", "accountant_history"}
        if unknown:
            raise ValueError(f"DPFedAvg.load_state_dict: unexpected keys {sorted(unknown)}")
        self.inner.load_state_dict(state.get("inner", {}))
        history = [tuple(h) for h in state.get("accountant_history", [])]
        if any(q != 1.0 for _, q, _ in history):
            raise ValueError("DPFedAvg.load_state_dict: this checkpoint accounted DP-FedAvg with amplification by "
                             "a public site sample (q < 1), which understates ε; its budget cannot be carried over — "
                             "start the run over")
        self.accountant.history = history
