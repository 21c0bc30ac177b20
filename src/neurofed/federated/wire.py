"""What may cross a site boundary, stated once and checked on every send.

Only aggregate numbers leave a site: model parameters, example counts, loss sums, metric and label
sufficient statistics, update screening's numbers and directions, small control tensors, each site's dataset
name, the handshake and round-check bytes of the trust layer and, under secure aggregation, each site's
public key and masked parameters and statistics (then no site's own statistics, screening numbers or
direction cross in the clear). Subject ids, predictions and images never cross; a payload is a numeric
tensor, every kind except ``"parameters"``, ``"update_direction"`` and ``"masked_parameters"`` is at most 16
numbers (64 masked statistics), a ``"site_name"`` or a ``"public_key"`` at most 32 bytes, a ``"round_mac"``
96 and a ``"handshake"`` message 4 KiB of bytes, so a per-subject vector cannot slip through under another
name.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ALLOWED_KINDS", "HANDSHAKE_BYTES", "KIND_DOCS", "MAX_SMALL_ELEMENTS", "PUBLIC_KEY_BYTES", "ROUND_MAC_BYTES",
    "SITE_NAME_BYTES", "FederationPayloadError", "bytes_tensor", "check_payload", "decode_site_name",
    "encode_site_name",
]

KIND_DOCS: dict[str, str] = {
    "parameters": "Flat floating-point vector of model parameters or aggregated float buffers.",
    "example_count": "Number of training examples a site used, the weight of its update.",
    "loss_sum": "Sum of a loss over a site's examples (and its count) for a pooled mean loss.",
    "metric_stats": "Regression sufficient statistics (n, sums, cross products) for pooled MAE/RMSE/r.",
    "label_stats": "Sum and count of training labels, e.g. for a pooled target mean.",
    "control": "A small integer tensor used for agreed decisions like a stop flag / round number.",
    "site_name": "The site's dataset name as at most 32 ASCII bytes (uint8), so tables are readable; never subject data.",
    "handshake": "Handshake bytes (uint8): nonces, coin commitments and Ed25519 public keys, signatures and "
                 "verdicts, fingerprint digests, mismatching setting values, committed rounds, declared counts "
                 "and coins; under secure aggregation, each site's signature over its X25519 key.",
    "round_mac": "A round's integrity check (96 uint8): the hash of the new global state and pooled statistics, "
                 "and this site's Ed25519 signature of it.",
    "update_norm": "Update screening (float64): the L2 norms of a site's update and of its weights' update, its "
                   "weight, whether it was finite, its cosine to the other sites' updates and the range of its "
                   "BatchNorm variance ratios; seven numbers per site and round, never sent under secure "
                   "aggregation.",
    "update_direction": "Update screening: the unit vector of a site's weight update (float), summed over the sites "
                        "so that each can compare its direction with the others'; never sent under secure "
                        "aggregation or DP-FedAvg.",
    "public_key": "The site's X25519 public key for secure aggregation: 32 uint8 bytes, once per run (never the private key).",
    "masked_parameters": "Fixed-point parameters (or updates) plus pairwise masks, int64 residues mod 2^k: uniform noise "
                         "on its own, only the sum over all sites means anything (secure aggregation).",
    "masked_statistics": "A statistic (example counts, label, loss or metric sums, a control flag) in fixed point "
                         "with a non-finite flag per value, plus pairwise masks (int64 residues, at most 64): only the "
                         "sum over all sites means anything (secure aggregation).",
}

ALLOWED_KINDS: frozenset[str] = frozenset(KIND_DOCS)

MAX_SMALL_ELEMENTS = 16
SITE_NAME_BYTES = 32
HANDSHAKE_BYTES = 4096
ROUND_MAC_BYTES = 96
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
    if kind in ("parameters", "update_direction"):
        if not tensor.is_floating_point():
            raise FederationPayloadError(f"{kind!r} payload must be floating point, got {tensor.dtype}")
    elif kind == "masked_parameters":
        if tensor.dtype != torch.int64:
            raise FederationPayloadError(f"'masked_parameters' payload must be int64 residues, got {tensor.dtype}")
    elif kind == "masked_statistics":
        if tensor.dtype != torch.int64 or tensor.numel() > 4 * MAX_SMALL_ELEMENTS:
            raise FederationPayloadError(f"'masked_statistics' payload must be at most {4 * MAX_SMALL_ELEMENTS} int64 "
                                         f"residues, got {tensor.numel()} elements of {tensor.dtype}")
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
    elif kind in ("handshake", "round_mac"):
        limit = HANDSHAKE_BYTES if kind == "handshake" else ROUND_MAC_BYTES
        if tensor.dtype != torch.uint8 or tensor.numel() > limit:
            raise FederationPayloadError(
                f"{kind!r} payload must be at most {limit} uint8 bytes, got {tensor.numel()} elements of {tensor.dtype}"
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


def bytes_tensor(data: bytes, size: int | None = None) -> Tensor:
    """``data`` as a uint8 tensor, zero-padded (or cut) to ``size`` bytes when given."""
    raw = bytes(data) if size is None else bytes(data)[:size].ljust(size, b"\0")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone() if raw else torch.zeros(0, dtype=torch.uint8)
