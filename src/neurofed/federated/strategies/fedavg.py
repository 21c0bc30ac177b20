"""FedAvg (McMahan et al. 2017, Communication-Efficient Learning of Deep Networks from Decentralized Data).

    w_global ← Σ_k n_k · w_k / Σ_k n_k

over the sites ``k`` that trained this round, ``n_k`` their training examples (or 1 each when unweighted).
One all_reduce of a flat vector does it; every site gets the same sum.

**Tolerance.** None: one site can move the mean anywhere (a weight of ``n_k / Σ n`` times whatever it sends).
Update screening (:mod:`~neurofed.federated.screening`) leaves out the updates that look faulty before the
mean is taken, and the aggregate checks (:mod:`~neurofed.federated.aggregate_checks`) refuse a mean that
cannot be evaluated; against a hostile site that stays within the screening bounds, use FedMedian or
FedTrimmedAvg.
"""

from __future__ import annotations

from torch import Tensor

from neurofed.federated.collectives import Collectives
from neurofed.federated.strategies.base import Contribution, RoundContext, Strategy

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    """The (example-)weighted mean of the sites' parameters."""

    def aggregate(self, contribution: Contribution, comm: Collectives, context: RoundContext) -> Tensor:
        return comm.weighted_mean(contribution.params, contribution.weight)
