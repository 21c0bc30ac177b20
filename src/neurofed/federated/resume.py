"""Picking a run up where it stopped: which rounds this site can offer, and restoring the agreed one.

A site offers its newest committed round and the one before it (sites commit one after another, so a crash
can leave them one round apart); the handshake picks the newest round every site holds. Restoring puts
back the model, optimizer, strategy state, counters, LR scheduler, history, random state and DP-SGD's
accountant history, so a resumed non-private run repeats the uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from neurofed.federated import state as ckpt
from neurofed.federated.checkpoint_io import CheckpointError
from neurofed.federated.commit import committed_rounds, load_round, publish_best, round_dir
from neurofed.federated.fit_setup import resume_privacy

__all__ = ["committed_for", "resume"]

log = logging.getLogger(__name__)


def committed_for(run_dir: Path, site_rank: int, ckpt_path: str) -> tuple[int, int]:
    """(newest committed round, the one before it still held) of this site, for ``ckpt_path="last"``."""
    if ckpt_path != "last":
        raise CheckpointError(f"fit(ckpt_path={ckpt_path!r}): resume a fit with ckpt_path='last'")
    committed = committed_rounds(run_dir, site_rank)
    if committed is None:
        raise CheckpointError(
            f"nothing to resume: {ckpt.site_dir(run_dir, site_rank)} holds no committed round; start the run "
            "without --ckpt_path"
        )
    return committed


def resume(trainer: Any, round: int) -> None:
    """Restore ``trainer`` (a FederatedTrainer set up for ``fit``) from this site's committed ``round``."""
    site, rank, run_dir = trainer.site, trainer.federation.site_rank, trainer.run_dir
    shared, local = load_round(run_dir, rank, round)
    folder = round_dir(run_dir, rank, round)
    restored = ckpt.restore(shared, local, site.model, site.optimizer, trainer.strategy,
                            trainer.sampling().as_dict(), where=str(folder))
    trainer.state, trainer.global_step = restored.state, restored.global_step
    trainer.history_before_resume = restored.history
    if trainer._average is not None and local.get("weight_average") is not None:
        trainer._average.load_state_dict(local["weight_average"])
    resume_privacy(trainer, local, str(folder))
    if trainer.plateau is not None and restored.plateau is not None:
        trainer.plateau.load_state_dict(restored.plateau)
    if site.is_leader and (folder / ckpt.BEST_FILE).is_file():  # a crash may have come before publishing it
        publish_best(run_dir, rank, folder / ckpt.BEST_FILE)
    best = ckpt.site_dir(run_dir, rank) / ckpt.BEST_FILE
    trainer.best_model_path = str(best) if best.is_file() else None
    log.info("%s: resumed from %s after round %d", site.name, folder, trainer.state.round)
