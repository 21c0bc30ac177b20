"""The aggregation rule of a federation, split into the parts each side runs.

A site asks the strategy which state-dict entries to share (``aggregated_keys``) and whether to add a
term to its local loss (``local_loss``); after the (weighted) mean of the sites' flat vectors has been
formed by an all_reduce, every site applies the same ``server_update`` to it. Because every site runs
the same deterministic update on the same numbers, no separate server process is needed.
"""

from __future__ import annotations

from abc import ABC
from typing import Any

import torch
from torch import Tensor, nn

from neurofed.federated.params import float_keys

__all__ = ["Strategy", "weighted_mean"]


def weighted_mean(vectors: list[Tensor], weights: list[float]) -> Tensor:
    """Return ``Σ w_i v_i / Σ w_i`` as float32, summed in float64 so that site order does not matter."""
    if not vectors:
        raise ValueError("weighted_mean: no vectors given")
    if len(vectors) != len(weights):
        raise ValueError(f"weighted_mean: {len(vectors)} vectors but {len(weights)} weights")
    total = float(sum(weights))
    if any(w < 0 for w in weights) or total <= 0:
        raise ValueError(f"weighted_mean: weights must be non-negative with a positive sum, got {weights}")
    acc = torch.zeros_like(vectors[0], dtype=torch.float64, device="cpu")
    for v, w in zip(vectors, weights):
        if v.shape != vectors[0].shape:
            raise ValueError(f"weighted_mean: shape {tuple(v.shape)} differs from {tuple(vectors[0].shape)}")
        acc += v.detach().to(device="cpu", dtype=torch.float64) * float(w)
    return (acc / total).to(torch.float32)


class Strategy(ABC):
    """Base aggregation rule: share every floating-point entry and take their (weighted) mean.

    Subclasses override only what differs; the defaults amount to FedAvg.
    """

    weighted: bool = True

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = bool(weighted)

    def hparams(self) -> dict[str, Any]:
        """Hyperparameters, shown by ``repr`` and written to logs."""
        return {"weighted": self.weighted}

    def site_weight(self, num_examples: int | float) -> float:
        """Weight of one site's update: its example count when ``weighted``, else 1."""
        return float(num_examples) if self.weighted else 1.0

    def aggregated_keys(self, state_dict: dict[str, Tensor], model: nn.Module | None = None) -> list[str]:
        """State-dict entries the sites average: floating-point parameters and buffers.

        Integer buffers such as ``num_batches_tracked`` are never aggregated. ``model`` is accepted for
        rules that need module types (FedBN) and ignored here.
        """
        return float_keys(state_dict)

    def local_loss(self, model: nn.Module, global_params: dict[str, Tensor]) -> Tensor | None:
        """Extra term added to each local training loss; ``None`` means no term."""
        return None

    def server_update(self, global_vec: Tensor, mean_vec: Tensor) -> Tensor:
        """New global vector from the previous global and the mean of the sites' vectors."""
        return mean_vec

    def state_dict(self) -> dict[str, Any]:
        """Server-side state to checkpoint between rounds (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but was given keys {sorted(state)}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"
