"""Precise BatchNorm: re-estimate a model's BatchNorm statistics on a site's own training scans.

Why: BatchNorm's running mean and variance are an exponential average (momentum 0.1) of the batches seen
in training. A site that takes 3–4 optimizer steps per round refreshes only about a third of them, so after
an aggregation they describe weights from several rounds ago — and under FedAvg they are an average over
scanners that matches no site. Evaluating with such statistics shifts every prediction of a site by the same
amount: a validation curve that jumps by ten years from one round to the next although the weights barely
moved. Recomputing the statistics with the current weights over the site's training split ("precise BN",
Wu & Johnson 2021; ``torch.optim.swa_utils.update_bn`` does the same for SWA) removes that lag.

What it changes and what it does not: only the running statistics of BatchNorm layers, never a learned
weight. With it, the federated trainer keeps those statistics local, like SiloBN (Andreux et al. 2020): every
other entry — BatchNorm's learned scale and shift included — is aggregated as the strategy says, and each site
re-estimates the statistics of the new global weights on its own scans before the first round and after each
aggregation. Local training is unchanged by it (a layer in training mode normalises with its batch's
statistics), except in layers a transfer-learning model freezes: those normalise with the site's own
re-estimated statistics in training and in evaluation alike, instead of the statistics of the data the
backbone was trained on. Nothing crosses a site boundary: the statistics come from this site's scans and stay
at this site.

The pass is deterministic: the training scans in their stored order, without augmentation (evaluation sees
unaugmented scans), every batch weighted equally (cumulative average, ``momentum=None``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from neurofed.federated.batches import after_transfer

if TYPE_CHECKING:
    from neurofed.federated.site import Site

__all__ = ["batchnorm_layers", "batchnorm_statistics_keys", "recompute_batchnorm", "recompute_site_batchnorm",
           "statistics_loader"]


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The model's BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def batchnorm_statistics_keys(model: nn.Module) -> set[str]:
    """``state_dict`` names of the running statistics of the model's BatchNorm layers (what stays local)."""
    names = {name for name, m in model.named_modules() if m in set(batchnorm_layers(model))}
    return {f"{name}.{buffer}" if name else buffer for name in names
            for buffer in ("running_mean", "running_var", "num_batches_tracked")}


def statistics_loader(train_loader: Any) -> DataLoader | None:
    """A loader over the same training scans in stored order (no shuffle), or ``None`` if it cannot be built.

    A trailing batch of one scan is dropped when the split holds more than one batch: BatchNorm cannot take
    statistics of one value per channel where a feature map has shrunk to a single voxel.
    """
    dataset = getattr(train_loader, "dataset", None)
    batch = getattr(train_loader, "batch_size", None)
    if dataset is None or not batch:
        return None
    try:
        size = len(dataset)
    except TypeError:
        return None
    return DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=getattr(train_loader, "num_workers", 0),
                      drop_last=size > batch and size % batch == 1, pin_memory=torch.cuda.is_available())


def _without_augmentation(batch: Any) -> Any:
    """The batch with its augmentation flags removed, so that the device-side hook leaves the scans as they are."""
    if isinstance(batch, dict) and "augment" in batch:
        return {k: v for k, v in batch.items() if k != "augment"}
    return batch


def _image(module: Any, batch: Any) -> torch.Tensor:
    """The model's input from a batch, converted the way the module's own steps convert it."""
    if isinstance(batch, dict):
        to_input = getattr(module, "_image", None)
        return to_input(batch) if callable(to_input) else batch["image"]
    return batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable, datamodule: Any = None, forward: Any = None) -> int:
    """Reset every BatchNorm layer's running statistics and re-estimate them from ``batches``; returns the
    number of batches used (0, and nothing changed, when the model has no BatchNorm or ``batches`` is empty).

    Args:
        model: The module whose BatchNorm layers are re-estimated (the raw LightningModule or any ``nn.Module``).
        batches: Batches of training scans, e.g. :func:`statistics_loader` of the training loader.
        datamodule: Its ``on_after_batch_transfer`` hook is applied (resident scans), without augmentation.
        forward: What runs a batch's input (default ``model``; pass Fabric's wrapper to keep its device and
            precision handling).

    Only BatchNorm layers are in training mode during the pass (dropout and the rest stay in evaluation
    mode); each layer's momentum and the model's mode are restored afterwards.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    was_training = {m: m.training for m in model.modules()}
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts the same
        m.train()
    run = forward if forward is not None else model
    used = 0
    try:
        for batch in batches:
            batch = after_transfer(datamodule, _without_augmentation(batch), 0)
            try:
                run(_image(model, batch))
            except ValueError as e:  # a batch of one scan whose feature maps shrank to one voxel: no variance
                if "more than 1 value per channel" not in str(e):
                    raise
                continue
            used += 1
    finally:
        for m, momentum, mean, var, tracked in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)  # it counts training steps; the pass took none
            if used == 0:  # nothing seen: keep what the layer had
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        for m, training in was_training.items():
            m.train(training)
    return used


def recompute_site_batchnorm(site: Site, train_loader: Any, datamodule: Any) -> int:
    """:func:`recompute_batchnorm` of the site's model over its training split, averaged over the site's ranks.

    Each rank of a multi-device site sees its shard of the training scans; the ranks' estimates are averaged
    (one collective inside the site) so that every rank evaluates with the same statistics.
    """
    model = site.model
    if not batchnorm_layers(model):
        return 0
    fabric = site.launched()
    loader = statistics_loader(train_loader)
    if loader is None:
        return 0
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=fabric.world_size > 1)
    used = recompute_batchnorm(model, loader, datamodule, forward=site.wrapped)
    if fabric.world_size > 1:
        for m in batchnorm_layers(model):
            for buffer in (m.running_mean, m.running_var):
                buffer.copy_(site.link.site_sum(buffer.detach().clone()).to(buffer.device) / fabric.world_size)
    return used
