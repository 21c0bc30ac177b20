"""Which sites train in a round: a pure function of ``(seed, round)``, so every site draws the same ones.

No message is needed to agree on the draw, and a resumed run draws what the uninterrupted run drew. The rule
itself (seed, sites per round, number of sites) is stored in the round checkpoint, and a resume with another
rule is refused: its rounds would train other sites.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["SiteSampling"]


@dataclass(frozen=True)
class SiteSampling:
    """Train ``sites_per_round`` of ``num_sites`` sites per round (``None``: all of them)."""

    seed: int
    sites_per_round: int | None
    num_sites: int

    def draw(self, round: int) -> set[int]:
        """The sites that train in ``round`` (0-based)."""
        n, k = self.num_sites, self.sites_per_round
        if k is None or k >= n:
            return set(range(n))
        return {int(s) for s in np.random.default_rng((self.seed, round)).choice(n, size=k, replace=False)}

    def as_dict(self) -> dict[str, Any]:
        """What the round checkpoint stores and a resume compares."""
        return asdict(self)
