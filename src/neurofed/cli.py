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
from neurofed.tracking import configure_site_loggers

log = logging.getLogger("neurofed")

#: Commands that are not LightningCLI subcommands: name -> (module, help).
EXTRA_COMMANDS = {
    "synth": ("neurofed.data.synth.command", "write synthetic multi-site BIDS datasets"),
    "simulate": ("neurofed.federated.simulate", "run a federation of N sites as N processes on this machine"),
}


class NeurofedCLI(LightningCLI):
    """LightningCLI whose trainer is the :class:`FederatedTrainer`."""

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(
            FederatedTrainer, "trainer", instantiate=False, fail_untyped=False, sub_configs=True
        )
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The backbone's input channels follow the modalities the data module stacks (T1w, T1w+FLAIR, ...).
        parser.link_arguments(
            "data", "model.init_args.in_channels", compute_fn=_num_channels, apply_on="instantiate"
        )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> FederatedTrainer:
        return self.trainer_class(**config)

    def before_instantiate_classes(self) -> None:
        _check_data_roots(self._get(self.config, "data"))

    def after_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        configure_site_loggers(self.trainer, self.datamodule)
        self._save_resolved_config()

    def _save_resolved_config(self) -> None:
        """Keep the exact configuration beside the run, so a result can always be traced to its settings."""
        if self.trainer.site.is_global_leader:
            path = Path(self.trainer.run_dir) / f"config-{self.subcommand}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._parser(self.subcommand).save(
                self.config[self.subcommand], path, skip_none=False, overwrite=True, multifile=False
            )

    def fit(self, model: LightningModule, datamodule: Any = None, ckpt_path: str | None = None, **kwargs: Any) -> None:
        """Train, then test the best global model on every site's held-out split and write the figures."""
        self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)
        if not self.trainer.best_model_path:
            return
        self.trainer.test(model, datamodule=datamodule, ckpt_path="best")
        written = self._write_predictions(model, datamodule, ckpt_path="best")
        if self.trainer.site.is_global_leader and self.trainer.history:
            from neurofed.plots import loss_per_round

            curve = [row["val/pooled/loss"] for row in self.trainer.history]
            written.append(loss_per_round({"pooled validation loss": curve}, self.trainer.run_dir / "val_loss.png",
                                          run=self.trainer.run_name, strategy=type(self.trainer.strategy).__name__))
        if self.trainer.site.is_leader:
            print(f"best global model: {self.trainer.best_model_path}")
            for path in written:
                print(f"wrote {path}")

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
                "`neurofed synth --out data/synth`."
            )


def _run_extra_command(name: str, argv: Sequence[str]) -> int:
    import importlib

    module_name, help_text = EXTRA_COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"neurofed {name}", description=help_text)
    module.add_arguments(parser)
    args, rest = parser.parse_known_args(list(argv))
    if rest and name != "simulate":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if name == "simulate":
        args.passthrough = rest
    return int(module.run(args) or 0)


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
            "description": "Federated brain-age and SDMT models on brain MRI. More commands: "
            + "; ".join(f"`neurofed {name}` to {text}" for name, (_, text) in EXTRA_COMMANDS.items())
            + "."
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neurofed`` console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            return _run_extra_command(argv[0], argv[1:])
        cli_main(None if from_command_line else argv)
        return 0
    except (NeurofedDataError, FederationError, CheckpointError, ValueError) as error:
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
