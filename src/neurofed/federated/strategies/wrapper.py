"""A rule around a rule: the base of wrappers (clipping, differential privacy, secure aggregation).

Flower's lesson: privacy and robustness mechanisms compose best as wrappers around any aggregation rule.
A wrapper delegates every part of the interface to ``inner`` and overrides only what it changes, so
``ClipUpdates(FedAdam())`` keeps FedAdam's server step and its checkpointed moments.

Secure aggregation must be the outermost wrapper: it replaces the collectives its inner rules are handed,
so anything wrapped around it (DP-FedAvg's noisy mean, say) would be bypassed — refused here in one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from neurofed.federated.strategies.base import Contribution, RoundContext, Strategy

if TYPE_CHECKING:
    from neurofed.federated.collectives import Collectives

__all__ = ["StrategyWrapper"]


class StrategyWrapper(Strategy):
    """Delegates to ``inner``; subclasses override ``client_update`` and/or ``aggregate``.

    Args:
        inner: The wrapped rule.
    """

    def __init__(self, inner: Strategy) -> None:
        if not isinstance(inner, Strategy):
            raise TypeError(f"{type(self).__name__}: inner must be a Strategy such as FedAvg(), got {inner!r}")
        if any(type(rule).__name__ == "SecureAggregation" for rule in StrategyWrapper.chain(inner)):
            raise ValueError(f"{type(self).__name__} cannot wrap {inner!r}: SecureAggregation must be the outermost "
                             "wrapper, or what is wrapped around it is bypassed (DP-FedAvg would add no noise); "
                             "write SecureAggregation(DPFedAvg(FedAvg(), ...))")
        self.inner = inner
        super().__init__(weighted=inner.weighted)

    @staticmethod
    def chain(strategy: Strategy) -> list[Strategy]:
        """``strategy`` and every rule it wraps, outermost first."""
        rules = [strategy]
        while isinstance(rules[-1], StrategyWrapper):
            rules.append(rules[-1].inner)
        return rules

    @property
    def needs_individual_updates(self) -> bool:  # type: ignore[override]
        return self.inner.needs_individual_updates

    def hparams(self) -> dict[str, Any]:
        return {"inner": self.inner}

    def site_weight(self, num_examples: int | float) -> float:
        return self.inner.site_weight(num_examples)

    def aggregated_keys(self, state_dict: dict[str, Tensor], model: nn.Module | None = None) -> list[str]:
        return self.inner.aggregated_keys(state_dict, model)

    def local_loss(self, model: nn.Module, global_params: dict[str, Tensor]) -> Tensor | None:
        return self.inner.local_loss(model, global_params)

    def client_update(self, params: Tensor, global_params: Tensor, context: RoundContext) -> Tensor:
        return self.inner.client_update(params, global_params, context)

    def aggregate(self, contribution: Contribution, comm: Collectives, context: RoundContext) -> Tensor:
        return self.inner.aggregate(contribution, comm, context)

    def round_metrics(self) -> dict[str, float]:
        return self.inner.round_metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
