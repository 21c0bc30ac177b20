"""FedTrimmedAvg (Yin et al. 2018, Byzantine-Robust Distributed Learning): the coordinate-wise trimmed mean.

For each coordinate ``i``, sort the participating sites' values, drop the ``b = ⌊β·m⌋`` smallest and the
``b`` largest (``m`` sites trained this round) and average the rest:

    w_global[i] ← 1/(m − 2b) · Σ_{j=b}^{m−b−1} sorted_k(w_k[i])[j]

Unweighted by design, as FedMedian: up to ``b`` faulty sites per side cannot move a coordinate outside the
range of the honest values. ``β = 0`` is the unweighted mean; ``β → 0.5`` approaches the median. This is
``scipy.stats.trim_mean``'s rule and Flower's ``aggregate_trimmed_avg``. It needs every site's vector (one
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
        beta: Fraction trimmed at each end, in [0, 0.5).
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
        b = math.floor(self.beta * m)
        return ordered[b: m - b].mean(dim=0).float()
