"""Flat parameter vectors round-trip shapes, dtypes and order."""

from __future__ import annotations

import pytest
import torch

from neurofed.federated.params import flatten, float_keys, unflatten


def _state() -> dict[str, torch.Tensor]:
    return {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "count": torch.tensor(5, dtype=torch.long),
        "b": torch.tensor([0.5, -1.5], dtype=torch.float64),
        "c": torch.full((2, 1, 2), 2.0, dtype=torch.float16),
    }


def test_float_keys_skip_integer_entries() -> None:
    assert float_keys(_state()) == ["a", "b", "c"]


def test_flatten_concatenates_in_key_order() -> None:
    state = _state()
    vec = flatten(state, ["b", "a"])
    assert vec.dtype == torch.float32 and vec.device.type == "cpu" and vec.dim() == 1
    assert vec.tolist() == [0.5, -1.5, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_unflatten_restores_shapes_and_dtypes() -> None:
    state = _state()
    keys = float_keys(state)
    back = unflatten(flatten(state, keys) * 2, state, keys)
    assert list(back) == keys
    for k in keys:
        assert back[k].shape == state[k].shape and back[k].dtype == state[k].dtype
        torch.testing.assert_close(back[k], state[k] * 2)


def test_size_mismatch_and_missing_key_are_clear_errors() -> None:
    state = _state()
    with pytest.raises(ValueError, match="elements"):
        unflatten(torch.zeros(3), state, ["a"])
    with pytest.raises(KeyError, match="zzz"):
        flatten(state, ["zzz"])
