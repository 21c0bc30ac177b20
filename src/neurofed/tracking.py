"""Experiment tracking conventions shared by every site of a federation.

CSV logs are the default (no account, no network). Weights & Biases is opt-in through the config
(``trainer.logger: class_path: lightning.pytorch.loggers.WandbLogger``); ``wandb`` is imported only when such
a logger starts, so a machine without it runs everything else. Each federation is one W&B *group* and each
site one *run* with ``job_type="site"`` named ``<run>-<site>``, so the sites' curves sit side by side.

Every logger gets the run's configuration once, as flat dotted names (``trainer.rounds``, ``model.lr``,
``data.root``, plus ``site.rank`` and ``site.name``): the configuration ``neurofed`` resolved from its YAML
files and options, or the trainer's and model's own settings when a script builds them (:func:`run_config`).
Offline runs go to ``$WANDB_DIR/wandb/`` when that is set and the logger has no ``save_dir`` of its own, else to
``<save_dir>/wandb/`` (``./wandb/`` by default); ``wandb sync <that folder>/offline-run-*`` uploads them.

Lightning's WandbLogger records what the trainer logs (per-round metrics at ``trainer/global_step`` =
round). What a W&B user also expects of a finished run, and Lightning cannot know, is added by
:class:`WandbReport`: the best round, the test table, the figures and, with ``log_model``, the best
checkpoint as a model artifact.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from neurofed.lightning_compat import wandb_init_kwargs

__all__ = ["WandbReport", "configure_site_loggers", "flatten_config", "group_wandb_runs", "is_wandb_logger",
           "run_config"]


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
        # WandbLogger passes its save_dir (default ".") as wandb.init's dir, which would override $WANDB_DIR.
        if os.environ.get("WANDB_DIR") and init.get("dir") in (None, "", "."):
            init["dir"] = os.environ["WANDB_DIR"]
        if init.get("anonymous") is None:  # wandb warns that the setting has no effect whenever it is passed
            init.pop("anonymous", None)


def site_display_name(datamodule: Any) -> str:
    """The site's dataset name (``ixi``), ``pooled`` for a centralized run over several roots."""
    names = getattr(datamodule, "site_names", None) or []
    return names[0] if len(names) == 1 else ("pooled" if names else "site")


def configure_site_loggers(trainer: Any, datamodule: Any) -> None:
    """Apply the grouping convention to the loggers of a freshly built trainer."""
    group_wandb_runs(getattr(trainer, "loggers", []) or [], trainer.run_name, site_display_name(datamodule))


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"trainer": {"rounds": 3}}`` -> ``{"trainer.rounds": 3}``; ``init_args`` levels are dropped.

    W&B filters and compares runs by flat keys, so ``model.lr`` is easier to use than a nested dict.
    Values that are not plain JSON types are recorded as their string.
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = prefix if key == "init_args" else (f"{prefix}.{key}" if prefix else str(key))
        if isinstance(value, Mapping):
            flat |= flatten_config(value, name)
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            flat[name] = list(value)
        else:
            flat[name] = str(value)
    return flat


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def own_config(trainer: Any, model: Any) -> dict[str, Any]:
    """The ``trainer`` and ``model`` sections of a run built in Python, shaped like ``neurofed``'s config."""
    federation = {f.name: getattr(trainer.federation, f.name) for f in dataclasses.fields(trainer.federation)}
    return {
        "trainer": {
            "rounds": trainer.rounds, "local_epochs": trainer.local_epochs, "local_steps": trainer.local_steps,
            "precision": trainer.precision, "devices": trainer.devices,
            "strategy": {"class_path": _class_path(trainer.strategy), "init_args": trainer.strategy.hparams()},
            "sites_per_round": trainer.sites_per_round, "patience": trainer.patience,
            "lr_plateau_patience": trainer.lr_plateau_patience, "lr_plateau_factor": trainer.lr_plateau_factor,
            "min_lr": trainer.min_lr, "seed": trainer.seed, "run_name": trainer.run_name,
            "federation": federation, "privacy": trainer.privacy,
        },
        "model": {"class_path": _class_path(model), "init_args": dict(getattr(model, "hparams", {}) or {})},
    }


