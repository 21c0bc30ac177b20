"""Local training at one site: the epochs (or steps) it runs between two aggregations.

Kept apart from the round so that the hot loop is easy to audit: nothing in it waits for the device (the
loss is summed on the device and read once at the end), and the wall time spent blocked on the next batch
is measured, so a benchmark can tell an input-bound site (data loading, decompression) from a
compute-bound one without a profiler.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from lightning.fabric import Fabric
from torch import Tensor

from neurofed.federated.batches import after_transfer, batch_size
from neurofed.federated.strategies import Strategy

__all__ = ["LocalTraining", "train_locally"]


@dataclass(frozen=True)
class LocalTraining:
    """What one round of local training did at this rank.

    Attributes:
        loss: Mean training loss over the examples seen; NaN when the site did not train.
        volumes: Training examples processed.
        steps: Optimizer steps taken.
        data_wait_s: Wall time blocked waiting for the loader (worker start-up and ``next``).
    """

    loss: float
    volumes: int
    steps: int
    data_wait_s: float

    @classmethod
    def skipped(cls) -> LocalTraining:
        """A site that was not sampled this round."""
        return cls(loss=math.nan, volumes=0, steps=0, data_wait_s=0.0)


def train_locally(
    fabric: Fabric, model: Any, module: Any, optimizer: Any, loader: Iterable, datamodule: Any,
    strategy: Strategy, global_params: dict[str, Tensor], epoch_keys: Iterable[int], max_steps: int | None,
    reseed: Callable[[int], None],
) -> LocalTraining:
    """Train on ``loader`` for each key of ``epoch_keys`` (or until ``max_steps`` optimizer steps).

    ``reseed(key)`` runs before each pass and the sampler's epoch is set to the key, so data order,
    dropout and augmentation depend on the key alone: a resumed run repeats an uninterrupted one.
    """
    module.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=fabric.device)
    seen = steps = 0
    data_wait = 0.0
    for epoch_key in epoch_keys:
        reseed(epoch_key)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch_key)
        t0 = time.perf_counter()
        batches = iter(loader)
        data_wait += time.perf_counter() - t0
        i = 0
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            data_wait += time.perf_counter() - t0
            if batch is None:
                break
            batch = after_transfer(datamodule, batch, 0)
            out = module.training_step(batch, i)
            loss = out["loss"] if isinstance(out, dict) else out
            extra = strategy.local_loss(model, global_params)
            fabric.backward(loss if extra is None else loss + extra)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n = batch_size(batch)
            loss_sum += loss.detach().double() * n
            seen += n
            steps += 1
            i += 1
            if max_steps is not None and steps >= max_steps:
                return LocalTraining((loss_sum / max(seen, 1)).item(), seen, steps, data_wait)
        if i == 0:
            raise RuntimeError("the training dataloader is empty; nothing to train on")
    return LocalTraining((loss_sum / max(seen, 1)).item(), seen, steps, data_wait)
