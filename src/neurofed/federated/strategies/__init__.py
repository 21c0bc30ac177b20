"""Aggregation strategies, one rule per file (see :mod:`~neurofed.federated.strategies.base`); wrappers add
clipping, differential privacy and secure aggregation around any mean-based rule."""

from neurofed.federated.strategies.base import Contribution, RoundContext, Strategy
from neurofed.federated.strategies.clip_updates import ClipUpdates
from neurofed.federated.strategies.dp_fedavg import DPFedAvg
from neurofed.federated.strategies.fedadagrad import FedAdagrad
from neurofed.federated.strategies.fedadam import FedAdam
from neurofed.federated.strategies.fedavg import FedAvg
from neurofed.federated.strategies.fedavgm import FedAvgM
from neurofed.federated.strategies.fedbn import FedBN
from neurofed.federated.strategies.fedmedian import FedMedian
from neurofed.federated.strategies.fedopt import FedOpt
from neurofed.federated.strategies.fedprox import FedProx
from neurofed.federated.strategies.fedtrimmedavg import FedTrimmedAvg
from neurofed.federated.strategies.fedyogi import FedYogi
from neurofed.federated.strategies.secure_aggregation import SecureAggregation
from neurofed.federated.strategies.wrapper import StrategyWrapper

__all__ = ["ClipUpdates", "Contribution", "DPFedAvg", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedBN",
           "FedMedian", "FedOpt", "FedProx", "FedTrimmedAvg", "FedYogi", "RoundContext", "SecureAggregation",
           "Strategy", "StrategyWrapper"]
