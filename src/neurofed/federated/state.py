"""What a round records, and how a run picks up from it.

A committed round (see :mod:`neurofed.federated.commit`) holds two records, split by who may see them:

* the shared record: what every site agrees on — the global (aggregated) weights, the strategy's server
  state (FedAdam moments), the counters of :class:`RoundState`, the LR-plateau scheduler's state, the
  current learning rate, the site-sampling rule, the history rows so far and the run's settings (its
  fingerprint, which a resume must match);
* the local record: what only this site has — its full model ``state_dict`` (with entries that are never
  aggregated, such as FedBN's batch-norm layers), its optimizer state, the random number generator states
  of its leader process (torch, CUDA, numpy, python) and its optimizer step count.

``best.ckpt`` is a Lightning-format checkpoint of the best global model, so
``SomeModule.load_from_checkpoint`` reads it directly.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from neurofed.federated.checkpoint_io import CheckpointError, load
from neurofed.federated.commit import BEST_FILE, COMMITTED_FILE, LOCAL_FILE, committed_rounds, round_dir, site_dir

__all__ = ["BEST_FILE", "Restored", "RoundState", "capture_rng", "lightning_checkpoint", "local_record",
           "resolve_weights_path", "restore", "restore_rng", "shared_record", "site_dir", "weights_from_checkpoint"]



@dataclass
class RoundState:
    """Counters that every site keeps identical, so every site takes the same decisions."""

    round: int = 0  # number of completed rounds
    best_val_loss: float = math.inf
    best_round: int = -1
    rounds_without_improvement: int = 0  # early stopping
    lr_scale: float = 1.0  # product of the plateau reductions applied so far
    stopped: bool = False

    def record(self, r: int, val_loss: float, has_val: bool, patience: int | None, min_rounds: int = 0) -> bool:
        """Account for round ``r``'s (0-based) pooled validation loss; returns True for a new best model.

        A round without validation examples counts as an improvement, so that training without a
        validation split keeps the last model and never stops early. A non-finite loss never does: the
        best model is chosen among finite validation losses only. The first ``min_rounds`` rounds (a
        warm-up) never stop the run, and the first round after them starts the search for the best model
        afresh: a lucky early round is never what gets tested once the run has gone past its warm-up.
        """
        self.round = r + 1
        if r == min_rounds and r > 0:
            self.best_val_loss = math.inf
        improved = not has_val or (math.isfinite(val_loss) and val_loss < self.best_val_loss)
        if improved:
            if has_val:
                self.best_val_loss, self.best_round = val_loss, r
            self.rounds_without_improvement = 0
        else:
            self.rounds_without_improvement += 1
        if patience is not None and self.rounds_without_improvement >= patience and self.round > min_rounds:
            self.stopped = True
        return improved

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundState:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def capture_rng() -> dict[str, Any]:
    """Random number generator states of this process."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {  # only tensors, numbers and containers: checkpoints load with weights_only=True
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def shared_record(state: RoundState, global_weights: dict[str, Tensor], strategy_state: dict[str, Any],
                  sampling: dict[str, Any], lr: list[float], plateau_state: dict[str, Any] | None,
                  history: list[dict[str, float]], settings: dict[str, str] | None = None) -> dict[str, Any]:
    """The record every site of a round holds identically; ``settings``: the run's fingerprint, which a resume
    must match (:func:`~neurofed.federated.resume.refuse_changed_settings`)."""
    return {
        "round": state.round, "global": {k: v.detach().cpu() for k, v in global_weights.items()},
        "strategy": strategy_state, "trainer": state.to_dict(), "sampling": sampling, "lr": list(lr),
        "plateau": plateau_state, "history": list(history), "settings": dict(settings or {}),
    }


