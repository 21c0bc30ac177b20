"""SecureAggregation: any mean-based rule, with every site's contribution masked on the wire.

The wrapped rule's ``aggregate`` runs unchanged, but the :class:`MaskedCollectives` it is handed replace
each sum by a masked one (:mod:`neurofed.federated.secure_aggregation`): a site sends its fixed-point
vector plus pairwise masks, and only the sum over all sites — where the masks cancel — can be read.

``weighted_mean(params, w)`` is computed as ``global + Σ_k (w_k/Σw)·clip(params_k − global, R)``: FedAvg's
weighted mean, with each site's update clipped coordinate-wise to ``[−R, R]`` before weighting, so every
honest sum is a convex combination inside that box. The weights' sum crosses masked too.

**What the encoding enforces.** A site controls its own residues: it can send anything. But an honest
weighted mean decodes inside ``[−R, R]`` (a plain sum inside ``[−n·R, n·R]``), while the modulus leaves
room far beyond that. A decoded coordinate outside the box is therefore proof that some site sent a residue
no honest encoding produces; the round stops there (:class:`FederationIntegrityError`) and nothing is
committed. What remains: within the box, a malicious site can still move the aggregate (by up to ``2R`` per
coordinate for a weighted mean); screening on self-reported norms is not run under masking, since nobody can
check what a site reports about its own hidden update.

Rules that need each site's vector (FedMedian, FedTrimmedAvg: ``needs_individual_updates``) are refused.

When it attaches to a federation (:meth:`SecureAggregation.attach`, right after the handshake) it also
masks the federation's statistics — label statistics, example counts, validation and test loss and metric
sums, agreed stop flags — through :meth:`SiteLink.sum_statistics`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from neurofed.federated import secure_aggregation as sa
from neurofed.federated.collectives import Collectives, NoContributionError
from neurofed.federated.errors import FederationIntegrityError
from neurofed.federated.strategies.base import Contribution, RoundContext, Strategy
from neurofed.federated.strategies.wrapper import StrategyWrapper

if TYPE_CHECKING:
    from neurofed.federated.site_link import SiteLink

__all__ = ["MaskedCollectives", "SecureAggregation", "secure_aggregation_of"]

log = logging.getLogger(__name__)


def secure_aggregation_of(strategy: Strategy) -> SecureAggregation | None:
    """The SecureAggregation of ``strategy`` (always the outermost wrapper), or ``None``."""
    return strategy if isinstance(strategy, SecureAggregation) else None


class MaskedCollectives(Collectives):
    """Collectives whose sums are masked and checked against the range honest sites can produce; gathering
    individual vectors is refused.

    Args:
        link, round: As for :class:`Collectives`.
        codec: The fixed-point encoding for this federation.
        masks: This site's pairwise masks.
        global_params: The round's global vector (``weighted_mean`` encodes updates relative to it).
    """

    def __init__(self, link: SiteLink, round: int, codec: sa.FixedPoint, masks: sa.PairwiseMasks,
                 global_params: Tensor) -> None:
        super().__init__(link, round)
        self.codec, self.masks, self.global_params = codec, masks, global_params

    def masked_sum(self, vec: Tensor, bound: float) -> Tensor:
        """``Σ_k vec_k`` in float64 through one all_reduce of masked int64 residues; raises when a decoded
        coordinate lies beyond ``bound``, which no honest encoding can produce."""
        masked = self.masks.masked(self.codec.encode(vec), self.codec.modulus_mask, self.round)
        total = self.codec.decode(self.link.all_reduce(masked, "masked_parameters"))
        slack = bound + self.codec.max_sum_error() * 2
        outside = int((total.abs() > slack).sum())
        if outside:
            raise FederationIntegrityError(
                f"round {self.round + 1}: the masked sum decoded outside [-{bound:g}, {bound:g}] at {outside} "
                f"coordinate(s) (largest {float(total.abs().max()):.6g}); no honest site can produce that, so some "
                "site sent residues outside its clipping range (a malicious or faulty site). Nothing of this round "
                "was written"
            )
        return total

    def total_weight(self, weight: float) -> float:
        total = float(self.link.sum_statistics(torch.tensor([weight], dtype=torch.float64), "example_count"))
        if not total > 0:
            raise NoContributionError(f"round {self.round}: no site contributed training examples (total weight "
                                      f"{total}); check that every site's training split is non-empty")
        return total

    def weighted_mean(self, vec: Tensor, weight: float) -> Tensor:
        total = self.total_weight(weight)
        g = self.global_params.double()
        update = (vec.double() - g).clamp(-self.codec.clip_range, self.codec.clip_range)
        self.codec.clipped += int(((vec.double() - g).abs() > self.codec.clip_range).sum())
        return (g + self.masked_sum(update * (weight / total), self.codec.clip_range)).to(vec.dtype)

    def sum(self, vec: Tensor) -> Tensor:
        return self.masked_sum(vec, self.num_sites * self.codec.clip_range).to(vec.dtype)

    def gather(self, vec: Tensor) -> list[Tensor]:
        raise ValueError("secure aggregation hides individual vectors: a rule that gathers them cannot run under "
                         "SecureAggregation")


class SecureAggregation(StrategyWrapper):
    """Run ``inner``'s aggregation over pairwise-masked sums (no site or observer sees another's update).

    Args:
        inner: A rule whose aggregation is a (weighted) sum: FedAvg, FedAvgM, FedProx, FedBN, the FedOpt
            family, and the ClipUpdates and DPFedAvg wrappers.
        clip_range: R, the bound on each coordinate of a site's update (``w_k − w_global``; for a plain sum,
            of each summed value); values beyond it are clipped and counted in ``secagg/clipped_values``. Clip
            updates to a norm below R (``ClipUpdates``) to make this never happen.
        frac_bits: Fixed-point precision f (quantization step ``2^−f``); default: the largest safe one.
        authenticate: Called with every site's public key (in site order) before they are used: a seam for a
            deployment's own key infrastructure, besides the signatures every site checks.
        neighbours: Mask with only this many random partners per round (an even number; SecAgg+'s Harary graph
            over a random order, drawn from a value no site chose alone) instead of every other site: cheaper
            for many sites. ``None`` (default): every pair.
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
        sa.mask_partners(0, 1_000, neighbours, b"", 0)  # reject an odd count now
        self._codec: sa.FixedPoint | None = None
        self._masks: sa.PairwiseMasks | None = None
        self._session: bytes | None = None
        self._last_round = -1

    def hparams(self) -> dict[str, Any]:
        return {"inner": self.inner, "clip_range": self.clip_range, "frac_bits": self.frac_bits,
                "neighbours": self.neighbours}

    def attach(self, link: SiteLink, round: int = 0) -> None:
        """Key this federation: a fresh X25519 key pair, one all_gather of public keys signed by every site
        (:meth:`SiteLink.authenticate_keys`), a shared key per pair; then route the federation's statistics
        through the masks too. The private key is dropped once the shared keys exist; nothing here is saved,
        logged or checkpointed."""
        fed = link.federation
        keys = sa.SiteKeys()
        gathered = [bytes(t.tolist()) for t in link.all_gather(keys.public_tensor(), "public_key")]
        link.authenticate_keys(round, gathered)
        shared = sa.key_exchange(keys, gathered, fed.site_rank, self.authenticate)
        opened = link.opened
        self._masks = sa.PairwiseMasks(shared, fed.site_rank, fed.num_sites, self.neighbours, opened.coin)
        self._codec = sa.FixedPoint(self.clip_range, fed.num_sites, self.frac_bits)
        self._session = opened.session
        link.masking = self._masks

    def aggregate(self, contribution: Contribution, comm: Collectives, context: RoundContext) -> Tensor:
        link = comm.link
        if self._masks is None or link.masking is not self._masks or context.round <= self._last_round:
            self.attach(link, context.round)  # a new run, a new federation, or a retried round
        self._last_round = context.round
        before = self._codec.clipped
        masked = MaskedCollectives(link, comm.round, self._codec, self._masks, contribution.global_params)
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
