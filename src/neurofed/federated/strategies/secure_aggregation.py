"""SecureAggregation: any mean-based rule, with every site's contribution masked on the wire.

The wrapped rule's ``aggregate`` runs unchanged, but the :class:`MaskedCollectives` it is handed replace
each sum by a masked one (:mod:`neurofed.federated.secure_aggregation`): a site sends its fixed-point
vector plus pairwise masks, and only the sum over all sites — where the masks cancel — can be read.

``weighted_mean(params, w)`` is computed as ``global + Σ_k (w_k/Σw)·(params_k − global)``: the same number
as FedAvg's ``Σ_k (w_k/Σw)·params_k``, but the encoded values are the sites' (small) weighted updates, so the
clipping range ``R`` bounds updates, not weights, and the fixed-point precision is spent where it matters.
Example counts (the weights' sum) still cross in the clear, as for every rule. Rules that need each site's
vector (FedMedian, FedTrimmedAvg: ``needs_individual_updates``) are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from neurofed.federated import secure_aggregation as sa
from neurofed.federated.collectives import Collectives
from neurofed.federated.strategies.base import Contribution, RoundContext, Strategy
from neurofed.federated.strategies.wrapper import StrategyWrapper

if TYPE_CHECKING:
    from neurofed.federated.site_link import SiteLink

__all__ = ["MaskedCollectives", "SecureAggregation"]

log = logging.getLogger(__name__)


class MaskedCollectives(Collectives):
    """Collectives whose sums are masked; gathering individual vectors is refused.

    Args:
        link, round: As for :class:`Collectives`.
        codec: The fixed-point encoding for this federation.
        shared_keys: This site's shared key with every other site.
        site_rank: This site's index.
        global_params: The round's global vector (``weighted_mean`` encodes updates relative to it).
    """

    def __init__(self, link: SiteLink, round: int, codec: sa.FixedPoint, shared_keys: dict[int, bytes],
                 site_rank: int, global_params: Tensor) -> None:
        super().__init__(link, round)
        self.codec, self.shared_keys, self.site_rank = codec, shared_keys, site_rank
        self.global_params = global_params
        self.calls = 0

    def masked_sum(self, vec: Tensor) -> Tensor:
        """``Σ_k vec_k`` in float64 through one all_reduce of masked int64 residues."""
        masked = sa.mask(self.codec.encode(vec), self.shared_keys, self.site_rank, self.round, self.calls,
                         self.codec.modulus_mask)
        self.calls += 1  # a fresh mask for every sum of the round
        return self.codec.decode(self.link.all_reduce(masked, "masked_parameters"))

    def weighted_mean(self, vec: Tensor, weight: float) -> Tensor:
        total = self.total_weight(weight)
        g = self.global_params.double()
        return (g + self.masked_sum((vec.double() - g) * (weight / total))).to(vec.dtype)

    def sum(self, vec: Tensor) -> Tensor:
        return self.masked_sum(vec).to(vec.dtype)

    def gather(self, vec: Tensor) -> list[Tensor]:
        raise ValueError("secure aggregation hides individual vectors: a rule that gathers them cannot run under "
                         "SecureAggregation")


class SecureAggregation(StrategyWrapper):
    """Run ``inner``'s aggregation over pairwise-masked sums (no site or observer sees another's update).

    Args:
        inner: A rule whose aggregation is a (weighted) sum: FedAvg, FedAvgM, FedProx, FedBN, the FedOpt
            family, and the ClipUpdates and DPFedAvg wrappers.
        clip_range: R, the bound on each encoded coordinate (a weighted update, ``(w_k/Σw)·Δ_k``); values
            beyond it are clipped and counted in ``secagg/clipped_values``. Clip updates to a norm below R
            (``ClipUpdates``) to make this never happen.
        frac_bits: Fixed-point precision f (quantization step ``2^−f``); default: the largest safe one.
        authenticate: Called with every site's public key (in site order) before they are used; the seam for
            the trust layer to check a MAC over them. ``None`` trusts the transport.
        neighbours: Mask with only this many sites (an even number, half on each side of a ring, as in
            SecAgg+) instead of every other site: cheaper for many sites, and an update stays hidden unless all
            of its site's neighbours collude. ``None`` (default): every pair.
    """

    def __init__(self, inner: Strategy, clip_range: float = 16.0, frac_bits: int | None = None,
                 authenticate: Callable[[Sequence[bytes]], None] | None = None,
                 neighbours: int | None = None) -> None:
        if inner.needs_individual_updates:
            raise ValueError(
                f"SecureAggregation cannot wrap {inner!r}: it needs every site's individual update, which masking "
                "hides; use a mean-based rule (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad) or drop "
                "SecureAggregation"
            )
        super().__init__(inner)
        self.clip_range, self.frac_bits, self.authenticate = float(clip_range), frac_bits, authenticate
        self.neighbours = neighbours
        sa.FixedPoint(self.clip_range, 2, frac_bits)  # reject a bad range or precision now, not at round 0
        sa.ring_neighbours(0, 1_000, neighbours)  # reject an odd count now
        self._codec: sa.FixedPoint | None = None
        self._shared: dict[int, bytes] | None = None
        self._last_round = -1

    def hparams(self) -> dict[str, Any]:
        return {"inner": self.inner, "clip_range": self.clip_range, "frac_bits": self.frac_bits,
                "neighbours": self.neighbours}

    def rekey(self, comm: Collectives, context: RoundContext) -> None:
        """Fresh key pair, one all_gather of public keys, shared keys per pair. The private key is dropped
        once the shared keys exist; nothing here is saved, logged or checkpointed."""
        keys = sa.SiteKeys()
        gathered = comm.link.all_gather(keys.public_tensor(), "public_key")
        if hasattr(comm.link, "authenticate_keys"):  # the trust layer: each key proven under the federation secret
            comm.link.authenticate_keys(context.round, [bytes(t.tolist()) for t in gathered])
        peers = sa.ring_neighbours(context.site_rank, context.num_sites, self.neighbours)
        self._shared = sa.key_exchange(keys, [bytes(t.tolist()) for t in gathered], context.site_rank,
                                       self.authenticate, peers)
        self._codec = sa.FixedPoint(self.clip_range, context.num_sites, self.frac_bits)

    def aggregate(self, contribution: Contribution, comm: Collectives, context: RoundContext) -> Tensor:
        if self._shared is None or context.round <= self._last_round:  # a new run, or a retried round
            self.rekey(comm, context)
        self._last_round = context.round
        before = self._codec.clipped
        masked = MaskedCollectives(comm.link, comm.round, self._codec, self._shared, context.site_rank,
                                   contribution.global_params)
        out = self.inner.aggregate(contribution, masked, context)
        if self._codec.clipped > before:
            log.warning("secure aggregation, round %d: %d value(s) of this site's update were outside "
                        "[-%g, %g] and were clipped; raise clip_range or clip updates (ClipUpdates)",
                        context.round, self._codec.clipped - before, self.clip_range, self.clip_range)
        return out

    @property
    def clipped_values(self) -> int:
        """Values this site clipped to the fixed-point range so far."""
        return 0 if self._codec is None else self._codec.clipped

    def round_metrics(self) -> dict[str, float]:
        return {**self.inner.round_metrics(), "secagg/clipped_values": float(self.clipped_values)}
