"""The two levels of communication of one site: its leader to the other sites, then the leader to its ranks.

Fabric owns the site's default process group (DDP over its GPUs, or one CPU process). Only the site leader
(rank 0 of the site) joins the cross-site group, a :class:`~neurofed.federated.group.FederationGroup` (or a
``LocalGroup`` for a federation of one), and then broadcasts what it received to the other ranks of its
site. Keeping both levels here lets the trainer say *what* is exchanged without saying *how*.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from neurofed.federated.config import Federation
from neurofed.federated.errors import FederationAuthError, FederationError
from neurofed.federated.group import FederationGroup, LocalGroup
from neurofed.federated.handshake import HandshakeResult, handshake, signed_exchange
from neurofed.federated.identity import SiteIdentity
from neurofed.federated.integrity import check_round
from neurofed.federated.wire import bytes_tensor

if TYPE_CHECKING:
    from lightning.fabric import Fabric

__all__ = ["SiteLink"]

log = logging.getLogger(__name__)


class SiteLink:
    """Cross-site collectives that every rank of a site calls, and the bytes this site sent.

    Args:
        fabric: The launched Fabric of this site.
        federation: Where this site sits in the federation.
        group: A cross-site group to use instead of building one (another transport, or a
            ``RecordingGroup`` that audits the wire); built on first use by the site leader otherwise.
    """

    def __init__(self, fabric: Fabric, federation: Federation, group: Any = None) -> None:
        self.fabric = fabric
        self.federation = federation
        self.group = group
        # What this site put on the wire since the counter was last reset (the trainer resets it per round).
        self.bytes_sent = 0
        self.opened: HandshakeResult | None = None
        self.identity: SiteIdentity | None = None  # this site's signing key, once the federation is opened
        self._secret: bytes | None = None
        # Secure aggregation's pairwise masks for statistics (set by SecureAggregation.attach), else None.
        self.masking: Any = None

    @property
    def is_site_leader(self) -> bool:
        return self.fabric.global_rank == 0

    def connect(self) -> Any:
        """The cross-site group (site leader only): ``LocalGroup`` for one site, else a FederationGroup.

        A FederationGroup that cannot reach the other sites raises ``FederationTimeoutError`` within
        ``federation.timeout_s``, so calling this early turns a missing federation into a prompt error.
        """
        if self.group is None and self.is_site_leader:
            fed = self.federation
            self.group = (
                LocalGroup() if fed.num_sites == 1
                else FederationGroup(fed.address, fed.port, fed.site_rank, fed.num_sites, fed.timeout_s,
                                     fed.bind_address, secret=self._secret)
            )
        return self.group

    def open(self, fingerprint: dict[str, str], committed: tuple[int, int] | None = None,
             declared_examples: float | None = 0.0) -> HandshakeResult:
        """Join the federation and run the handshake once (membership, agreement, resume round).

        Every rank of the site gets the result; a federation of one site has nothing to agree on.
        ``declared_examples=None`` keeps this site's example count to itself (secure aggregation).
        """
        if self.opened is not None:
            return self.opened
        fed = self.federation
        self._secret = fed.require_secret_or_loopback() if fed.num_sites > 1 else None
        self.identity, roster = fed.load_identity() if fed.num_sites > 1 else (SiteIdentity.ephemeral(), None)
        if fed.num_sites > 1 and roster is None:
            log.warning("site %d: federation without a roster (%s): sites are not authenticated",
                        fed.site_rank, "loopback simulation" if fed.on_loopback else "insecure: true")
        failure: FederationError | None = None
        declared = -1.0 if declared_examples is None else declared_examples
        result = HandshakeResult(b"", committed[0] if committed else None, [declared], [self.identity.public],
                                 [f"site{fed.site_rank}"])
        if self.is_site_leader and fed.num_sites > 1:
            try:
                result = handshake(self.connect(), self.identity, roster, fingerprint, committed, declared_examples)
            except FederationError as e:
                failure = e
                self.close()  # nothing more will be exchanged; release the group and its heartbeat now
        elif self.is_site_leader:
            self.connect()
        self._site_verdict(failure)
        declared_all = result.declared if len(result.declared) == fed.num_sites else [0.0] * fed.num_sites
        shared = self.site_broadcast(torch.tensor(
            [-1 if result.resume_round is None else result.resume_round, *declared_all], dtype=torch.float64))
        self.opened = HandshakeResult(result.session, None if shared[0] < 0 else int(shared[0]), shared[1:].tolist(),
                                      result.public_keys, result.names, result.coin)
        return self.opened

    def authenticate_keys(self, round: int, public_keys: list[bytes]) -> None:
        """Sign this site's secure-aggregation public key list and check every site's signature over it.

        Each site signs ``session | round | every site's key``, so a key substituted on the way (for any site,
        at any site), or sent by a party that is not the seat's owner, fails here before any mask is derived.
        """
        me = self.federation.site_rank
        opened = self.opened
        message = b"secure-aggregation-keys|" + opened.session + f"|{round}|".encode() + b"".join(public_keys)
        try:
            signed_exchange(_LinkGroup(self), self.identity, opened.public_keys, message,
                            f"the secure-aggregation keys of round {round + 1}", opened.names)
        except FederationAuthError as e:
            raise FederationAuthError(
                f"site {me}, round {round + 1}: the secure-aggregation keys are not the ones every site signed "
                f"(a substituted key?); no mask was derived from them. {e}"
            ) from e

    def set_stage(self, text: str) -> None:
        """What the federation is doing (``"round 3"``), named by the error if a site leaves now."""
        if self.group is not None and hasattr(self.group, "stage"):
            self.group.stage = text

    def check_round(self, round: int, digest: bytes) -> None:
        """The round check of :mod:`~neurofed.federated.integrity` (leader), its verdict on every rank."""
        failure: FederationError | None = None
        if self.is_site_leader and self.federation.num_sites > 1:
            try:
                check_round(self.connect(), self.identity, self.opened.public_keys, self.opened.session, round, digest)
            except FederationError as e:
                failure = e
        self._site_verdict(failure)

    def _site_verdict(self, failure: FederationError | None) -> None:
        """Raise at every rank of the site when the leader found ``failure`` (the leader raises it itself)."""
        if self.fabric.world_size > 1:
            flag = self.site_broadcast(torch.tensor([0.0 if failure is None else 1.0]))
            if flag.item() and failure is None:
                raise FederationError("the site leader stopped the federation (its log says why)")
        if failure is not None:
            raise failure

    def all_reduce(self, t: Tensor, kind: str) -> Tensor:
        """Sum over sites. The leader sends; every rank of the site receives the result."""
        if self.is_site_leader:
            self.bytes_sent += t.numel() * t.element_size()
            out = self.connect().all_reduce_sum(t, kind)
        else:
            out = torch.empty_like(t, device="cpu")
        return self.site_broadcast(out)

    def sum_statistics(self, t: Tensor, kind: str) -> Tensor:
        """Sum over sites of a statistic (counts, label statistics, loss and metric sums, control flags).

        Under secure aggregation (:attr:`masking` set by ``SecureAggregation``) it crosses masked like the
        parameters, so no site and no neighbour in gloo's ring sees another site's value; otherwise it is a plain
        all_reduce, in which gloo's ring hands a site's first chunk, unsummed, to the next site.
        """
        if self.masking is not None:
            return self.masking.sum_statistics(self, t, kind)
        return self.all_reduce(t, kind)

    def all_gather(self, t: Tensor, kind: str) -> list[Tensor]:
        """Every site's ``t`` (in site order) on every rank of every site."""
        if self.is_site_leader:
            self.bytes_sent += t.numel() * t.element_size()
            stacked = torch.stack(self.connect().all_gather(t, kind))
        else:
            stacked = torch.empty((self.federation.num_sites, *t.shape), dtype=t.dtype)
        return list(self.site_broadcast(stacked).unbind(0))

    def broadcast(self, t: Tensor, kind: str) -> Tensor:
        """Site 0's ``t`` on every rank of every site."""
        if self.is_site_leader:
            if self.federation.site_rank == 0:
                self.bytes_sent += t.numel() * t.element_size()
            t = self.connect().broadcast(t, kind, src=0)
        return self.site_broadcast(t)

    def site_broadcast(self, t: Tensor) -> Tensor:
        """The site leader's ``t`` on every rank of this site (inside the site only)."""
        if self.fabric.world_size == 1:
            return t
        x = t.to(self.fabric.device)
        torch.distributed.broadcast(x, src=0)
        return x.cpu()

    def site_sum(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over the ranks of this site (inside the site only)."""
        if self.fabric.world_size == 1:
            return t
        return self.fabric.all_reduce(t.to(self.fabric.device), reduce_op="sum").cpu()

    def close(self) -> None:
        """Leave the federation; the next collective joins it again."""
        if self.group is not None:
            self.group.close()
            self.group = None


class _LinkGroup:
    """A SiteLink seen as a group (``site_rank``, ``num_sites``, ``all_gather``), for exchanges that every rank
    of a site takes part in through its leader."""

    def __init__(self, link: SiteLink) -> None:
        self.link = link
        self.site_rank, self.num_sites = link.federation.site_rank, link.federation.num_sites

    def all_gather(self, t: Tensor, kind: str) -> list[Tensor]:
        return self.link.all_gather(t, kind)
