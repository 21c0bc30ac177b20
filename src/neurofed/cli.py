"""The ``neurofed`` command.

``neurofed fit | validate | test | predict --config X.yaml`` go through LightningCLI with
:class:`~neurofed.federated.FederatedTrainer` as the trainer, so one YAML file describes the model, the data
and the federation, ``--print_config`` shows the resolved configuration and dotted overrides
(``--trainer.rounds 5``) work. ``neurofed synth`` writes synthetic BIDS sites and ``neurofed simulate`` runs a
whole federation as one process per site on this machine.

LightningCLI only accepts subclasses of Lightning's ``Trainer`` as its trainer class, so :class:`NeurofedCLI`
registers the federated trainer's arguments itself (``add_core_arguments_to_parser``) and instantiates it
without Trainer callbacks; the resolved configuration is saved next to the run's checkpoints instead of through
Lightning's ``SaveConfigCallback``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from neurofed.data import BrainMRIDataModule
from neurofed.data.validation import NeurofedDataError
from neurofed.federated import FederatedTrainer
from neurofed.federated.checkpoint_io import CheckpointError
from neurofed.federated.errors import FederationError
from neurofed.federated.results import (
    HISTORY_FILE,
    RunExistsError,
    SiteRecord,
    read_json,
    refuse_existing_run,
    site_record_dir,
    write_site_results,
)
from neurofed.lightning_compat import cli_class, cli_config_value, cli_parser
from neurofed.models import BrainAgeModule, SDMTModule  # noqa: F401 - listed by ``--model`` as known subclasses
from neurofed.tracking import WandbReport, configure_site_loggers, is_wandb_logger

log = logging.getLogger("neurofed")

#: Commands that are not LightningCLI subcommands: name -> (module, help).
EXTRA_COMMANDS = {
    "synth": ("neurofed.data.synth.command", "write synthetic multi-site BIDS datasets"),
    "simulate": ("neurofed.federated.simulate", "run a federation of N sites as N processes on this machine"),
    "status": ("neurofed.status", "print a run's progress: rounds, best round, pooled metrics, each site's files"),
    "federation": ("neurofed.federated.preflight", "check a site's federation before training: rendezvous, peers, "
                                                    "secret, settings"),
}

USAGE = "neurofed [-h] {fit,validate,test,predict,synth,simulate,status} ..."

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|obj|data|exc):`(~?)([\w.]+)`")
_LITERAL = re.compile(r"``(.+?)``")

#: Help the docstrings cannot give: what ``--ckpt_path`` accepts, and how to move the preprocessing cache.
_EXTRA_HELP = {
    "ckpt_path": "Checkpoint to start from: 'last' resumes this run's round checkpoint, 'best' or a path loads "
    "weights; give it to continue a run folder that already holds a run.",
    "data.cache_dir": "It holds hundreds of MB for the synthetic sites; move it for every run with "
    "`export NEUROFED_CACHE=/big/disk/neurofed`, or for one run with --data.cache_dir PATH. Deleting it is "
    "safe: it is rebuilt.",
}


def plain_help(text: str | None) -> str | None:
    """Docstring text as a terminal shows it: ``:class:`~a.B``` -> ``B``, double-backquoted literals bare."""
    if not text:
        return text
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return _LITERAL.sub(lambda m: m.group(1), text)


def polish_help(parser: argparse.ArgumentParser, prog: str) -> None:
    """Strip Sphinx markup from a parser's help, fill in the help docstrings cannot give, name the program."""
    parser.prog = prog
    parser.description = plain_help(parser.description)
    for group in parser._action_groups:  # argparse keeps group titles nowhere public
        group.title, group.description = plain_help(group.title), plain_help(group.description)
    for action in parser._actions:
        if action.dest in _EXTRA_HELP and _EXTRA_HELP[action.dest] not in (action.help or ""):
            action.help = f"{action.help} {_EXTRA_HELP[action.dest]}" if action.help else _EXTRA_HELP[action.dest]
        for choice in [action, *getattr(action, "_choices_actions", [])]:  # subcommands' one-line help too
            choice.help = plain_help(choice.help) if isinstance(choice.help, str) else choice.help


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
        resolved_dict = {k: v for k, v in resolved.as_dict().items() if k in ("trainer", "model", "data")}
        self.report = WandbReport(resolved_dict) if any(map(is_wandb_logger, self.trainer.loggers)) else None
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
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
        if not trainer.best_model_path:
            return
        rows = trainer.test(model, datamodule=datamodule, ckpt_path="best")
        written = self._write_predictions(model, datamodule, ckpt_path="best")
        if trainer.site.is_leader:
            written += self._write_site_record(rows)
        if self.report is not None:
            self.report.report_test(trainer, rows, written)
            self.report.finish(trainer)
        if trainer.site.is_leader:
            print(f"best global model: {trainer.best_model_path}")
            for path in written:
                print(f"wrote {path}")

    def _write_site_record(self, rows: dict[str, dict[str, float]]) -> list[Path]:
        """This site's test table and loss curves under ``site-<k>/``; site 0 also the run-level figure."""
        from neurofed.plots import loss_per_round

        trainer, site_rank = self.trainer, self.trainer.federation.site_rank
        written = [write_site_results(trainer.run_dir, site_rank, "test", rows)]
        history_path = site_record_dir(trainer.run_dir, site_rank) / HISTORY_FILE
        history = read_json(history_path) if history_path.is_file() else []  # all rounds, a resume's too
        if not history:
            return written
        style = {"run": trainer.run_name, "strategy": type(trainer.strategy).__name__}
        pooled = [row["val/pooled/loss"] for row in history]
        if trainer.site.is_global_leader:
            written.append(loss_per_round({"pooled validation loss": pooled}, trainer.run_dir / "val_loss.png", **style))
        curves = {"this site, validation": [row["val/site/loss"] for row in history], "pooled validation": pooled,
                  "this site, training": [row["train/site/loss"] for row in history]}
        written.append(loss_per_round(curves, site_record_dir(trainer.run_dir, site_rank) / "loss.png",
                                      ylabel="loss", **style))
        return written

    def predict(self, model: LightningModule, datamodule: Any = None, ckpt_path: str | None = None, **kwargs: Any) -> None:
        """Predict every indexed scan and write the BIDS-derivatives table and scatter plot per site."""
        for path in self._write_predictions(model, datamodule, ckpt_path=ckpt_path):
            print(f"wrote {path}")

    def _write_predictions(self, model: LightningModule, datamodule: Any, ckpt_path: str | None) -> list[Path]:
        from neurofed.predictions import write_predictions

        outputs = self.trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt_path)
        if not outputs or not self.trainer.site.is_leader:
            return []
        checkpoint = self.trainer.best_model_path if ckpt_path == "best" else ckpt_path
        return write_predictions(outputs, datamodule, model, run_name=self.trainer.run_name, checkpoint=checkpoint,
                                 strategy=type(self.trainer.strategy).__name__)


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


