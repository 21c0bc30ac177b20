"""FedAvg (McMahan et al. 2017): the new global model is the example-weighted mean of the sites'."""

from __future__ import annotations

from neurofed.federated.strategies.base import Strategy

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    """Plain (weighted) parameter averaging; every behaviour is the base default."""

    def __init__(self, weighted: bool = True) -> None:
        super().__init__(weighted=weighted)
