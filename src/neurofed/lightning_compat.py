"""The few places where neurofed relies on Lightning internals, kept in one file.

Checked against lightning 2.6.6. Everything else in neurofed uses public Lightning APIs only; when an
upgrade breaks one of these functions, this file is the only one to fix.
"""

from __future__ import annotations

from typing import Any

__all__ = ["attached_trainer", "replace_sampler", "wandb_init_kwargs"]


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
