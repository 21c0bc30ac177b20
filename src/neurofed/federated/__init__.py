"""Federated training: one Fabric loop for federations of sites (and for centralized training, one site).

``FederatedTrainer`` runs the rounds; ``Federation`` says where a site sits; strategies decide what is sent
and how it is combined; callbacks observe each round; the group moves only what
:mod:`neurofed.federated.wire` allows across sites.

Names load lazily: a process that only needs the wire, the group or a strategy (a test's child process, the
simulation launcher) does not pay for importing Lightning's trainer machinery.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Callback": "neurofed.federated.callbacks",
    "Federation": "neurofed.federated.config",
    "FederatedTrainer": "neurofed.federated.trainer",
    "DPSGD": "neurofed.federated.dp_sgd",
    "DPSGDCallback": "neurofed.federated.dp_sgd_callback",
    **{name: "neurofed.federated.strategies" for name in (
        "ClipUpdates", "Contribution", "DPFedAvg", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedBN", "FedMedian",
        "FedOpt", "FedProx", "FedTrimmedAvg", "FedYogi", "RoundContext", "SecureAggregation", "Strategy",
        "StrategyWrapper",
    )},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neurofed.federated' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
