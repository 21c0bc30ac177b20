"""Secure aggregation without a server: pairwise additive masks that cancel in the all_reduce.

In the spirit of Bonawitz et al. 2017 (Practical Secure Aggregation for Privacy-Preserving Machine
Learning), for a federation where every site is online for the whole round (a site lost mid-round aborts
the round, as any collective does, and the next attempt re-keys), so no secret sharing of masks is needed:

1. **Keys, once per run.** Each site makes one X25519 key pair in memory (:class:`SiteKeys`); the 32-byte
   public keys are exchanged with one all_gather (wire kind ``"public_key"``). :func:`key_exchange` turns
   the gathered keys into one shared 32-byte key per pair of sites (X25519, then HKDF-SHA256 bound to both
   sites' ranks and public keys). The private key never leaves the process and is never logged or saved.
2. **Fixed point** (:class:`FixedPoint`). A float vector is clipped to ``[−R, R]`` (each clipped value is
   counted, never wrapped silently), scaled by ``2^f`` and rounded to integers modulo ``2^k``, with
   ``k = 63 − ⌈log2 n⌉`` for ``n`` sites: the sum of ``n`` residues below ``2^k`` stays below ``2^63``,
   so it fits int64 and the all_reduce cannot overflow. ``f`` is the largest precision for which the true
   sum of ``n`` clipped values, ``|Σ| ≤ n·R·2^f``, stays below ``2^(k−1)`` and so decodes without wrapping.
3. **Masks, per (pair, round, call)** (:func:`mask`). Site ``i`` adds ``m_ij`` for every ``j > i`` and
   subtracts ``m_ji`` for every ``j < i`` (mod ``2^k``). ``m_ij`` is the ChaCha20 keystream of the pair's
   shared key with a nonce made of (round, call), read as uniform 64-bit integers reduced mod ``2^k``
   (exact, since ``2^k`` divides ``2^64``). ChaCha20 is a cryptographic PRG: a peer that sees a masked
   vector learns nothing about the mask without the key. (A statistical generator such as numpy's PCG64
   seeded from the key would be fast too, but its state can be recovered from outputs; we do not rely on
   it for secrecy.) Every mask appears once with ``+`` and once with ``−``, so the masks cancel exactly
   in the modular sum, and what one site sends is uniform on ``[0, 2^k)`` whatever its update.

The masked vectors cross as int64 under the wire kind ``"masked_parameters"``; see
:class:`~neurofed.federated.strategies.secure_aggregation.SecureAggregation` for the rule that uses this.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch import Tensor

__all__ = ["PUBLIC_KEY_BYTES", "STATISTICS_RANGE", "FixedPoint", "PairwiseMasks", "SiteKeys", "key_exchange", "mask",
           "mask_partners", "modulus_bits"]

PUBLIC_KEY_BYTES = 32
_HKDF_INFO = b"neurofed secure aggregation v1"
#: Range of statistics summed under masks (counts, label, loss and metric sums): a value beyond it is treated
#: as non-finite, as NaN or inf are (a flag summed beside it makes the pooled value NaN), never wrapped.
STATISTICS_RANGE = 2.0**44


def modulus_bits(num_sites: int) -> int:
    """``k = 63 − ⌈log2 n⌉``: the largest modulus ``2^k`` whose sum over ``n`` sites fits in int64."""
    if num_sites < 1:
        raise ValueError(f"secure aggregation needs at least one site, got num_sites={num_sites}")
    return 63 - math.ceil(math.log2(num_sites))


@dataclass
class FixedPoint:
    """Encoding of float vectors as integers mod ``2^k`` for an exact modular sum over ``num_sites`` sites.

    Args:
        clip_range: R; values are clipped to ``[−R, R]`` before encoding (counted in ``clipped``).
        num_sites: n, the number of vectors summed.
        frac_bits: f, the precision: the quantization step is ``2^−f`` and each site adds at most ``2^−(f+1)``
            of rounding error. It must leave headroom, ``f ≤ k − 2 − ⌈log2 n⌉ − ⌈log2 R⌉``. Default:
            ``52 − ⌈log2 n⌉ − ⌈log2 R⌉`` (within that headroom), so that integers up to ``n·R·2^f`` are exact in
            float64 and the quantization error is the only error: with R = 16 and 16 sites, f = 44 and a sum
            is exact to ``16·2^−45 ≈ 5e−13``.
    """

    clip_range: float
    num_sites: int
    frac_bits: int | None = None

    def __post_init__(self) -> None:
        if not (self.clip_range > 0 and math.isfinite(self.clip_range)):
            raise ValueError(f"FixedPoint: clip_range must be a positive finite number, got {self.clip_range}")
        self.bits = modulus_bits(self.num_sites)
        log_nr = math.ceil(math.log2(self.num_sites)) + math.ceil(math.log2(self.clip_range))
        headroom = self.bits - 2 - log_nr
        if self.frac_bits is None:  # every encoded value and every decoded sum is then exact in float64
            self.frac_bits = max(0, min(headroom, 52 - log_nr))
        if not 0 <= self.frac_bits <= headroom:
            raise ValueError(
                f"FixedPoint: frac_bits={self.frac_bits} with clip_range={self.clip_range} and {self.num_sites} "
                f"sites could wrap the sum mod 2^{self.bits}; use frac_bits <= {headroom} or a smaller clip_range"
            )
        self.modulus_mask = np.uint64((1 << self.bits) - 1)
        self.clipped = 0

    @property
    def step(self) -> float:
        """The quantization step ``2^−f``."""
        return 2.0 ** -self.frac_bits

    def max_sum_error(self) -> float:
        """Bound on ``|decode(Σ encode(x_k)) − Σ x_k|`` for unclipped inputs: ``n · 2^−(f+1)``."""
        return self.num_sites * self.step / 2

    def encode(self, x: Tensor) -> np.ndarray:
        """``round(clip(x)·2^f) mod 2^k`` as uint64; the number of clipped values is added to ``clipped``."""
        v = x.detach().cpu().double().numpy().copy()  # in-place passes below: a round is ~3M values per SFCN
        low, high = v.min(initial=0.0), v.max(initial=0.0)
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError("secure aggregation: the update has non-finite values (NaN or inf); "
                             "they cannot be encoded — check the site's local training")
        if low < -self.clip_range or high > self.clip_range:
            self.clipped += int(np.count_nonzero(np.abs(v) > self.clip_range))
            np.clip(v, -self.clip_range, self.clip_range, out=v)
        v *= 2.0**self.frac_bits
        np.rint(v, out=v)
        q = v.astype(np.int64).view(np.uint64)
        q &= self.modulus_mask
        return q

    def decode(self, total: Tensor) -> Tensor:
        """The float64 sum from an int64 sum of residues: reduce mod ``2^k``, recentre to signed, scale by ``2^−f``."""
        r = total.cpu().numpy().copy().view(np.uint64)
        half = np.uint64(1 << (self.bits - 1))  # [0, 2^k) → [−2^(k−1), 2^(k−1)) without leaving uint64/int64
        r += half
        r &= self.modulus_mask
        signed = r.view(np.int64)
        signed -= np.int64(half)
        out = signed.astype(np.float64)
        out *= 2.0**-self.frac_bits
        return torch.from_numpy(out)


class SiteKeys:
    """This site's X25519 key pair for one run; only :attr:`public` may leave the process."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(serialization.Encoding.Raw,
                                                              serialization.PublicFormat.Raw)

    def public_tensor(self) -> Tensor:
        """The public key as 32 uint8 values, the ``"public_key"`` payload."""
        return torch.tensor(list(self.public), dtype=torch.uint8)

    def exchange(self, peer_public: bytes) -> bytes:
        """The raw X25519 shared secret with a peer (input to HKDF, never used directly)."""
        return self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))

    def __repr__(self) -> str:  # never show the private key
        return f"SiteKeys(public={self.public.hex()[:16]}…)"


