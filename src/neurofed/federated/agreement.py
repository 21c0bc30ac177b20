"""What every site of a federation must agree on: the fingerprint compared at the handshake.

Two sites that differ in any of these would silently train different models (another strategy, another
seed for site sampling), or crash a collective whose size depends on them (another width). Each field is a
short readable string, so a mismatch can be reported with every site's value.
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["evaluation_fingerprint", "training_fingerprint"]


def _version() -> str:
    from neurofed import __version__

    return __version__


def _parameters(model: Any, keys: list[str]) -> str:
    """Names, shapes and dtypes of the aggregated entries, as a count and a digest (the list can be long)."""
    sd = model.state_dict()
    spec = ";".join(f"{k}:{tuple(sd[k].shape)}:{sd[k].dtype}" for k in keys)
    values = sum(sd[k].numel() for k in keys)
    return f"{len(keys)} tensors, {values} values, sha256 {hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def evaluation_fingerprint(model: Any, num_sites: int) -> dict[str, str]:
    """What sites evaluating one model together must share."""
    return {"neurofed version": _version(), "model": type(model).__qualname__, "num_sites": str(num_sites),
            "model entries": _parameters(model, [k for k, v in model.state_dict().items() if v.is_floating_point()])}


def training_fingerprint(trainer: Any, model: Any, keys: list[str], resuming: bool) -> dict[str, str]:
    """What sites training one model together must share (``trainer`` is the FederatedTrainer)."""
    fed = trainer.federation
    return {
        "neurofed version": _version(),
        "model": type(model).__qualname__,
        "aggregated parameters": _parameters(model, keys),
        "strategy": repr(trainer.strategy),
        "rounds": str(trainer.rounds),
        "local epochs or steps": f"epochs={trainer.local_epochs}, steps={trainer.local_steps}",
        "seed": str(trainer.seed),
        "sampling": f"sites_per_round={trainer.sites_per_round}",
        "num_sites": str(fed.num_sites),
        "precision": str(trainer.precision),
        "stopping": f"patience={trainer.patience}, lr_plateau={trainer.lr_plateau_patience}x{trainer.lr_plateau_factor}, "
                    f"min_rounds={trainer.min_rounds}",
        "schedule": f"{trainer.lr_schedule!r}, precise_bn={trainer.precise_bn}, clip={trainer.gradient_clip_val}, "
                    f"ema={trainer.ema_decay}",
        "screening": f"max_update_norm={fed.max_update_norm}, update_norm_factor={fed.update_norm_factor}, "
                     f"min_update_cosine={fed.min_update_cosine}, max_variance_ratio={fed.max_variance_ratio}, "
                     f"max_failed_rounds={fed.max_failed_rounds}",
        "resuming": str(bool(resuming)),
        "sample-level privacy": repr(getattr(trainer, "privacy", None)),
    }
