"""``neurofed fit | validate | test | predict``: LightningCLI with the federated trainer.

LightningCLI only accepts subclasses of Lightning's ``Trainer`` as its trainer class, so :class:`NeurofedCLI`
registers the federated trainer's arguments itself (``add_core_arguments_to_parser``) and instantiates it
without Trainer callbacks; the resolved configuration is saved next to the run's checkpoints instead of through
Lightning's ``SaveConfigCallback``. This module imports torch and Lightning; :mod:`neurofed.cli` imports it only
for these four commands, so that ``neurofed --help`` and the light commands start at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from neurofed.cli import EXTRA_COMMANDS, USAGE, polish_help
from neurofed.data import BrainMRIDataModule
from neurofed.data.validation import NeurofedDataError
from neurofed.federated import FederatedTrainer
from neurofed.federated.commit import BEST_FILE, committed_rounds, site_dir
from neurofed.federated.results import (
    HISTORY_FILE,
    SiteRecord,
    read_json,
    refuse_existing_run,
    site_record_dir,
    strategy_name,
    write_site_results,
)
from neurofed.federated.state import resolve_weights_path
from neurofed.lightning_compat import cli_class, cli_config_value, cli_parser, shorten_subclass_lists
from neurofed.models import BrainAgeModule, SDMTModule  # noqa: F401 - listed by ``--model`` as known subclasses
from neurofed.tracking import WandbReport, configure_site_loggers, is_wandb_logger

__all__ = ["FitInterrupted", "NeurofedCLI", "cli_main", "synth_suggestion"]

class FitInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``fit``: which round this site has committed, so the command can say how to resume."""

    def __init__(self, run_dir: Path, site_rank: int, committed: int | None, interrupted_round: int) -> None:
        super().__init__(run_dir, site_rank, committed, interrupted_round)
        self.run_dir, self.site_rank, self.committed, self.interrupted_round = (run_dir, site_rank, committed,
                                                                                  interrupted_round)


