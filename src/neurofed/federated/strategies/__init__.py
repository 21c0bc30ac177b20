"""Aggregation strategies, one rule per class; ``STRATEGIES`` maps config names to classes."""

from neurofed.federated.strategies.base import Strategy, weighted_mean
from neurofed.federated.strategies.fedadam import FedAdam
from neurofed.federated.strategies.fedavg import FedAvg
from neurofed.federated.strategies.fedbn import FedBN
from neurofed.federated.strategies.fedprox import FedProx

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedbn": FedBN,
}

__all__ = ["STRATEGIES", "FedAdam", "FedAvg", "FedBN", "FedProx", "Strategy", "weighted_mean"]
