"""The two levels of communication of one site: its leader to the other sites, then the leader to its ranks.

Fabric owns the site's default process group (DDP over its GPUs, or one CPU process). Only the site leader
(rank 0 of the site) joins the cross-site group, a :class:`~neurofed.federated.group.FederationGroup` (or a
``LocalGroup`` for a federation of one), and then broadcasts what it received to the other ranks of its
site. Keeping both levels here lets the trainer say *what* is exchanged without saying *how*.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from neurofed.federated.config import Federation
from neurofed.federated.group import FederationGroup, LocalGroup

if TYPE_CHECKING:
    from lightning.fabric import Fabric

__all__ = ["SiteLink"]


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
                else FederationGroup(fed.address, fed.port, fed.site_rank, fed.num_sites, fed.timeout_s)
            )
        return self.group

    def all_reduce(self, t: Tensor, kind: str) -> Tensor:
        """Sum over sites. The leader sends; every rank of the site receives the result."""
        if self.is_site_leader:
            self.bytes_sent += t.numel() * t.element_size()
            out = self.connect().all_reduce_sum(t, kind)
        else:
            out = torch.empty_like(t, device="cpu")
        return self.site_broadcast(out)

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
