"""FedMedian (Yin et al. 2018, Byzantine-Robust Distributed Learning): the coordinate-wise median.

    w_global[i] ← median_k w_k[i]        over the sites k that trained this round

Unweighted by design: a site's influence on each coordinate is bounded whatever it sends or claims.

**Tolerance.** While fewer than half of the ``m`` contributing sites are faulty — ``⌈m/2⌉ − 1`` of them: 1 of
3 or 4, 2 of 5 or 6 — every coordinate stays within the range of the honest sites' values, whatever the
faulty ones send; half of the sites can move it anywhere. With an even number of sites the median is the
mean of the two middle values (as numpy's). It needs every site's vector (one all_gather), so it cannot
run under secure aggregation.
"""

from __future__ import annotations

from torch import Tensor

from neurofed.federated.collectives import Collectives
from neurofed.federated.strategies.base import Contribution, RoundContext, Strategy

__all__ = ["FedMedian"]


class FedMedian(Strategy):
    """Coordinate-wise median of the participating sites' parameters."""

    needs_individual_updates = True

    def __init__(self) -> None:
        super().__init__(weighted=False)

    def hparams(self) -> dict[str, object]:
        return {}

    def aggregate(self, contribution: Contribution, comm: Collectives, context: RoundContext) -> Tensor:
        ordered = comm.ordered(contribution.params, contribution.weight)
        k = len(ordered)
        middle = ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2
        return middle.float()