def mask_partners(site_rank: int, num_sites: int, neighbours: int | None, coin: bytes, round: int) -> set[int]:
    """The sites this one shares masks with in ``round``: all others, or ``neighbours`` random partners.

    With ``neighbours = 2h`` the sites are placed on a ring in a random order drawn from ``coin`` (a value
    every site committed to before any saw the others', see the handshake) and the round, and each site pairs
    with the ``h`` sites on each side — the Harary graph of SecAgg+ (Bell et al. 2020) under a random
    relabelling. The relation is symmetric, so every mask is still added once and subtracted once; masking
    costs O(h) instead of O(n), and since nobody chose the order, colluders cannot arrange to be all of a
    given site's partners (a fixed ring let two neighbours unmask the site between them).
    """
    others = set(range(num_sites)) - {site_rank}
    if neighbours is None or neighbours >= num_sites - 1:
        return others
    if neighbours < 2 or neighbours % 2:
        raise ValueError(f"secure aggregation: neighbours must be an even number >= 2 (h on each side of a ring), "
                         f"or None for every other site; got {neighbours}")
    seed = int.from_bytes(hashlib.sha256(b"mask partners|" + coin + struct.pack("<q", round)).digest()[:8], "little")
    order = np.random.default_rng(seed).permutation(num_sites).tolist()
    at, h = order.index(site_rank), neighbours // 2
    return {order[(at + d) % num_sites] for d in range(-h, h + 1) if d} & others