def run_config(trainer: Any, model: Any, site_name: str) -> dict[str, Any]:
    """What every logger records as the run's configuration: one flat dict, dotted names only.

    ``trainer.config`` (the resolved configuration the ``neurofed`` command sets) when there is one, else
    :func:`own_config`; then ``site.rank`` and ``site.name``, the only values that differ between the sites.
    """
    config = trainer.config if getattr(trainer, "config", None) else own_config(trainer, model)
    return {**flatten_config(config), "site.rank": trainer.federation.site_rank, "site.name": site_name}


class WandbReport:
    """Round-hook callback that completes each site's W&B run; added by the CLI when a WandbLogger is set.

    At the end of ``fit`` it records the best round and its pooled validation loss in the run's summary.
    :meth:`report_test` adds the test table (a ``wandb.Table`` and one summary key per site and metric) and
    the figures; :meth:`finish` uploads, when the logger was built with ``log_model``, the site's best
    checkpoint as a ``model`` artifact (after the test, so that it carries the run's training record) and
    closes the run. Only the site leader writes; ``wandb`` is imported by the logger, never by this module.
    """

    @staticmethod
    def runs(trainer: Any) -> list[Any]:
        """The W&B runs of this site (started on first use), none on a non-leader rank."""
        if not trainer.site.is_leader:
            return []
        return [logger.experiment for logger in trainer.loggers if is_wandb_logger(logger)]

    def on_fit_start(self, trainer: Any) -> None:
        for run in self.runs(trainer):
            run.define_metric("best/*", summary="last")

    def on_fit_end(self, trainer: Any) -> None:
        state = trainer.state
        for logger in (lg for lg in trainer.loggers if is_wandb_logger(lg)):
            if not trainer.site.is_leader:
                continue
            run = logger.experiment
            if state.best_round >= 0:
                run.summary["best/round"] = state.best_round + 1
                run.summary["best/val/pooled/loss"] = state.best_val_loss
            run.summary["rounds_done"] = state.round

    @staticmethod
    def _log_checkpoint(run: Any, trainer: Any) -> None:
        import wandb

        from neurofed.federated.results import strategy_name

        state = trainer.state
        artifact = wandb.Artifact(
            name=f"model-{trainer.run_name}-site{trainer.federation.site_rank}", type="model",
            metadata={"best_round": state.best_round + 1, "val/pooled/loss": state.best_val_loss,
                      "strategy": strategy_name(trainer), "run": trainer.run_name},
        )
        artifact.add_file(str(trainer.best_model_path), name="best.ckpt")
        run.log_artifact(artifact, aliases=["best", f"round-{state.best_round + 1}"])

    def report_test(self, trainer: Any, rows: Mapping[str, Mapping[str, float]], figures: Iterable[Path] = ()) -> None:
        """Record the test table (per site and pooled) and the figures in this site's run(s)."""
        runs = self.runs(trainer)
        if not runs:
            return
        import wandb

        metrics = sorted({key for row in rows.values() for key in row})
        table = wandb.Table(columns=["site", *metrics],
                            data=[[name, *[row.get(key) for key in metrics]] for name, row in rows.items()])
        images = {f"figures/{Path(p).stem}": wandb.Image(str(p)) for p in figures if Path(p).suffix == ".png"}
        for run in runs:
            run.log({"test/table": table, **images})
            run.summary.update({f"test/{name}/{key}": value for name, row in rows.items() for key, value in row.items()})

    def finish(self, trainer: Any) -> None:
        """Upload the best checkpoint (``log_model``), then close this site's runs so that their files are
        complete when the command returns."""
        for logger in (lg for lg in trainer.loggers if is_wandb_logger(lg)):
            if not trainer.site.is_leader:
                continue
            if getattr(logger, "_log_model", False) and trainer.best_model_path and Path(trainer.best_model_path).is_file():
                self._log_checkpoint(logger.experiment, trainer)
            logger.experiment.finish()
