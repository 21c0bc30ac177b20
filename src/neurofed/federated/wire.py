"""What may cross a site boundary, stated once and checked on every send.

Only aggregate numbers leave a site: model parameters, example counts, loss sums, metric and label
sufficient statistics, small control tensors, each site's dataset name and, under secure aggregation,
its public key and its masked parameters. Subject ids, predictions and images never cross; a payload is a
numeric tensor, every kind except ``"parameters"`` and ``"masked_parameters"`` is at most 16 numbers, a
``"site_name"`` or a ``"public_key"`` is at most 32 bytes, so a per-subject vector cannot slip through
under another name.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ALLOWED_KINDS", "KIND_DOCS", "MAX_SMALL_ELEMENTS", "PUBLIC_KEY_BYTES", "SITE_NAME_BYTES", "FederationPayloadError", "check_payload",
    "decode_site_name", "encode_site_name",
]

KIND_DOCS: dict[str, str] = {
    "parameters": "Flat floating-point vector of model parameters or aggregated float buffers.",
    "example_count": "Number of training examples a site used, the weight of its update.",
    "loss_sum": "Sum of a loss over a site's examples (and its count) for a pooled mean loss.",
    "metric_stats": "Regression sufficient statistics (n, sums, cross products) for pooled MAE/RMSE/r.",
    "label_stats": "Sum and count of training labels, e.g. for a pooled target mean.",
    "control": "A small integer tensor used for agreed decisions like a stop flag / round number.",
    "site_name": "The site's dataset name as at most 32 ASCII bytes (uint8), so tables are readable; never subject data.",
    "public_key": "The site's X25519 public key for secure aggregation: 32 uint8 bytes, once per run (never the private key).",
    "masked_parameters": "Fixed-point parameters (or updates) plus pairwise masks, int64 residues mod 2^k: uniform noise "
                         "on its own, only the sum over all sites means anything (secure aggregation).",
}

ALLOWED_KINDS: frozenset[str] = frozenset(KIND_DOCS)

MAX_SMALL_ELEMENTS = 16
SITE_NAME_BYTES = 32
PUBLIC_KEY_BYTES = 32

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
    elif kind == "masked_parameters":
        if tensor.dtype != torch.int64:
            raise FederationPayloadError(f"'masked_parameters' payload must be int64 residues, got {tensor.dtype}")
    elif kind == "public_key":
        if tensor.dtype != torch.uint8 or tensor.numel() != PUBLIC_KEY_BYTES:
            raise FederationPayloadError(
                f"'public_key' payload must be exactly {PUBLIC_KEY_BYTES} uint8 bytes, got {tensor.numel()} "
                f"elements of {tensor.dtype}"
            )
    elif kind == "site_name":
        if tensor.dtype != torch.uint8 or tensor.numel() > SITE_NAME_BYTES:
            raise FederationPayloadError(
                f"'site_name' payload must be at most {SITE_NAME_BYTES} uint8 bytes, got {tensor.numel()} "
                f"elements of {tensor.dtype}"
            )
    elif tensor.numel() > MAX_SMALL_ELEMENTS:
        raise FederationPayloadError(
            f"payload of kind {kind!r} has {tensor.numel()} elements; only 'parameters' may exceed "
            f"{MAX_SMALL_ELEMENTS} (per-example data never crosses a site boundary)"
        )


def encode_site_name(name: str) -> Tensor:
    """``name`` as exactly ``SITE_NAME_BYTES`` uint8 values: ASCII, other characters as ``?``, cut, zero-padded.

    A fixed length lets every site gather every other site's name in one collective.
    """
    raw = str(name).encode("ascii", errors="replace")[:SITE_NAME_BYTES]
    out = torch.zeros(SITE_NAME_BYTES, dtype=torch.uint8)
    if raw:
        out[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    return out


def decode_site_name(t: Tensor) -> str:
    """Inverse of :func:`encode_site_name` (trailing zero bytes dropped)."""
    return bytes(t.to(torch.uint8).tolist()).rstrip(b"\0").decode("ascii", errors="replace")
