"""Aggregation strategies, one rule per file (see :mod:`~neurofed.federated.strategies.base`)."""

from neurofed.federated.strategies.base import Contribution, RoundContext, Strategy
from neurofed.federated.strategies.fedadagrad import FedAdagrad
from neurofed.federated.strategies.fedadam import FedAdam
from neurofed.federated.strategies.fedavg import FedAvg
from neurofed.federated.strategies.fedbn import FedBN
from neurofed.federated.strategies.fedmedian import FedMedian
from neurofed.federated.strategies.fedopt import FedOpt
from neurofed.federated.strategies.fedprox import FedProx
from neurofed.federated.strategies.fedyogi import FedYogi

__all__ = ["Contribution", "FedAdagrad", "FedAdam", "FedAvg", "FedBN", "FedMedian", "FedOpt", "FedProx", "FedYogi",
           "RoundContext", "Strategy"]
