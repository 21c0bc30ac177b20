"""Randomness that protects privacy: drawn from the operating system's entropy, never from a shared value.

DP-SGD's noise and Poisson sampling, DP-FedAvg's noise and secure aggregation's key pairs only protect
anyone if nobody else can reproduce them. The run's ``seed`` is in the fingerprint, in ``hparams.yaml`` and
in W&B, so every site knows it: a generator seeded from it (or from the round, the site's rank, anything
another site knows) lets another site rerun the step on data of the same size, obtain the very same noise
and subtract it from the victim's update. Every generator made here is seeded from 64 fresh bits of
``os.urandom`` instead, once per use (a local pass, a round), so no seed is ever reused and no other
process can rebuild it.

Opacus' own answer, ``secure_mode``, needs ``torchcsprng``, which is not built for current torch releases;
we take what it adds that works without it — the noise drawn as a sum of several Gaussians, against the
floating-point attack of Mironov 2012 (Opacus ``DPOptimizer(secure_mode=True)``) — and seed torch's
generator from the operating system. The price: a private run is not bit-reproducible, by design, while a
non-private run stays bit-identical from its seed.
"""

from __future__ import annotations

import os

import torch

__all__ = ["private_generator", "reseed_privately"]


def _entropy() -> int:
    """64 bits from the operating system's CSPRNG, as the non-negative seed torch accepts."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def private_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from ``os.urandom`` (its seed is never stored or logged)."""
    return torch.Generator(device=device).manual_seed(_entropy())


def reseed_privately(generator: torch.Generator) -> torch.Generator:
    """Seed ``generator`` afresh from ``os.urandom`` (before each local pass), and return it."""
    return generator.manual_seed(_entropy())
