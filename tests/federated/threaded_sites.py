"""Run one aggregation rule at N sites at once, in threads of this process, for exact unit tests of its math.

Each thread is one site with its own strategy object and a real :class:`SiteLink` and :class:`Collectives`;
only the transport is in memory: :class:`ThreadGroup` sums and gathers in site order (and checks every
payload against the wire allow-list). The real gloo transport is tested across processes elsewhere.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Callable

import torch
from timeouts import scaled

from neurofed.federated.collectives import Collectives
from neurofed.federated.config import Federation
from neurofed.federated.site_link import SiteLink
from neurofed.federated.strategies import Contribution, RoundContext, Strategy
from neurofed.federated.wire import check_payload


class _Board:
    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=scaled(30))
        self.slots: list[torch.Tensor | None] = [None] * n

    def exchange(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = t.detach().clone()
        self.barrier.wait()
        out = [s.clone() for s in self.slots]
        self.barrier.wait()
        return out


class ThreadGroup:
    """The group interface of :class:`~neurofed.federated.group.FederationGroup`, for sites in threads."""

    def __init__(self, board: _Board, site_rank: int) -> None:
        self.board, self.site_rank, self.num_sites = board, site_rank, board.n

    def all_reduce_sum(self, t, kind):
        check_payload(kind, t)
        total = torch.zeros_like(t)
        for x in self.board.exchange(self.site_rank, t):
            total += x
        return total

    def all_gather(self, t, kind):
        check_payload(kind, t)
        return self.board.exchange(self.site_rank, t)

    def broadcast(self, t, kind, src=0):
        check_payload(kind, t)
        return self.board.exchange(self.site_rank, t)[src]

    def close(self):
        return None


def run_rule(make: Callable[[], Strategy], rounds: list[tuple[list[torch.Tensor], list[float]]],
             start: torch.Tensor, group_class: type = ThreadGroup) -> list[list[torch.Tensor]]:
    """Aggregate ``rounds`` of (params per site, example count per site) from ``start``; results per round.

    As in the trainer, a site's weight is ``site_weight(count)``, or 0 when its count is 0 (not sampled).
    Each round starts from the site's own previous global vector.
    """
    n = len(rounds[0][0])
    board = _Board(n)
    strategies = [make() for _ in range(n)]
    results: list[list[torch.Tensor]] = [[None] * n for _ in rounds]
    errors: list[BaseException] = []

    def site(k: int) -> None:
        try:
            fed = Federation(site_rank=k, num_sites=n)
            link = SiteLink(SimpleNamespace(global_rank=0, world_size=1, device=torch.device("cpu")), fed,
                            group=group_class(board, k))
            link.open({"rule": "threaded"})  # the handshake: session, coin and each site's signing key
            global_vec = start.clone()
            for r, (params, weights) in enumerate(rounds):
                context = RoundContext(round=r, seed=0, site_rank=k, num_sites=n)
                sent = strategies[k].client_update(params[k].clone(), global_vec, context)
                weight = strategies[k].site_weight(weights[k]) if weights[k] > 0 else 0.0
                new = strategies[k].aggregate(Contribution(sent, global_vec, weight), Collectives(link, r), context)
                results[r][k] = new
                global_vec = new
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)
            board.barrier.abort()

    threads = [threading.Thread(target=site, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
