"""Loaders and batches as Lightning's ``Trainer`` would see them, for a trainer that is not Lightning's.

The federated trainer drives a LightningDataModule itself, so it needs the few rules Lightning applies
implicitly: which loader hooks a data module really implements, the device-side batch hook, and how many
examples a batch or a split holds (the weight of a site's update).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["after_transfer", "batch_size", "datamodule_loader", "num_examples"]


def datamodule_loader(datamodule: Any, name: str) -> Any:
    """``datamodule.<name>()``, or ``None`` when a LightningDataModule leaves it unimplemented."""
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not hasattr(datamodule, name):
        return None
    if isinstance(datamodule, pl.LightningDataModule) and not is_overridden(name, datamodule, pl.LightningDataModule):
        return None
    return getattr(datamodule, name)()


def after_transfer(datamodule: Any, batch: Any, dataloader_idx: int) -> Any:
    """The datamodule's device-side hook (GPU augmentation), as Lightning's Trainer would call it."""
    hook = getattr(datamodule, "on_after_batch_transfer", None)
    return hook(batch, dataloader_idx) if hook is not None else batch


def batch_size(batch: Any) -> int:
    """Examples in a batch, read from shapes only (no host sync)."""
    if isinstance(batch, dict) and "target" in batch:
        return int(len(batch["target"]))
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return int(batch[0].shape[0])
    return 1


def num_examples(loader: Any) -> int:
    """Size of the site's training split: the weight of its update under weighted FedAvg."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return sum(batch_size(b) for b in loader)
