"""The aggregate check: a global model that cannot be evaluated is never committed.

Screening (:mod:`~neurofed.federated.screening`) judges each site's update; this judges their result. After
aggregation and pooled validation, and after the round check has shown that every site holds the same
numbers, every site checks the new global model where a check is cheap and certain:

1. every aggregated value is finite;
2. every BatchNorm running variance is positive (a negative one makes every prediction NaN);
3. the pooled validation loss is finite (when the federation has validation examples).

Every site reaches the same verdict. A round that fails is not committed: every site puts the round's
starting global model back (and the rule's server state, e.g. FedAdam's moments; what wrappers counted,
such as privacy spent, stays counted, since the round's aggregate was computed) and logs which check
failed. Where the rule lets it tell, it also names the site that caused it: the contributing sites whose
updates screening found most unusual (largest norm relative to the median, then lowest cosine) are left
out one at a time, the rule aggregates again and the model is validated again; a site is named when its
absence, and only its, makes the aggregate pass. Under secure aggregation or DP-FedAvg no site is named:
an aggregate without one site, next to the aggregate with it, would reveal that site's update.

``max_failed_rounds`` failed rounds in a row stop the run with one :class:`FederationAggregateError` (the
command line's exit code 2) instead of training on a model that learns nothing.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from neurofed.federated import evaluation
from neurofed.federated.collectives import Collectives
from neurofed.federated.errors import FederationAggregateError
from neurofed.federated.params import load_vector
from neurofed.federated.screening import Screened, individual_updates_hidden
from neurofed.federated.strategies import Contribution, RoundContext, Strategy
from neurofed.federated.vector_layout import VectorLayout
from neurofed.metrics import SplitStats

if TYPE_CHECKING:
    from neurofed.federated.trainer import FederatedTrainer

__all__ = ["AggregateChecks", "Rejection", "check_parameters"]

log = logging.getLogger(__name__)

#: Sites left out one at a time to find the one that caused a failed aggregate.
CANDIDATES = 2


@dataclass(frozen=True)
class Rejection:
    """Why a round's aggregate was not committed.

    Attributes:
        check: The check that failed, in words.
        culprit: The site whose absence (and only its) makes the aggregate pass, when it can be told.
    """

    check: str
    culprit: int | None


def check_parameters(vec: Tensor, layout: VectorLayout) -> str | None:
    """``None`` when ``vec`` is finite with positive BatchNorm variances, else the failed check in words."""
    finite = torch.isfinite(vec)
    if not bool(finite.all()):
        return f"the aggregate is not finite ({int((~finite).sum())} of {vec.numel()} values NaN or inf)"
    return layout.nonpositive_variances(vec)


def _check_loss(loss: float, has_val: bool) -> str | None:
    if has_val and not math.isfinite(loss):
        return f"the pooled validation loss is {loss} (the new global model cannot be evaluated)"
    return None


def _rule(strategy: Strategy) -> Strategy:
    """The aggregation rule inside any wrappers: the owner of the server state a failed round rolls back."""
    while isinstance(getattr(strategy, "inner", None), Strategy):
        strategy = strategy.inner
    return strategy


class AggregateChecks:
    """The checks above for one fit, with the count of failed rounds in a row.

    Args:
        model: The fit's model; ``keys``: the entries the strategy aggregates.
        strategy: The fit's strategy.
        max_failed_rounds: Failed rounds in a row that stop the run.
        names: The sites' dataset names, for the messages.
    """

    def __init__(self, model: Any, keys: list[str], strategy: Strategy, max_failed_rounds: int,
                 names: list[str]) -> None:
        self.layout, self.keys = VectorLayout.of(model, keys), keys
        self.strategy, self.names = strategy, names
        self.max_failed_rounds = int(max_failed_rounds)
        self.failed_in_a_row = 0
        self.can_name_sites = not individual_updates_hidden(strategy)
        self._rule_state: dict[str, Any] = {}

    def before_aggregate(self) -> None:
        """Keep the rule's server state, to put it back if the round fails."""
        self._rule_state = copy.deepcopy(_rule(self.strategy).state_dict())

    def verify(self, trainer: FederatedTrainer, offer: Contribution, context: RoundContext, new_global: Tensor,
               pooled: SplitStats, screened: Screened | None, loaders: Any, datamodule: Any) -> Rejection | None:
        """``None`` if the round's aggregate passes every check; else roll the round back and say why.

        Args:
            trainer: The FederatedTrainer (its site and model).
            offer: What this site offered the rule this round; ``context``: the round's context.
            new_global: The aggregate; ``pooled``: the federation's validation statistics of it.
            screened: The round's screening (``None`` for a federation of one site).
            loaders: The fit's loaders; ``datamodule``: the site's data module (to validate again).

        Raises :class:`FederationAggregateError` on the ``max_failed_rounds``-th failed round in a row.
        """
        round = context.round
        check = check_parameters(new_global, self.layout) or _check_loss(pooled.compute()["loss"], pooled.count > 0)
        if check is None:
            self.failed_in_a_row = 0
            return None
        culprit = self._culprit(trainer, offer, context, screened, loaders, datamodule)
        _rule(self.strategy).load_state_dict(copy.deepcopy(self._rule_state))
        load_vector(trainer.site.model, offer.global_params, self.keys)
        self.failed_in_a_row += 1
        cause = "" if culprit is None else (f"; caused by site {culprit} ({self._name(culprit)}): without its update "
                                            "the aggregate passes every check")
        last = round + 1 - self.failed_in_a_row
        kept = f"round {last}'s" if last > 0 else "the initial"
        if self.failed_in_a_row >= self.max_failed_rounds:
            fix = (f"find out what site {culprit} sends (its data, its software) or leave it out of the federation"
                   if culprit is not None else "check every site's data and settings (a learning rate too high "
                   "diverges too)")
            raise FederationAggregateError(
                f"round {round + 1}: the new global model failed its checks {self.failed_in_a_row} rounds in a row "
                f"(max_failed_rounds={self.max_failed_rounds}): {check}{cause}. Nothing of these rounds was "
                f"committed; {fix}, then resume with --ckpt_path last"
            )
        log.warning("round %d not committed: %s%s; every site keeps %s global model (%d of max_failed_rounds=%d "
                    "failed in a row)", round + 1, check, cause, kept, self.failed_in_a_row, self.max_failed_rounds)
        return Rejection(check, culprit)

    def _name(self, k: int) -> str:
        return self.names[k] if k < len(self.names) else f"site{k}"

    def _culprit(self, trainer: FederatedTrainer, offer: Contribution, context: RoundContext,
                 screened: Screened | None, loaders: Any, datamodule: Any) -> int | None:
        """The one candidate whose absence makes the aggregate pass every check, or ``None``."""
        if screened is None or not self.can_name_sites:
            return None
        stats = screened.stats
        contributing = [k for k, s in enumerate(stats) if s.weight > 0 and k not in screened.excluded]
        if len(contributing) < 2:
            return None
        median = float(torch.tensor([stats[k].norm for k in contributing]).median())
        order = sorted(contributing, key=lambda k: (-stats[k].norm / max(median, 1e-30),
                                                    stats[k].cosine if math.isfinite(stats[k].cosine) else 1.0))
        site, passing = trainer.site, []
        for k in order[:min(CANDIDATES, len(contributing) - 1)]:
            _rule(self.strategy).load_state_dict(copy.deepcopy(self._rule_state))
            mine = Contribution(offer.global_params, offer.global_params, 0.0) if k == context.site_rank else offer
            vec = self.strategy.aggregate(mine, Collectives(site.link, context.round), context)
            check = check_parameters(vec, self.layout)
            if check is None:
                load_vector(site.model, vec, self.keys)
                own = evaluation.evaluate_split(site, loaders.val, datamodule, "validation_step",
                                                evaluation.baseline_prediction(site.model))
                pooled = evaluation.pool_split(site.link, own)
                check = _check_loss(pooled.compute()["loss"], pooled.count > 0)
            if check is None:
                passing.append(k)
        return passing[0] if len(passing) == 1 else None
