"""The few places where neurofed relies on Lightning internals, kept in one file.

Checked against lightning 2.6.6 and jsonargparse 4.53 (LightningCLI's parser). Everything else in neurofed uses public Lightning APIs only; when an
upgrade breaks one of these functions, this file is the only one to fix. One more use lives in
``neurofed.training_cli.NeurofedCLI``, which must override ``LightningCLI._instantiate_trainer``: LightningCLI builds
its trainer there with Trainer callbacks, and offers no public hook to build another trainer class.
"""

from __future__ import annotations

from typing import Any

__all__ = ["attached_trainer", "cli_class", "cli_config_value", "cli_parser", "replace_sampler",
           "shorten_subclass_lists", "wandb_init_kwargs"]


def attached_trainer(module: Any) -> Any:
    """Lightning's ``Trainer`` that runs ``module``, or ``None`` under Fabric or when nothing runs it.

    Public API only (``LightningModule.fabric`` and ``.trainer``): ``.trainer`` returns a shim under Fabric
    and raises when unattached, so Fabric is ruled out first.
    """
    if getattr(module, "fabric", None) is not None:
        return None
    try:
        return module.trainer
    except RuntimeError:
        return None


def replace_sampler(loader: Any, sampler: Any) -> Any:
    """A copy of ``loader`` drawing from ``sampler``, with every other DataLoader argument kept.

    No public API rebuilds a DataLoader with another sampler (custom DataLoader subclasses and their
    constructor arguments included); Fabric's private ``_update_dataloader`` does, as used by
    ``Fabric.setup_dataloaders`` itself.
    """
    from lightning.fabric.utilities.data import _update_dataloader

    return _update_dataloader(loader, sampler)


def wandb_init_kwargs(logger: Any) -> dict[str, Any]:
    """The keyword arguments a ``WandbLogger`` will pass to ``wandb.init`` when its run starts (mutable).

    ``WandbLogger`` takes them only in its constructor and starts the run lazily; changing the stored
    dict before the first log call is the only way to set a group or job type on a logger built
    elsewhere (by LightningCLI from a YAML file, say).
    """
    return logger._wandb_init


def cli_class(cli: Any, group: str) -> Any:
    """The model or datamodule class a LightningCLI was built with (``group``: ``"model"`` or ``"data"``)."""
    return cli._model_class if group == "model" else cli._datamodule_class


def cli_config_value(cli: Any, config: Any, key: str) -> Any:
    """``key`` of the current subcommand's section of ``config`` (LightningCLI's own lookup)."""
    return cli._get(config, key)


def cli_parser(cli: Any, subcommand: str) -> Any:
    """The parser of ``subcommand``, to save the resolved configuration as LightningCLI's callback would."""
    return cli._parser(subcommand)


#: Longest list of "known subclasses" an option's help shows before it is summarised.
_MAX_LISTED_SUBCLASSES = 12


def shorten_subclass_lists() -> None:
    """Summarise jsonargparse's "known subclasses" lists in help texts longer than a dozen classes.

    An option typed ``nn.Module`` (a model's ``backbone``) lists every ``torch.nn.Module`` subclass that is
    imported, some 440 lines that bury the model's own options under ``--model.help``; the summary keeps
    neurofed's classes. jsonargparse builds that text in the private ``ActionTypeHint.extra_help``. Idempotent.
    """
    from jsonargparse._typehints import ActionTypeHint

    if getattr(ActionTypeHint.extra_help, "neurofed_short", False):
        return
    original = ActionTypeHint.extra_help

    def extra_help(self: Any) -> str:
        text = original(self)
        marker = ", known subclasses: "
        if marker not in text:
            return text
        paths = text.split(marker, 1)[1].split(", ")
        if len(paths) <= _MAX_LISTED_SUBCLASSES:
            return text
        ours = [p for p in paths if p.startswith("neurofed.")]
        return f"{marker}{', '.join(ours + [f'or any of {len(paths) - len(ours)} other classes, by class_path'])}"

    extra_help.neurofed_short = True  # type: ignore[attr-defined]
    ActionTypeHint.extra_help = extra_help
