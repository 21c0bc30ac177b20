"""Experiment tracking conventions shared by every site of a federation.

CSV logs are the default (no account, no network). Weights & Biases is opt-in through the config
(``trainer.logger: class_path: lightning.pytorch.loggers.WandbLogger``); ``wandb`` itself is imported by
Lightning only when such a logger starts, so a machine without it runs everything else. Each federation is
one W&B *group* and each site one *run* with ``job_type="site"``, so the sites' curves sit side by side.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from neurofed.lightning_compat import wandb_init_kwargs


def is_wandb_logger(logger: Any) -> bool:
    """True for Lightning's WandbLogger, checked by name so that ``wandb`` is never imported here."""
    return type(logger).__name__ == "WandbLogger"


def group_wandb_runs(loggers: Iterable[Any], run_name: str, site_name: str) -> None:
    """Put every site of one federation in one W&B group, one run per site, offline unless asked otherwise."""
    for logger in loggers:
        if not is_wandb_logger(logger):
            continue
        init = wandb_init_kwargs(logger)
        # LightningCLI fills every wandb.init argument from the YAML, unset ones as None: treat None as unset.
        if not init.get("group"):
            init["group"] = run_name
        if not init.get("job_type"):
            init["job_type"] = "site"
        if not init.get("name"):
            init["name"] = f"{run_name}-{site_name}"
        if "WANDB_MODE" not in os.environ and not init.get("mode"):
            init["mode"] = "offline"


def configure_site_loggers(trainer: Any, datamodule: Any) -> None:
    """Apply the grouping convention to the loggers of a freshly built trainer."""
    names = getattr(datamodule, "site_names", None) or []
    site = names[0] if len(names) == 1 else ("pooled" if names else "site")
    group_wandb_runs(getattr(trainer, "loggers", []) or [], trainer.run_name, site)