class NeurofedCLI(LightningCLI):
    """LightningCLI whose trainer is the :class:`FederatedTrainer`."""

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(
            FederatedTrainer, "trainer", instantiate=False, fail_untyped=False, sub_configs=True
        )
        parser.add_lightning_class_args(cli_class(self, "model"), "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(cli_class(self, "data"), "data", subclass_mode=self.subclass_mode_data)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The backbone's input channels follow the modalities the data module stacks (T1w, T1w+FLAIR, ...).
        parser.link_arguments(
            "data", "model.init_args.in_channels", compute_fn=_num_channels, apply_on="instantiate"
        )

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]) -> None:
        shorten_subclass_lists()  # `--model.help X` would list every torch.nn.Module subclass as a backbone
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        polish_help(self.parser, "neurofed")
        self.parser.usage = USAGE
        for name, parser in getattr(self, "_subcommand_parsers", {}).items():
            polish_help(parser, f"neurofed {name}")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> FederatedTrainer:
        return self.trainer_class(**config)

    def before_instantiate_classes(self) -> None:
        _check_data_roots(cli_config_value(self, self.config, "data"))
        if self.subcommand == "fit":
            _check_run_folder(self.config["fit"])

    def after_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        configure_site_loggers(self.trainer, self.datamodule)
        resolved = self.config[self.subcommand].clone()
        self.trainer.config = {k: v for k, v in resolved.as_dict().items() if k in ("trainer", "model", "data")}
        self.report = WandbReport() if any(map(is_wandb_logger, self.trainer.loggers)) else None
        if self.subcommand == "fit":  # the config is saved once the sites agreed: a refused resume leaves it be
            self.trainer.site.callbacks += [_AtFitStart(self._save_resolved_config), SiteRecord(),
                                            *([self.report] if self.report else [])]
        else:
            self._save_resolved_config()

    def _save_resolved_config(self) -> None:
        """Keep the exact configuration beside the run and in each site's folder, so a result can always be
        traced to its settings, at every hospital."""
        site = self.trainer.site
        if not site.is_leader:
            return
        run_dir = Path(self.trainer.run_dir)
        paths = [run_dir / f"site-{site.federation.site_rank}" / f"config-{self.subcommand}.yaml"]
        if site.is_global_leader:
            paths.append(run_dir / f"config-{self.subcommand}.yaml")
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            cli_parser(self, self.subcommand).save(
                self.config[self.subcommand], path, skip_none=False, overwrite=True, multifile=False
            )

    def fit(self, model: LightningModule, datamodule: Any = None, ckpt_path: str | None = None, **kwargs: Any) -> None:
        """Train, then test the best global model on every site's held-out split and write the figures."""
        trainer = self.trainer
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
        except KeyboardInterrupt:
            rank = trainer.federation.site_rank
            committed = committed_rounds(trainer.run_dir, rank)
            raise FitInterrupted(site_dir(trainer.run_dir, rank), rank, committed[0] if committed else None,
                                 trainer.state.round + 1) from None
        if not trainer.best_model_path:
            return
        rows = trainer.test(model, datamodule=datamodule, ckpt_path="best")
        written = self._write_predictions(model, datamodule, ckpt_path="best")
        if trainer.site.is_leader:
            written += self._write_site_record(rows, model, getattr(datamodule, "label", "target"))
        if self.report is not None:
            self.report.report_test(trainer, rows, written)
            self.report.finish(trainer)
        if trainer.site.is_leader:
            print(f"best global model: {trainer.best_model_path}")
            for path in written:
                print(f"wrote {path}")

    def _write_site_record(self, rows: dict[str, dict[str, float]], model: LightningModule, label: str) -> list[Path]:
        """This site's test table and loss curves under ``site-<k>/``; site 0 also the run-level figure.

        Axes give the loss and its unit (L1 is in the label's unit); a run of one site has no separate pooled
        curve, which would hide its own.
        """
        from neurofed.data.labels import loss_axis
        from neurofed.plots import loss_per_round

        trainer, site_rank = self.trainer, self.trainer.federation.site_rank
        written = [write_site_results(trainer.run_dir, site_rank, "test", rows)]
        history_path = site_record_dir(trainer.run_dir, site_rank) / HISTORY_FILE
        history = read_json(history_path) if history_path.is_file() else []  # all rounds, a resume's too
        if not history:
            return written
        style = {"run": trainer.run_name, "strategy": strategy_name(trainer)}
        loss = (getattr(model, "hparams", None) or {}).get("loss", "l1" if isinstance(model, SDMTModule) else None)
        pooled = [row["val/pooled/loss"] for row in history]
        if trainer.site.is_global_leader:
            written.append(loss_per_round({"pooled validation loss": pooled}, trainer.run_dir / "val_loss.png",
                                          ylabel=loss_axis(loss, label, "validation loss"), **style))
        own = {"validation": [row["val/site/loss"] for row in history],
               "training": [row["train/site/loss"] for row in history]}
        curves = own if trainer.federation.num_sites == 1 else {
            "this site, validation": own["validation"], "pooled validation": pooled, "this site, training": own["training"]}
        written.append(loss_per_round(curves, site_record_dir(trainer.run_dir, site_rank) / "loss.png",
                                      ylabel=loss_axis(loss, label), **style))
        return written

    def predict(self, model: LightningModule, datamodule: Any = None, ckpt_path: str | None = None, **kwargs: Any) -> None:
        """Predict every indexed scan and write the BIDS-derivatives table and scatter plot per site."""
        for path in self._write_predictions(model, datamodule, ckpt_path=ckpt_path):
            print(f"wrote {path}")

    def _write_predictions(self, model: LightningModule, datamodule: Any, ckpt_path: str | None) -> list[Path]:
        """Predict every scan and write the tables. After ``fit`` (``ckpt_path="best"``) the run's training
        record (splits, bias correction) is stored in its best checkpoints first; otherwise it is read from the
        checkpoint, so a model applied to new data keeps the split and correction of the run that trained it."""
        from neurofed.predictions import run_training_record, write_predictions
        from neurofed.provenance import read_training_record, store_training_record

        trainer = self.trainer
        outputs = trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt_path)
        if not outputs or not trainer.site.is_leader:
            return []
        if ckpt_path == "best":  # this run's own model on its own data
            checkpoint = trainer.best_model_path
            record = run_training_record(outputs, datamodule, trainer.run_name)
            published = [checkpoint, *([trainer.run_dir / BEST_FILE] if trainer.site.is_global_leader else [])]
            store_training_record(published, record)
        else:
            checkpoint = None if ckpt_path is None else resolve_weights_path(
                ckpt_path, trainer.run_dir, trainer.federation.site_rank)
            record = read_training_record(checkpoint)
        return write_predictions(outputs, datamodule, model, run_name=trainer.run_name, checkpoint=checkpoint,
                                 strategy=strategy_name(trainer), training_record=record)


