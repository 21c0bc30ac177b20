"""The ``neurofed`` command: one entry for every subcommand, quick to answer ``--help``.

``neurofed fit | validate | test | predict --config X.yaml`` go through LightningCLI with
:class:`~neurofed.federated.FederatedTrainer` as the trainer (:mod:`neurofed.training_cli`), so one YAML file
describes the model, the data and the federation, ``--print_config`` shows the resolved configuration and
dotted overrides (``--trainer.rounds 5``) work. ``neurofed synth`` writes synthetic BIDS sites, ``neurofed
simulate`` runs a whole federation as one process per site on this machine, ``neurofed status`` reads a run
folder and ``neurofed federation check`` tests a site's federation before training.

This module imports neither torch nor Lightning: ``neurofed --help`` and the light commands answer at once,
and the training commands import them only once they run. A configuration or federation error is one line and
exit code 2; Ctrl-C is one line saying which round is committed and how to resume (exit code 130).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
from typing import Sequence

log = logging.getLogger("neurofed")

#: The LightningCLI commands: name -> help.
TRAINING_COMMANDS = {
    "fit": "train a model round after round (centralized or one site of a federation), then test it",
    "validate": "evaluate a model on every site's validation split",
    "test": "evaluate a model on every site's test split",
    "predict": "predict every scan and write the predictions as BIDS derivatives",
}

#: Commands that are not LightningCLI subcommands: name -> (module, help).
EXTRA_COMMANDS = {
    "synth": ("neurofed.data.synth.command", "write synthetic multi-site BIDS datasets"),
    "simulate": ("neurofed.federated.simulate", "run a federation of N sites as N processes on this machine"),
    "status": ("neurofed.status", "print a run's progress: rounds, best round, pooled metrics, each site's files"),
    "federation": ("neurofed.federated.preflight", "check a site's federation before training: rendezvous, peers, "
                                                    "secret, settings"),
}

USAGE = f"neurofed [-h] {{{','.join([*TRAINING_COMMANDS, *EXTRA_COMMANDS])}}} ..."

#: Exit code after Ctrl-C, as a shell reports a process ended by SIGINT.
INTERRUPTED = 130

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


def top_level_parser() -> argparse.ArgumentParser:
    """``neurofed --help``: every command with one line each; built without importing torch or Lightning."""
    parser = argparse.ArgumentParser(
        prog="neurofed", usage=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Federated brain-age and SDMT models on brain MRI.",
        epilog="`neurofed COMMAND --help` lists a command's options; for fit, validate, test and predict they\n"
               "come from the classes of a config (`neurofed fit --config configs/brain_age_cpu.yaml --help`),\n"
               "and `--print_config` prints the resolved configuration.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, text in TRAINING_COMMANDS.items():
        commands.add_parser(name, help=text)
    for name, (_, text) in EXTRA_COMMANDS.items():
        commands.add_parser(name, help=text)
    return parser


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
    """Defaults shown after each option (not after on/off flags, where it would read backwards); descriptions
    keep their line breaks (examples stay readable)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neurofed`` console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser = top_level_parser()
        if not argv:
            parser.print_usage(sys.stderr)
            print("neurofed: error: give a command; `neurofed --help` lists them", file=sys.stderr)
            return 2
        parser.print_help()
        raise SystemExit(0)
    handler = logging.StreamHandler()
    handler.setFormatter(ConsoleFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        if argv[0] in EXTRA_COMMANDS:
            return _run_extra_command(argv[0], argv[1:])
        from neurofed.training_cli import cli_main

        cli_main(None if from_command_line else argv)
        return 0
    except KeyboardInterrupt as interrupt:
        print(f"neurofed: {interrupted_line(interrupt, argv)}", file=sys.stderr)
        return INTERRUPTED
    except Exception as error:
        if not _is_user_error(error) or os.environ.get("NEUROFED_DEBUG"):
            raise
        print(f"neurofed: error: {_one_line(error)} (NEUROFED_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


def interrupted_line(interrupt: KeyboardInterrupt, argv: Sequence[str]) -> str:
    """One line after Ctrl-C: where the run stands and the command that resumes it."""
    resume = shlex.join(["neurofed", *_without_ckpt_path(argv), "--ckpt_path", "last"])
    committed = getattr(interrupt, "committed", None)
    if hasattr(interrupt, "run_dir"):
        if committed is None:
            return (f"interrupted in round {interrupt.interrupted_round}, before any round was committed in "
                    f"{interrupt.run_dir}; start again with the same command (add --trainer.overwrite true)")
        return (f"interrupted in round {interrupt.interrupted_round}; round {committed} is committed in "
                f"{interrupt.run_dir}; resume with: {resume}")
    if argv and argv[0] in ("simulate", "fit"):
        return f"interrupted; each site keeps its last committed round; resume with: {resume}"
    return "interrupted"


def _without_ckpt_path(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            out.append(arg)
    return out


def _is_user_error(error: BaseException) -> bool:
    """A configuration, data, checkpoint or federation error: reported as one line, not a traceback."""
    from neurofed.data.validation import NeurofedDataError
    from neurofed.federated.checkpoint_io import CheckpointError
    from neurofed.federated.errors import FederationError
    from neurofed.federated.results import RunExistsError

    return isinstance(error, (NeurofedDataError, FederationError, CheckpointError, RunExistsError, ValueError))


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
