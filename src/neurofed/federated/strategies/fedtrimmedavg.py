"""FedTrimmedAvg (Yin et al. 2018, Byzantine-Robust Distributed Learning): the coordinate-wise trimmed mean.

For each coordinate ``i``, sort the participating sites' values, drop the ``b`` smallest and the ``b``
largest (``m`` sites trained this round) and average the rest:

    w_global[i] ← 1/(m − 2b) · Σ_{j=b}^{m−b−1} sorted_k(w_k[i])[j]

with ``b = max(1, ⌊β·m⌋)`` for ``β > 0`` and ``m ≥ 3`` (else ``b = ⌊β·m⌋``). ``⌊β·m⌋`` alone is
``scipy.stats.trim_mean``'s and Flower's ``aggregate_trimmed_avg``'s rule, but it trims nothing at small
federations (β = 0.2 below five sites): the rule would be a plain mean there, which one site can move
anywhere. At least one site trimmed at each end is what makes it robust at three or four hospitals.

**Tolerance.** Unweighted by design, as FedMedian: with at most ``b`` faulty sites, every coordinate stays
within the range of the honest sites' values, whatever the faulty ones send (each faulty value is either
trimmed or lies between two honest ones); ``b + 1`` faulty sites on one side can move it anywhere. So it
tolerates ``b`` of ``m`` sites: 1 of 3 to 9 with the default β = 0.2, 2 of 10 to 14. ``β = 0`` is the
unweighted mean (tolerates none); ``β → 0.5`` approaches the median. It needs every site's vector (one
all_gather), so it cannot run under secure aggregation.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from neurofed.federated.collectives import Collectives
from neurofed.federated.strategies.base import Contribution, RoundContext, Strategy

__all__ = ["FedTrimmedAvg"]


class FedTrimmedAvg(Strategy):
    """Coordinate-wise mean of the participating sites' parameters after trimming a fraction at each end.

    Args:
        beta: Fraction trimmed at each end, in [0, 0.5); above 0, at least one site at each end from three.
    """

    needs_individual_updates = True

    def __init__(self, beta: float = 0.2) -> None:
        super().__init__(weighted=False)
        if not 0 <= beta < 0.5:
            raise ValueError(f"FedTrimmedAvg: beta must be in [0, 0.5) (a fraction trimmed at each end), got {beta}")
        self.beta = float(beta)

    def hparams(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def aggregate(self, contribution: Contribution, comm: Collectives, context: RoundContext) -> Tensor:
        ordered = comm.ordered(contribution.params, contribution.weight)
        m = len(ordered)
        b = self.trimmed(m)
        return ordered[b: m - b].mean(dim=0).float()

    def trimmed(self, m: int) -> int:
        """Sites trimmed at each end when ``m`` sites contribute: the faulty sites the rule tolerates."""
        b = math.floor(self.beta * m)
        return max(1, b) if self.beta > 0 and m >= 3 else b