def key_exchange(keys: SiteKeys, public_keys: Sequence[bytes], site_rank: int,
                 authenticate: Callable[[Sequence[bytes]], None] | None = None,
                 peers: set[int] | None = None) -> dict[int, bytes]:
    """One shared 32-byte key per other site (or per site in ``peers``), from every site's public key (in site order).

    ``authenticate`` is the seam for the federation's trust layer: called with the gathered keys before
    they are used, it must raise unless they are the keys the authenticated sites sent (e.g. by checking a
    MAC over them under the federation secret). Without it, a party on the network path who can alter
    traffic could substitute its own keys (a man in the middle) and unmask updates.
    """
    public_keys = [bytes(k) for k in public_keys]
    if any(len(k) != PUBLIC_KEY_BYTES for k in public_keys):
        raise ValueError(f"secure aggregation: every public key must be {PUBLIC_KEY_BYTES} bytes, got lengths "
                         f"{[len(k) for k in public_keys]}")
    if public_keys[site_rank] != keys.public:
        raise ValueError(f"secure aggregation: the gathered key of site {site_rank} is not this site's own; "
                         "the key exchange was altered or the site ranks are inconsistent")
    if len(set(public_keys)) != len(public_keys):
        raise ValueError("secure aggregation: two sites sent the same public key; a key was replayed — restart "
                         "the run (keys are made fresh per run)")
    if authenticate is not None:
        authenticate(public_keys)
    shared = {}
    for j, peer in enumerate(public_keys):
        if j == site_rank or (peers is not None and j not in peers):
            continue
        lo, hi = min(site_rank, j), max(site_rank, j)
        info = _HKDF_INFO + struct.pack("<II", lo, hi) + public_keys[lo] + public_keys[hi]
        shared[j] = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(keys.exchange(peer))
    return shared


def _keystream(key: bytes, round: int, call: int, size: int, zeros: bytes | None = None,
               buffer: bytearray | None = None) -> np.ndarray:
    """``size`` uniform uint64 values: ChaCha20 of zeros under ``key``, nonce (block 0, round, call).

    ``zeros`` (8·size zero bytes) and ``buffer`` (at least 8·size + 16 bytes) may be reused across calls:
    writing into one buffer is several times faster than a fresh 24 MB result per pair.
    """
    zeros = bytes(8 * size) if zeros is None else zeros
    buffer = bytearray(8 * size + 16) if buffer is None else buffer
    nonce = struct.pack("<IQI", 0, round, call)
    Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update_into(zeros, buffer)
    return np.frombuffer(buffer, dtype=np.uint64, count=size)


def mask(encoded: np.ndarray, shared_keys: dict[int, bytes], site_rank: int, round: int, call: int,
         modulus_mask: np.uint64) -> Tensor:
    """``encoded + Σ_{j>i} m_ij − Σ_{j<i} m_ji  (mod 2^k)`` as int64, the ``"masked_parameters"`` payload."""
    out = encoded.copy()
    zeros, buffer = bytes(8 * out.size), bytearray(8 * out.size + 16)
    for j, key in sorted(shared_keys.items()):
        m = _keystream(key, round, call, out.size, zeros, buffer)
        if j > site_rank:
            out += m
        else:
            out -= m
    out &= modulus_mask
    return torch.from_numpy(out.view(np.int64))


class PairwiseMasks:
    """This site's masking for one keying: the shared keys with every other site, the partners per round,
    and a counter so that no (key, nonce) pair is ever used twice.

    Args:
        shared_keys: This site's shared key with every other site (:func:`key_exchange`).
        site_rank, num_sites: This site's place.
        neighbours: Mask with this many random partners per round (:func:`mask_partners`), ``None``: all.
        coin: The federation's jointly random value from the handshake.
    """

    def __init__(self, shared_keys: dict[int, bytes], site_rank: int, num_sites: int, neighbours: int | None,
                 coin: bytes) -> None:
        self.shared_keys, self.site_rank, self.num_sites = shared_keys, site_rank, num_sites
        self.neighbours, self.coin = neighbours, coin
        self.calls = 0
        self._statistics = FixedPoint(STATISTICS_RANGE, num_sites)

    def masked(self, encoded: np.ndarray, modulus_mask: np.uint64, round: int) -> Tensor:
        """``encoded`` plus this round's pairwise masks (a fresh keystream position for every call)."""
        partners = mask_partners(self.site_rank, self.num_sites, self.neighbours, self.coin, round)
        keys = {j: k for j, k in self.shared_keys.items() if j in partners}
        out = mask(encoded, keys, self.site_rank, round, self.calls, modulus_mask)
        self.calls += 1
        return out

    def sum_statistics(self, link: Any, t: Tensor, kind: str) -> Tensor:
        """The sum over sites of a small statistic, crossing masked (wire kind ``"masked_statistics"``).

        Non-finite values, and values beyond :data:`STATISTICS_RANGE`, are sent as 0 with a flag summed beside
        them: the pooled value is NaN wherever any site's was not a finite number in range, as a plain sum
        would be, and no site's value can wrap the others'.
        """
        v = t.detach().cpu().double().reshape(-1)
        bad = ~torch.isfinite(v) | (v.abs() > STATISTICS_RANGE)
        both = torch.cat([torch.where(bad, torch.zeros_like(v), v), bad.double()])
        total = self._statistics.decode(link.all_reduce(self.masked(self._statistics.encode(both),
                                                                     self._statistics.modulus_mask, 0),
                                                        "masked_statistics"))
        out = total[: v.numel()].clone()
        out[total[v.numel():] > 0.5] = math.nan
        return out.to(t.dtype).reshape(t.shape)
