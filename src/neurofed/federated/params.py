"""Flat parameter vectors: the unit that strategies aggregate and groups send.

A strategy works on one 1-D float32 CPU vector per site, so that an aggregation round is a single
collective call and a server rule (FedAdam) is plain vector arithmetic. The key list fixes the order;
every site derives it from the same strategy and model, so the vectors line up element by element.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["flatten", "unflatten", "float_keys", "load_vector"]


def float_keys(state_dict: dict[str, Tensor]) -> list[str]:
    """Keys of floating-point tensors, in state-dict order.

    Integer buffers (``num_batches_tracked``) count events rather than describe the model, and averaging
    them would produce fractions, so they are left out.
    """
    return [k for k, v in state_dict.items() if isinstance(v, Tensor) and v.is_floating_point()]


def flatten(state: dict[str, Tensor], keys: list[str]) -> Tensor:
    """Concatenate ``state[k]`` for ``k`` in ``keys`` into one float32 CPU vector."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"flatten: keys missing from the state dict: {missing[:5]}")
    if not keys:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([state[k].detach().reshape(-1).to(device="cpu", dtype=torch.float32) for k in keys])


def unflatten(vec: Tensor, like: dict[str, Tensor], keys: list[str]) -> dict[str, Tensor]:
    """Split ``vec`` back into tensors shaped, typed and placed like ``like[k]`` for ``k`` in ``keys``."""
    if vec.dim() != 1:
        raise ValueError(f"unflatten: expected a 1-D vector, got shape {tuple(vec.shape)}")
    total = sum(like[k].numel() for k in keys)
    if vec.numel() != total:
        raise ValueError(
            f"unflatten: vector has {vec.numel()} elements but the {len(keys)} keys need {total}; "
            "were both sides built from the same model and strategy?"
        )
    out: dict[str, Tensor] = {}
    offset = 0
    for k in keys:
        ref = like[k]
        n = ref.numel()
        out[k] = vec[offset : offset + n].reshape(ref.shape).to(device=ref.device, dtype=ref.dtype)
        offset += n
    return out


def load_vector(model: torch.nn.Module, vec: Tensor, keys: list[str]) -> None:
    """Copy a flat vector into ``model``'s entries ``keys``, in place (the rest of the model is untouched)."""
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in unflatten(vec, sd, keys).items():
            sd[k].copy_(v)
