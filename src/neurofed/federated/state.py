"""What a federated run writes to disk each round, and how a run picks up from it.

Two files per round, split by who may see them:

* ``<run>/round-last.pt`` holds what every site agrees on: the global (aggregated) weights, the strategy's
  server state (FedAdam moments), the round number, the best pooled validation loss, the early-stop
  counter, the LR-plateau scheduler's state, the current learning rate and the site-sampling rule. Every
  site computes exactly the same content, so in a simulation where all sites share one folder, their
  atomic writes of this file are interchangeable.
* ``<run>/site-<rank>/local-last.pt`` holds what only this site has: its full model ``state_dict`` (with
  entries that are never aggregated, such as FedBN's batch-norm layers), its optimizer state, the random
  number generator states of its leader process (torch, CUDA, numpy, python) and its optimizer step count.

The local file is written before the shared one; both carry the round number and a resume refuses files
from different rounds. ``best.ckpt`` is a Lightning-format checkpoint of the best global model, so
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

from neurofed.federated.checkpoint_io import CheckpointError, atomic_save, load

__all__ = [
    "BEST_FILE",
    "LOCAL_FILE",
    "ROUND_FILE",
    "RoundState",
    "capture_rng",
    "load_round",
    "lightning_checkpoint",
    "resolve_weights_path",
    "restore_round",
    "restore_rng",
    "save_best",
    "save_round",
    "site_dir",
    "weights_from_checkpoint",
]

ROUND_FILE = "round-last.pt"
LOCAL_FILE = "local-last.pt"
BEST_FILE = "best.ckpt"


@dataclass
class RoundState:
    """Counters that every site keeps identical, so every site takes the same decisions."""

    round: int = 0  # number of completed rounds
    best_val_loss: float = math.inf
    best_round: int = -1
    rounds_without_improvement: int = 0  # early stopping
    lr_scale: float = 1.0  # product of the plateau reductions applied so far
    stopped: bool = False

    def record(self, r: int, val_loss: float, has_val: bool, patience: int | None) -> bool:
        """Account for round ``r``'s (0-based) pooled validation loss; returns True for a new best model.

        A round without validation examples counts as an improvement, so that training without a
        validation split keeps the last model and never stops early.
        """
        self.round = r + 1
        improved = not has_val or val_loss < self.best_val_loss
        if improved:
            if has_val:
                self.best_val_loss, self.best_round = val_loss, r
            self.rounds_without_improvement = 0
        else:
            self.rounds_without_improvement += 1
        if patience is not None and self.rounds_without_improvement >= patience:
            self.stopped = True
        return improved

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundState:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def site_dir(run_dir: str | Path, site_rank: int) -> Path:
    """Folder of one site's private files inside a run."""
    return Path(run_dir) / f"site-{site_rank}"


def capture_rng() -> dict[str, Any]:
    """Random number generator states of this process."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_round(
    run_dir: str | Path,
    site_rank: int,
    *,
    state: RoundState,
    global_weights: dict[str, Tensor],
    strategy_state: dict[str, Any],
    sampling: dict[str, Any],
    lr: list[float],
    model_state: dict[str, Tensor],
    optimizer_state: dict[str, Any],
    global_step: int,
    plateau_state: dict[str, Any] | None = None,
) -> Path:
    """Write this site's local file, then the shared round file; returns the round file's path."""
    atomic_save(
        {
            "round": state.round,
            "model": {k: v.detach().cpu() for k, v in model_state.items()},
            "optimizer": optimizer_state,
            "rng": capture_rng(),
            "global_step": global_step,
        },
        site_dir(run_dir, site_rank) / LOCAL_FILE,
    )
    return atomic_save(
        {
            "round": state.round,
            "global": {k: v.detach().cpu() for k, v in global_weights.items()},
            "strategy": strategy_state,
            "trainer": state.to_dict(),
            "sampling": sampling,
            "lr": list(lr),
            "plateau": plateau_state,
        },
        Path(run_dir) / ROUND_FILE,
    )


def load_round(round_path: str | Path, site_rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a round file and this site's local file beside it, checking they belong to the same round."""
    round_path = Path(round_path)
    shared = load(round_path)
    if not isinstance(shared, dict) or "global" not in shared:
        raise CheckpointError(
            f"{round_path} is not a round checkpoint (no 'global' entry); resume a fit from "
            f"ckpt_path='last' or a path to a {ROUND_FILE}"
        )
    local_path = site_dir(round_path.parent, site_rank) / LOCAL_FILE
    local = load(local_path)
    if local["round"] != shared["round"]:
        raise CheckpointError(
            f"{local_path} is from round {local['round']} but {round_path} from round {shared['round']} "
            "(the run stopped while writing them); keep matching copies of both files to resume"
        )
    return shared, local


