"""Federated training: one Fabric loop for federations of sites (and for centralized training, one site).

``FederatedTrainer`` runs the rounds; ``Federation`` says where a site sits; strategies decide what is
aggregated and how; the group moves only what :mod:`neurofed.federated.wire` allows across sites.
"""

from neurofed.federated.config import Federation
from neurofed.federated.strategies import FedAdam, FedAvg, FedBN, FedProx, Strategy
from neurofed.federated.trainer import FederatedTrainer

__all__ = ["FedAdam", "FedAvg", "FedBN", "FedProx", "Federation", "FederatedTrainer", "Strategy"]