class _AtFitStart:
    """A round hook that calls ``action`` when the fit starts (after the handshake and any resume)."""

    def __init__(self, action: Any) -> None:
        self.action = action

    def on_fit_start(self, trainer: Any) -> None:
        self.action()


def _num_channels(data: BrainMRIDataModule) -> int:
    return data.num_channels


def _check_data_roots(data_config: Any) -> None:
    """Fail before any work starts when a data root does not exist: the most common first-run mistake."""
    if data_config is None:
        return
    init_args = data_config.get("init_args", data_config) if hasattr(data_config, "get") else None
    roots = init_args.get("root") if init_args is not None else None
    if roots is None:
        return
    for root in [roots] if isinstance(roots, (str, Path)) else roots:
        if not Path(root).is_dir():
            raise NeurofedDataError(
                f"data root {root!s} does not exist. Point --data.root at a BIDS dataset "
                "(a folder with participants.tsv and sub-*/), or create synthetic sites with "
                f"`{synth_suggestion(root, init_args.get('label') or 'age')}`."
            )


def synth_suggestion(root: str | Path, label: str) -> str:
    """The ``neurofed synth`` command that creates ``root``: MS sites for an SDMT label, healthy ones for age."""
    from neurofed.data.synth.sites import DEFAULT_SITES, SITES

    root = Path(root)
    ms = label.lower() == "sdmt"
    cohort = " --cohort ms" if ms else ""
    # The cohort's three default sites come together (the shipped configs use all three); others by name.
    sites = f" --sites {root.name}" if root.name in SITES and root.name not in DEFAULT_SITES["ms" if ms else "healthy"] else ""
    return f"neurofed synth --out {root.parent.as_posix()}{cohort}{sites}"


def _check_run_folder(fit_config: Any) -> None:
    """Refuse, before any work, a ``fit`` into a folder that holds a run, unless resuming or overwriting."""
    trainer = fit_config.get("trainer") or {}
    if fit_config.get("ckpt_path") is not None or trainer.get("overwrite"):
        return
    federation = trainer.get("federation")
    site_rank = int(federation.get("site_rank", 0) or 0) if federation is not None else 0
    run_dir = Path(trainer.get("default_root_dir") or "checkpoints") / (trainer.get("run_name") or "run")
    refuse_existing_run(run_dir, site_rank)


def cli_main(args: Sequence[str] | None = None) -> NeurofedCLI:
    """Run the LightningCLI part of ``neurofed`` (fit/validate/test/predict)."""
    return NeurofedCLI(
        model_class=LightningModule,
        datamodule_class=BrainMRIDataModule,
        trainer_class=FederatedTrainer,
        subclass_mode_model=True,
        save_config_callback=None,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=list(args) if args is not None else None,
        parser_kwargs={
            "prog": "neurofed",
            "description": "Federated brain-age and SDMT models on brain MRI. More commands: "
            + "; ".join(f"`neurofed {name}` to {text}" for name, (_, text) in EXTRA_COMMANDS.items())
            + "."
        },
    )


