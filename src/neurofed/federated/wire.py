"""What may cross a site boundary, stated once and checked on every send.

Only aggregate numbers leave a site: model parameters, example counts, loss sums, metric and label
sufficient statistics, and small control tensors. Subject ids, predictions and images never cross; a
payload is a numeric tensor, and every kind except ``"parameters"`` is at most 16 numbers, so a
per-subject vector cannot slip through under another name.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ALLOWED_KINDS", "KIND_DOCS", "MAX_SMALL_ELEMENTS", "FederationPayloadError", "check_payload"]

KIND_DOCS: dict[str, str] = {
    "parameters": "Flat floating-point vector of model parameters or aggregated float buffers.",
    "example_count": "Number of training examples a site used, the weight of its update.",
    "loss_sum": "Sum of a loss over a site's examples (and its count) for a pooled mean loss.",
    "metric_stats": "Regression sufficient statistics (n, sums, cross products) for pooled MAE/RMSE/r.",
    "label_stats": "Sum and count of training labels, e.g. for a pooled target mean.",
    "control": "A small integer tensor used for agreed decisions like a stop flag / round number.",
}

ALLOWED_KINDS: frozenset[str] = frozenset(KIND_DOCS)

MAX_SMALL_ELEMENTS = 16

_NUMERIC = {
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
}


class FederationPayloadError(ValueError):
    """A tensor about to leave a site is not something the federation allows to cross."""


def check_payload(kind: str, tensor: object) -> None:
    """Raise :class:`FederationPayloadError` unless ``tensor`` is an allowed payload of ``kind``."""
    if kind not in ALLOWED_KINDS:
        raise FederationPayloadError(
            f"unknown payload kind {kind!r}; allowed kinds are {sorted(ALLOWED_KINDS)} "
            "(see neurofed.federated.wire)"
        )
    if not isinstance(tensor, Tensor):
        raise FederationPayloadError(f"payload of kind {kind!r} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _NUMERIC:
        raise FederationPayloadError(
            f"payload of kind {kind!r} has non-numeric dtype {tensor.dtype}; send a real or integer tensor"
        )
    if kind == "parameters":
        if not tensor.is_floating_point():
            raise FederationPayloadError(f"'parameters' payload must be floating point, got {tensor.dtype}")
    elif tensor.numel() > MAX_SMALL_ELEMENTS:
        raise FederationPayloadError(
            f"payload of kind {kind!r} has {tensor.numel()} elements; only 'parameters' may exceed "
            f"{MAX_SMALL_ELEMENTS} (per-example data never crosses a site boundary)"
        )