def restore_round(
    round_path: str | Path, site_rank: int, model: nn.Module, optimizer: Any, strategy: Any, sampling: dict[str, Any]
) -> tuple[RoundState, int, dict[str, Any] | None]:
    """Put weights, optimizer, strategy state and random state back.

    Returns the counters, the optimizer step count and the LR-plateau scheduler's state (``None`` if none).

    Refuses a checkpoint written with another site-sampling rule: the resumed rounds would train other sites.
    """
    shared, local = load_round(round_path, site_rank)
    if shared["sampling"] != sampling:
        raise ValueError(
            f"{round_path} was written with site sampling {shared['sampling']} but this run uses "
            f"{sampling}; resume with the same seed, sites_per_round and num_sites"
        )
    model.load_state_dict(local["model"])
    entries = model.state_dict()
    with torch.no_grad():
        for k, v in shared["global"].items():
            entries[k].copy_(v)
    optimizer.load_state_dict(local["optimizer"])
    strategy.load_state_dict(shared["strategy"])
    restore_rng(local["rng"])
    return RoundState.from_dict(shared["trainer"]), int(local["global_step"]), shared.get("plateau")


def lightning_checkpoint(model: nn.Module, epoch: int, global_step: int) -> dict[str, Any]:
    """A checkpoint dict that ``LightningModule.load_from_checkpoint`` understands."""
    import lightning

    hparams = dict(getattr(model, "hparams", {}) or {})
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "hyper_parameters": hparams,
        "pytorch-lightning_version": lightning.__version__,
        "epoch": int(epoch),
        "global_step": int(global_step),
    }


def save_best(model: nn.Module, run_dir: str | Path, site_rank: int, epoch: int, global_step: int) -> Path:
    """Write ``site-<rank>/best.ckpt`` (site 0 also the run's ``best.ckpt``); returns the site's file."""
    checkpoint = lightning_checkpoint(model, epoch=epoch, global_step=global_step)
    path = atomic_save(checkpoint, site_dir(run_dir, site_rank) / BEST_FILE)
    if site_rank == 0:
        atomic_save(checkpoint, Path(run_dir) / BEST_FILE)
    return path


def resolve_weights_path(ckpt_path: str, run_dir: str | Path, site_rank: int) -> Path:
    """Map ``"best"``/``"last"`` to this site's files in ``run_dir``; any other value is a path.

    ``"best"`` prefers this site's ``site-<rank>/best.ckpt`` (its own batch-norm layers under FedBN) and
    falls back to the run's ``best.ckpt``; ``"last"`` is this site's ``local-last.pt`` (full local model).
    """
    run_dir = Path(run_dir)
    if ckpt_path == "best":
        own = site_dir(run_dir, site_rank) / BEST_FILE
        path = own if own.is_file() else run_dir / BEST_FILE
    elif ckpt_path == "last":
        path = site_dir(run_dir, site_rank) / LOCAL_FILE
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
        local = site_dir(path.parent, site_rank) / LOCAL_FILE
        if local.is_file():
            return load(local)["model"], True
        return ckpt["global"], False
    raise CheckpointError(f"{path} holds no model weights (expected 'state_dict', 'model' or 'global')")
