"""Everything ``fit`` prepares at a site before the federation opens: loaders, the wrapped model, DP-SGD.

Kept apart so that :meth:`FederatedTrainer.fit` reads as the run (handshake, resume or start, rounds) and
:meth:`FederatedTrainer._run_round` as the round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from neurofed.federated.batches import datamodule_loader, num_examples
from neurofed.federated.checkpoint_io import CheckpointError
from neurofed.federated.dp_sgd import PrivateSite, poisson_loader, scans_per_patient, steps_per_round
from neurofed.federated.local_training import passes_per_round

__all__ = ["FitLoaders", "resume_privacy", "setup_fit"]


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
        rank = trainer.federation.site_rank
        trained_rounds = sum(rank in trainer.sampled_sites(r) for r in range(trainer.rounds))
        planned = trained_rounds * steps_per_round(train, passes, trainer.local_steps)
        trainer._private = PrivateSite(trainer.privacy, train_dataloaders, planned,
                                       scans_per_patient=scans_per_patient(train_dataloaders.dataset))
    site.setup(model, with_optimizer=True, privacy=trainer._private)
    return FitLoaders(train, site.setup_eval_loader(val_dataloaders), n_train, passes)


def resume_privacy(trainer: Any, local_record: dict[str, Any], where: str) -> None:
    """Under DP-SGD, restore the accountant's history from the resumed round's local record, as it was.

    Past steps keep the σ and q they were taken with; a resume with other settings changes only the steps to
    come. A record of a private run without that history cannot be accounted and is refused.
    """
    private = trainer._private
    if private is None:
        return
    state = local_record.get("privacy")
    if state is None and any("privacy/epsilon" in row for row in trainer.history_before_resume):
        raise CheckpointError(f"{where} records DP-SGD rounds but not the accountant's history, so the budget they "
                              "spent cannot be accounted; resume from a round written by this neurofed version")
    private.resume_from((state or {}).get("history", []))
