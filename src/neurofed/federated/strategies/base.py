"""The aggregation rule of a federation: what a site sends, and how the sites' contributions become one model.

A rule sees a round from one site's seat, as every site runs it at once (there is no server process):

1. ``aggregated_keys`` — which state-dict entries the sites share (the rest stays local, e.g. FedBN).
2. ``local_loss`` — an optional term added to the site's training loss (FedProx).
3. ``client_update`` — transforms the site's flat parameter vector before it leaves the site (clipping,
   noise, masking); it gets a :class:`RoundContext` so that every site draws the same randomness.
4. ``aggregate`` — combines every site's contribution through the :class:`~neurofed.federated.collectives.
   Collectives` it is handed (a weighted mean by all_reduce, order statistics by all_gather) and applies the
   server update. Every site runs it on the same numbers and gets the same new global vector.

A new rule is one file: subclass :class:`Strategy`, implement ``aggregate``, and keep its math there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from neurofed.federated.params import float_keys

if TYPE_CHECKING:
    from neurofed.federated.collectives import Collectives

__all__ = ["Contribution", "RoundContext", "Strategy"]


@dataclass(frozen=True)
class RoundContext:
    """What a rule may depend on besides the numbers, identical at every site except ``site_rank``.

    Attributes:
        round: 0-based index of the round being aggregated.
        seed: The federation's seed; with ``round`` it seeds randomness every site must share.
        site_rank: This site's index.
        num_sites: Number of sites in the federation.
    """

    round: int
    seed: int
    site_rank: int
    num_sites: int


@dataclass(frozen=True)
class Contribution:
    """One site's offer to a round: flat float32 CPU vectors over the strategy's keys.

    Attributes:
        params: The site's parameters after local training, as transformed by ``client_update``.
        global_params: The global parameters the round started from (identical at every site).
        weight: The site's weight (``site_weight`` of its example count), 0 when it did not train this round.
    """

    params: Tensor
    global_params: Tensor
    weight: float

    @property
    def update(self) -> Tensor:
        """What local training changed: ``params - global_params``."""
        return self.params - self.global_params


class Strategy(ABC):
    """Base of every aggregation rule. Subclasses implement :meth:`aggregate`; every other method has a default.

    Args:
        weighted: Weight each site by its number of training examples (else every site counts once).
    """

    #: True for rules that need every site's individual vector (median, trimmed mean): they cannot run on
    #: a masked sum.
    needs_individual_updates: bool = False

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = bool(weighted)

    def hparams(self) -> dict[str, Any]:
        """Hyperparameters, shown by ``repr`` and written to logs."""
        return {"weighted": self.weighted}

    def site_weight(self, num_examples: int | float) -> float:
        """Weight of one site's update: its example count when ``weighted``, else 1."""
        return float(num_examples) if self.weighted else 1.0

    def aggregated_keys(self, state_dict: dict[str, Tensor], model: nn.Module | None = None) -> list[str]:
        """State-dict entries the sites share: floating-point parameters and buffers.

        Integer buffers such as ``num_batches_tracked`` are never aggregated. ``model`` is accepted for
        rules that need module types (FedBN) and ignored here.
        """
        return float_keys(state_dict)

    def local_loss(self, model: nn.Module, global_params: dict[str, Tensor]) -> Tensor | None:
        """Extra term added to each local training loss; ``None`` means no term."""
        return None

    def client_update(self, params: Tensor, global_params: Tensor, context: RoundContext) -> Tensor:
        """What this site sends in place of ``params`` (its flat vector after local training); default: as is."""
        return params

    @abstractmethod
    def aggregate(self, contribution: Contribution, comm: Collectives, context: RoundContext) -> Tensor:
        """The new global vector, from this site's contribution and the others' (reached through ``comm``)."""

    def round_metrics(self) -> dict[str, float]:
        """Numbers about the last aggregation for the round's metrics (loggers, ``history.json``), e.g. a
        privacy budget spent or a count of clipped updates; none by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Server-side state to checkpoint between rounds (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but was given keys {sorted(state)}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"