def local_record(round: int, model_state: dict[str, Tensor], optimizer_state: dict[str, Any],
                 global_step: int, privacy: dict[str, Any] | None = None,
                 weight_average: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record only this site holds (its whole model, optimizer and random state, its weight average, and
    under DP-SGD the accountant's history of its privacy budget)."""
    return {"round": round, "model": {k: v.detach().cpu() for k, v in model_state.items()},
            "optimizer": optimizer_state, "rng": capture_rng(), "global_step": global_step, "privacy": privacy,
            "weight_average": weight_average}


@dataclass
class Restored:
    """What a resumed run continues with."""

    state: RoundState
    global_step: int
    plateau: dict[str, Any] | None
    history: list[dict[str, float]]


def restore(shared: dict[str, Any], local: dict[str, Any], model: nn.Module, optimizer: Any, strategy: Any,
            sampling: dict[str, Any], where: str) -> Restored:
    """Put weights, optimizer, strategy state and random state back from a committed round's two records.

    Refuses records of different rounds, and a round written with another site-sampling rule (the resumed
    rounds would train other sites).
    """
    if local["round"] != shared["round"]:
        raise CheckpointError(
            f"{where}: the local record is from round {local['round']} but the shared one from round "
            f"{shared['round']}; resume from a round committed whole"
        )
    if shared["sampling"] != sampling:
        raise CheckpointError(
            f"{where} was written with site sampling {shared['sampling']} but this run uses {sampling}; resume "
            "with the same seed, sites_per_round and num_sites"
        )
    model.load_state_dict(local["model"])
    entries = model.state_dict()
    with torch.no_grad():
        for k, v in shared["global"].items():
            entries[k].copy_(v)
    optimizer.load_state_dict(local["optimizer"])
    strategy.load_state_dict(shared["strategy"])
    restore_rng(local["rng"])
    return Restored(RoundState.from_dict(shared["trainer"]), int(local["global_step"]), shared.get("plateau"),
                    list(shared.get("history", [])))


def lightning_checkpoint(model: nn.Module, epoch: int, global_step: int) -> dict[str, Any]:
    """A checkpoint dict that ``LightningModule.load_from_checkpoint`` understands."""
    import lightning

    hparams = dict(getattr(model, "hparams", {}) or {})
    return {
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},  # a copy: the model moves on
        "hyper_parameters": hparams,
        "pytorch-lightning_version": lightning.__version__,
        "epoch": int(epoch),
        "global_step": int(global_step),
    }


def resolve_weights_path(ckpt_path: str, run_dir: str | Path, site_rank: int) -> Path:
    """Map ``"best"``/``"last"`` to this site's files in ``run_dir``; any other value is a path.

    ``"best"`` prefers this site's ``site-<rank>/best.ckpt`` (its own batch-norm layers under FedBN) and
    falls back to the run's ``best.ckpt``; ``"last"`` is this site's last committed ``local.pt`` (full model).
    """
    run_dir = Path(run_dir)
    if ckpt_path == "best":
        own = site_dir(run_dir, site_rank) / BEST_FILE
        path = own if own.is_file() else run_dir / BEST_FILE
    elif ckpt_path == "last":
        committed = committed_rounds(run_dir, site_rank)
        path = round_dir(run_dir, site_rank, committed[0]) / LOCAL_FILE if committed else site_dir(
            run_dir, site_rank) / COMMITTED_FILE
    else:
        path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} (from ckpt_path={ckpt_path!r}) does not exist; run fit first or check "
            "default_root_dir/run_name"
        )
    return path


def weights_from_checkpoint(path: str | Path, site_rank: int) -> tuple[dict[str, Tensor], bool]:
    """Model weights from a Lightning checkpoint, a local or a round file; ``strict`` says if complete.

    A round file holds only the aggregated entries, so its site's local file is used when present.
    """
    path = Path(path)
    ckpt = load(path)
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        return ckpt["state_dict"], True
    if isinstance(ckpt, dict) and "model" in ckpt:
        return ckpt["model"], True
    if isinstance(ckpt, dict) and "global" in ckpt:
        local = path.parent / LOCAL_FILE
        if local.is_file():
            return load(local)["model"], True
        return ckpt["global"], False
    raise CheckpointError(f"{path} holds no model weights (expected 'state_dict', 'model' or 'global')")