def _run_extra_command(name: str, argv: Sequence[str]) -> int:
    import importlib

    module_name, help_text = EXTRA_COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"neurofed {name}", description=getattr(module, "DESCRIPTION", help_text),
                                     usage=getattr(module, "USAGE", None), formatter_class=HelpFormatter)
    module.add_arguments(parser)
    args, rest = parser.parse_known_args(list(argv))
    if rest and name != "simulate":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if name == "simulate":
        args.passthrough = rest
    return int(module.run(args) or 0)


class ConsoleFormatter(logging.Formatter):
    """INFO lines as the bare message, others as ``WARNING module: message``.

    A site's round line then stays within 100 columns even behind ``simulate``'s ``[site k]`` prefix.
    """

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return record.getMessage()
        return f"{record.levelname} {record.module}: {super().format(record)}"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; descriptions keep their line breaks (examples stay readable)."""


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neurofed`` console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    handler = logging.StreamHandler()
    handler.setFormatter(ConsoleFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            return _run_extra_command(argv[0], argv[1:])
        cli_main(None if from_command_line else argv)
        return 0
    except (NeurofedDataError, FederationError, CheckpointError, RunExistsError, ValueError) as error:
        if os.environ.get("NEUROFED_DEBUG"):
            raise
        print(f"neurofed: error: {_one_line(error)} (NEUROFED_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    """The message of a configuration or federation error on one line.

    jsonargparse reports a value refused by a class it builds (``Federation(port=70000)``) inside a list of
    union alternatives; the line that names our check is the one worth showing.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    ours = [line[2:] for line in lines if line.startswith("- ") and "NoneType" not in line]
    return (ours or lines or [type(error).__name__])[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
