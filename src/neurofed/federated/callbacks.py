"""Round hooks: observe or alter a federated round without subclassing the trainer.

Pass objects with any of these methods as ``FederatedTrainer(callbacks=[...])``; the trainer calls them
through ``Fabric.call`` at every rank of every site, in the order below, so tests, benchmarks and users
see each step of :meth:`FederatedTrainer._run_round` as it happens. Subclassing :class:`Callback` is
optional: it only documents the hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from neurofed.federated.local_training import LocalTraining
    from neurofed.federated.trainer import FederatedTrainer

__all__ = ["Callback"]


class Callback:
    """No-op hooks of a federated run; override the ones you need."""

    def on_fit_start(self, trainer: FederatedTrainer) -> None:
        """After setup and the initial broadcast of site 0's weights (or a resume), before round 1."""

    def on_round_start(self, trainer: FederatedTrainer, round: int) -> None:
        """Before local training of ``round`` (0-based); ``trainer.site.model`` holds the global weights."""

    def on_local_train_end(self, trainer: FederatedTrainer, round: int, result: LocalTraining) -> None:
        """After local training, before anything is sent: ``trainer.site.model`` holds this site's local model.

        Altering the model here alters what this site contributes (e.g. to test update screening).
        """

    def on_aggregate_end(self, trainer: FederatedTrainer, round: int, global_params: Tensor) -> None:
        """After aggregation: ``global_params`` (flat) is the new global vector, loaded into the model."""

    def on_validation_end(self, trainer: FederatedTrainer, round: int, metrics: dict[str, Any]) -> None:
        """After every site validated the new global model; ``metrics`` holds the site and pooled values."""

    def on_round_end(self, trainer: FederatedTrainer, round: int, metrics: dict[str, Any]) -> None:
        """After the round's decisions and checkpoint; ``metrics`` is the round's history row."""

    def on_fit_end(self, trainer: FederatedTrainer) -> None:
        """After the last round (or an early stop)."""
