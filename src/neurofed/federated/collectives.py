"""The communication a strategy is handed: a weighted mean, a gather, a sum — and nothing else.

A rule says *what* to combine; this class says *how* it crosses the federation: through the site's
:class:`~neurofed.federated.site_link.SiteLink` (site leader to the other leaders, then to the site's other
ranks), under the payload kinds that :mod:`neurofed.federated.wire` allows. Every site calls the same
methods in the same order, as collectives require.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from neurofed.federated.site_link import SiteLink

__all__ = ["Collectives", "NoContributionError"]


class NoContributionError(RuntimeError):
    """No site contributed to a round (every weight was zero)."""


class Collectives:
    """Cross-site operations on flat parameter vectors and site weights.

    Args:
        link: This site's link to the others.
        round: The round being aggregated, named in errors.
    """

    def __init__(self, link: SiteLink, round: int) -> None:
        self.link = link
        self.round = round

    @property
    def num_sites(self) -> int:
        return self.link.federation.num_sites

    def total_weight(self, weight: float) -> float:
        """Sum of every site's weight; raises :class:`NoContributionError` when it is not positive."""
        total = self.link.all_reduce(torch.tensor([weight], dtype=torch.float64), "example_count").item()
        if not total > 0:
            raise NoContributionError(
                f"round {self.round}: no site contributed training examples (total weight {total}); "
                "check that every site's training split is non-empty"
            )
        return total

    def weighted_mean(self, vec: Tensor, weight: float) -> Tensor:
        """``Σ_k w_k v_k / Σ_k w_k`` over sites, by one all_reduce of ``vec · w / Σw``.

        The weights are normalised before the sum, so that one site (``w / Σw = 1``) is exactly the identity.
        """
        total = self.total_weight(weight)
        return self.link.all_reduce(vec * (weight / total), "parameters")

    def sum(self, vec: Tensor) -> Tensor:
        """``Σ_k v_k`` over sites (one all_reduce)."""
        return self.link.all_reduce(vec, "parameters")

    def gather(self, vec: Tensor) -> list[Tensor]:
        """Every site's ``vec``, in site order (one all_gather; for order statistics)."""
        return self.link.all_gather(vec, "parameters")

    def ordered(self, vec: Tensor, weight: float) -> Tensor:
        """The contributing sites' vectors (weight > 0), sorted coordinate by coordinate: ``[sites, values]``
        float64, for order statistics (median, trimmed mean). Raises when no site contributed."""
        vectors, weights = self.gather(vec), self.gather_weights(weight)
        chosen = [v.double() for v, w in zip(vectors, weights) if w > 0]
        if not chosen:
            raise NoContributionError(f"round {self.round}: no site trained; no order statistic to take")
        return torch.stack(chosen).sort(dim=0).values

    def gather_weights(self, weight: float) -> list[float]:
        """Every site's weight, in site order."""
        return [float(t.item()) for t in self.link.all_gather(torch.tensor([weight], dtype=torch.float64),
                                                              "example_count")]
