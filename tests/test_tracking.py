"""W&B runs are grouped per federation, one run per site, offline by default; wandb is never imported."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from neurofed.tracking import configure_site_loggers, group_wandb_runs


class WandbLogger:  # same class name as Lightning's; only the name is inspected
    def __init__(self, **init):
        self._wandb_init = dict(init)


def test_site_runs_share_the_federation_group(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = WandbLogger(name=None, project="neurofed")
    group_wandb_runs([logger, object()], run_name="fed1", site_name="ixi")
    assert logger._wandb_init["group"] == "fed1"
    assert logger._wandb_init["job_type"] == "site"
    assert logger._wandb_init["name"] == "fed1-ixi"
    assert logger._wandb_init["mode"] == "offline"


def test_user_choices_win(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    logger = WandbLogger(name="mine", group="g", job_type="j")
    group_wandb_runs([logger], run_name="fed1", site_name="ixi")
    assert logger._wandb_init == {"name": "mine", "group": "g", "job_type": "j"}


def test_configure_uses_the_site_name_and_never_imports_wandb(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    sys.modules.pop("wandb", None)
    logger = WandbLogger(name=None)
    trainer = SimpleNamespace(loggers=[logger], run_name="demo")
    configure_site_loggers(trainer, SimpleNamespace(site_names=["sald"]))
    assert logger._wandb_init["name"] == "demo-sald"
    assert "wandb" not in sys.modules


def test_lightning_wandb_logger_built_like_the_cli_does_gets_the_group(monkeypatch, tmp_path):
    # LightningCLI passes every wandb.init argument from the YAML, unset ones as None (group=None, job_type=None).
    from lightning.pytorch.loggers import WandbLogger as RealWandbLogger

    from neurofed.lightning_compat import wandb_init_kwargs

    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = RealWandbLogger(project="neurofed", save_dir=str(tmp_path), group=None, job_type=None, name=None)
    group_wandb_runs([logger], run_name="fed1", site_name="ixi")
    init = wandb_init_kwargs(logger)
    assert (init["group"], init["job_type"], init["name"], init["mode"]) == ("fed1", "site", "fed1-ixi", "offline")
