"""Everything ``fit`` prepares at a site before the federation opens: loaders, the wrapped model, DP-SGD.

Kept apart so that :meth:`FederatedTrainer.fit` reads as the run (handshake, resume or start, rounds) and
:meth:`FederatedTrainer._run_round` as the round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from neurofed.federated.batches import datamodule_loader, num_examples
from neurofed.federated.dp_sgd import PrivateSite, poisson_loader, steps_per_round
from neurofed.federated.local_training import passes_per_round

__all__ = ["FitLoaders", "account_resumed_privacy", "setup_fit"]


@dataclass(frozen=True)
class FitLoaders:
    """The site's training and validation loaders, its example count and its passes per round."""

    train: Any
    val: Any
    n_train: int
    passes: int


def setup_fit(trainer: Any, model: Any, datamodule: Any, train_dataloaders: Any, val_dataloaders: Any) -> FitLoaders:
    """Launch the site, set up its loaders (Poisson-sampled under DP-SGD) and wrap the model and optimizer."""
    site = trainer.site
    fabric = site.launch()
    train_dataloaders = site.stage_loaders("fit", datamodule, train_dataloaders)
    if val_dataloaders is None and datamodule is not None:
        val_dataloaders = datamodule_loader(datamodule, "val_dataloader")
    if trainer.privacy is not None:
        train_dataloaders = poisson_loader(train_dataloaders)
    n_train = num_examples(train_dataloaders)
    train = fabric.setup_dataloaders(train_dataloaders)
    passes = passes_per_round(train, trainer.local_epochs, trainer.local_steps)
    trainer._private = None
    if trainer.privacy is not None:
        planned = trainer.rounds * steps_per_round(train, passes, trainer.local_steps)
        trainer._private = PrivateSite(trainer.privacy, train_dataloaders, planned)
    site.setup(model, with_optimizer=True, privacy=trainer._private)
    return FitLoaders(train, site.setup_eval_loader(val_dataloaders), n_train, passes)


def account_resumed_privacy(trainer: Any, loaders: FitLoaders) -> None:
    """Under DP-SGD, count the privacy budget the rounds before the resume already spent at this site."""
    if trainer._private is None:
        return
    rank = trainer.federation.site_rank
    trained = sum(rank in trainer.sampled_sites(r) for r in range(trainer.state.round))
    trainer._private.account_past_steps(trained * steps_per_round(loaders.train, loaders.passes, trainer.local_steps))
