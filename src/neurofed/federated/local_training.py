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
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import Tensor

from neurofed.federated.batches import after_transfer, batch_size
from neurofed.federated.dp_sgd import is_empty_batch
from neurofed.federated.site import LOCAL_PASS_STREAM

if TYPE_CHECKING:
    from neurofed.federated.dp_sgd import PrivateSite
    from neurofed.federated.site import Site
    from neurofed.federated.strategies import Strategy

__all__ = ["LocalTraining", "passes_per_round", "train_locally"]


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


def passes_per_round(loader: Any, local_epochs: int, local_steps: int | None) -> int:
    """Passes over the loader that one round starts: ``local_epochs``, or enough for ``local_steps`` steps."""
    if local_steps is None:
        return local_epochs
    try:
        return max(1, math.ceil(local_steps / max(len(loader), 1)))
    except TypeError:  # a loader without a length: at least one step per pass
        return local_steps


def train_locally(
    site: Site, loader: Iterable, datamodule: Any, strategy: Strategy, global_params: dict[str, Tensor],
    round: int, passes: int, max_steps: int | None, privacy: PrivateSite | None = None,
) -> LocalTraining:
    """Train ``site.model`` on ``loader`` for ``passes`` passes (or until ``max_steps`` optimizer steps).

    Pass ``i`` of round ``r`` is pass ``r * passes + i`` of the run. Before it, every random generator is
    reseeded from that number (:meth:`Site.reseed`) and the sampler's epoch is set to it, so data order,
    dropout and augmentation depend on it alone: a resumed run repeats an uninterrupted one. Under DP-SGD
    (``privacy``), Poisson sampling and noise are reseeded from the operating system's entropy instead, and a
    draw of no example is still a step: the noise alone.
    """
    fabric, wrapped, optimizer = site.launched(), site.wrapped, site.optimizer
    wrapped.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=fabric.device)
    seen = steps = 0
    data_wait = 0.0
    for run_pass in range(round * passes, (round + 1) * passes):
        site.reseed(LOCAL_PASS_STREAM, run_pass)
        if privacy is not None:  # sampling and noise: fresh entropy, never the seed (private_random.py)
            privacy.fresh_randomness()
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(run_pass)
        if isinstance(getattr(sampler, "generator", None), torch.Generator):
            # A loader's own shuffle generator advances pass after pass and a new process would start it
            # over: seed it from the pass too, so a resumed run draws the same order.
            sampler.generator.manual_seed(torch.initial_seed())
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
            if privacy is not None and is_empty_batch(batch):
                privacy.empty_step(optimizer)
                steps += 1
                i += 1
                if max_steps is not None and steps >= max_steps:
                    break
                continue
            batch = after_transfer(datamodule, batch, 0)
            out = wrapped.training_step(batch, i)
            loss = out["loss"] if isinstance(out, dict) else out
            extra = strategy.local_loss(site.model, global_params)
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
        if max_steps is not None and steps >= max_steps:
            break
        if i == 0:
            raise RuntimeError("the training dataloader is empty; nothing to train on")
    return LocalTraining((loss_sum / max(seen, 1)).item(), seen, steps, data_wait)
