"""Picking a run up where it stopped: which rounds this site can offer, and restoring the agreed one.

A site offers its newest committed round and the one before it (sites commit one after another, so a crash
can leave them one round apart); the handshake picks the newest round every site holds. A resume must
keep the run's settings (strategy and its hyperparameters, seed, model, screening...): the committed round
records them, and a changed one is refused before the federation opens. Restoring puts back the model,
optimizer, strategy state, counters, LR scheduler, history, random state and DP-SGD's accountant history, so
a resumed non-private run repeats the uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from neurofed.federated import state as ckpt
from neurofed.federated.checkpoint_io import CheckpointError, load
from neurofed.federated.commit import ROUND_FILE, committed_rounds, load_round, publish_best, round_dir
from neurofed.federated.fit_setup import resume_privacy

__all__ = ["RESUMABLE_CHANGES", "committed_for", "refuse_changed_settings", "resume"]

log = logging.getLogger(__name__)


#: Fingerprint fields a resume may change: the number of rounds in all (to extend a run), and whether it resumes.
RESUMABLE_CHANGES = frozenset({"rounds", "resuming"})
#: DP-SGD's settings (σ, target ε, ...) may change on resume while the run stays private: the accountant keeps
#: every past step at the σ and q it was taken with (:func:`~neurofed.federated.fit_setup.resume_privacy`).
#: Turning DP-SGD on or off is refused like any other change: the budget of a private run must stay accounted.
PRIVACY_FIELD = "sample-level privacy"


def _resumable(field: str, stored: str | None, asked: str | None) -> bool:
    if field in RESUMABLE_CHANGES:
        return True
    return field == PRIVACY_FIELD and stored not in (None, "None") and asked not in (None, "None")


def committed_for(run_dir: Path, site_rank: int, ckpt_path: str, num_sites: int = 1) -> tuple[int, int]:
    """(newest committed round, the one before it still held) of this site, for ``ckpt_path="last"``.

    In a federation, a site that committed nothing offers ``(-1, -1)``: the handshake decides whether the run
    can go on (the others committed only round 1: every site starts it again) or not.
    """
    if ckpt_path != "last":
        raise CheckpointError(f"fit(ckpt_path={ckpt_path!r}): resume a fit with ckpt_path='last'")
    committed = committed_rounds(run_dir, site_rank)
    if committed is None and num_sites == 1:
        raise CheckpointError(
            f"nothing to resume: {ckpt.site_dir(run_dir, site_rank)} holds no committed round; start the run "
            "without --ckpt_path"
        )
    return committed if committed is not None else (-1, -1)


def refuse_changed_settings(run_dir: Path, site_rank: int, committed: tuple[int, int] | None,
                            fingerprint: dict[str, str]) -> None:
    """Refuse a resume whose settings differ from those the run's last committed round was trained with.

    Every site of a federation may change a setting together (the handshake then sees no disagreement), but
    the resumed rounds would then continue another run than the one they extend: another strategy, its
    settings, the seed, the model. Only :data:`RESUMABLE_CHANGES` may differ, and DP-SGD's settings while the
    run stays private (:data:`PRIVACY_FIELD`); such a change is logged.
    """
    if committed is None or committed[0] < 1:
        return
    path = round_dir(run_dir, site_rank, committed[0]) / ROUND_FILE
    stored = load(path).get("settings")
    if stored is None:
        log.warning("%s records no settings (written by an older neurofed); resuming without comparing them", path)
        return
    differing = [f for f in sorted(set(stored) | set(fingerprint)) if stored.get(f) != fingerprint.get(f)]
    changed = [f for f in differing if not _resumable(f, stored.get(f), fingerprint.get(f))]
    if changed:
        field = changed[0]
        raise CheckpointError(
            f"{path} was trained with {field} {stored.get(field)!r}, but this resume asks for {fingerprint.get(field)!r}"
            f"{f' (and {len(changed) - 1} more setting(s) differ)' if len(changed) > 1 else ''}; a resume continues "
            "the same run: resume with its settings (its config-fit.yaml), or start a new run with another "
            "--trainer.run_name (or replace this one with --trainer.overwrite true)"
        )
    for field in differing:
        if field != "resuming":
            log.info("resuming from %s with %s %s (it was %s)", path.parent, field, fingerprint.get(field),
                     stored.get(field))


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
