"""The federation: site leaders talking to each other, and nothing else.

Inside a site, Fabric owns the default process group (DDP over local GPUs). Across sites, only each
site's leader joins a separate gloo group built on its own TCPStore, so federation traffic never mixes
with the site's DDP traffic and works without GPUs or a shared file system. Every send goes through
:func:`neurofed.federated.wire.check_payload`, and every failure to reach the other sites becomes a
:class:`FederationTimeoutError` within the configured timeout rather than a hang.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from neurofed.federated.wire import check_payload

__all__ = ["FederationGroup", "FederationTimeoutError", "LocalGroup", "RecordingGroup"]

log = logging.getLogger(__name__)


class FederationTimeoutError(RuntimeError):
    """The other sites could not be reached, or did not answer, within the timeout."""


def _wire_copy(t: Tensor) -> Tensor:
    """Contiguous CPU copy that the collective may overwrite without touching the caller's tensor."""
    return t.detach().to("cpu").clone().contiguous()


class FederationGroup:
    """Gloo group of ``num_sites`` site leaders rendezvousing at ``address:port`` (site 0 hosts it).

    Results come back as CPU tensors with the dtype that was sent; send float64 for statistics whose sums
    must not lose precision.
    """

    def __init__(self, address: str, port: int, site_rank: int, num_sites: int, timeout_s: float = 300.0) -> None:
        if num_sites < 1 or not 0 <= site_rank < num_sites:
            raise ValueError(f"FederationGroup: site_rank {site_rank} is not in [0, num_sites={num_sites})")
        self.address, self.port = address, int(port)
        self.site_rank, self.num_sites = int(site_rank), int(num_sites)
        self.timeout_s = float(timeout_s)
        timeout = timedelta(seconds=self.timeout_s)
        log.info("site %d/%d joining the federation at %s:%d", site_rank, num_sites, address, port)
        try:
            self._store = dist.TCPStore(
                address, self.port, self.num_sites, is_master=self.site_rank == 0,
                timeout=timeout, wait_for_workers=True,
            )
            self._pg = dist.ProcessGroupGloo(
                dist.PrefixStore("federation", self._store), self.site_rank, self.num_sites, timeout
            )
        except RuntimeError as e:  # DistStoreError / DistNetworkError / gloo errors are RuntimeErrors
            raise self._timeout_error("could not form the federation", e) from e

    def _timeout_error(self, what: str, cause: BaseException) -> FederationTimeoutError:
        hint = (
            "is site 0 running and listening there?" if self.site_rank != 0
            else "did every other site start, with the same address, port and num_sites?"
        )
        return FederationTimeoutError(
            f"site {self.site_rank} of {self.num_sites} {what} at {self.address}:{self.port} within "
            f"timeout_s={self.timeout_s:g} s: {hint} ({type(cause).__name__}: {str(cause).splitlines()[0]})"
        )

    def _wait(self, work, what: str) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            raise self._timeout_error(f"failed during {what}", e) from e

    def all_reduce_sum(self, t: Tensor, kind: str) -> Tensor:
        """Element-wise sum of ``t`` over all sites."""
        check_payload(kind, t)
        x = _wire_copy(t)
        self._wait(self._pg.allreduce([x]), f"all_reduce_sum({kind})")
        return x

    def all_gather(self, t: Tensor, kind: str) -> list[Tensor]:
        """Every site's ``t`` (same shape and dtype on all sites), in site-rank order."""
        check_payload(kind, t)
        x = _wire_copy(t)
        out = [torch.empty_like(x) for _ in range(self.num_sites)]
        self._wait(self._pg.allgather([out], [x]), f"all_gather({kind})")
        return out

    def broadcast(self, t: Tensor, kind: str, src: int = 0) -> Tensor:
        """Site ``src``'s ``t`` on every site (others pass a tensor of the same shape and dtype)."""
        check_payload(kind, t)
        x = _wire_copy(t)
        opts = dist.BroadcastOptions()
        opts.rootRank = int(src)
        opts.rootTensor = 0
        self._wait(self._pg.broadcast([x], opts), f"broadcast({kind}, src={src})")
        return x

    def barrier(self) -> None:
        """Wait until every site reaches this point."""
        self._wait(self._pg.barrier(), "barrier")

    def close(self) -> None:
        """Release the group; safe to call twice."""
        pg, self._pg = getattr(self, "_pg", None), None
        if pg is not None:
            try:
                pg.shutdown()
            except RuntimeError as e:
                log.debug("federation group shutdown: %s", e)
        self._store = None

    def __enter__(self) -> FederationGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalGroup:
    """A federation of one site: collectives are identities, payloads are still checked.

    Centralized training uses it, so the same loop (and the same wire checks) run in both settings.
    """

    site_rank = 0
    num_sites = 1

    def all_reduce_sum(self, t: Tensor, kind: str) -> Tensor:
        check_payload(kind, t)
        return _wire_copy(t)

    def all_gather(self, t: Tensor, kind: str) -> list[Tensor]:
        check_payload(kind, t)
        return [_wire_copy(t)]

    def broadcast(self, t: Tensor, kind: str, src: int = 0) -> Tensor:
        check_payload(kind, t)
        if src != 0:
            raise ValueError(f"LocalGroup has one site; broadcast src must be 0, got {src}")
        return _wire_copy(t)

    def barrier(self) -> None:
        return None

    def close(self) -> None:
        return None

    def __enter__(self) -> LocalGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RecordingGroup:
    """Wraps a group and records ``(kind, dtype, shape)`` of every payload, for auditing the wire."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.sent: list[tuple[str, torch.dtype, tuple[int, ...]]] = []

    @property
    def site_rank(self) -> int:
        return self.inner.site_rank

    @property
    def num_sites(self) -> int:
        return self.inner.num_sites

    def _record(self, kind: str, t: Tensor) -> None:
        check_payload(kind, t)
        self.sent.append((kind, t.dtype, tuple(t.shape)))

    def all_reduce_sum(self, t: Tensor, kind: str) -> Tensor:
        self._record(kind, t)
        return self.inner.all_reduce_sum(t, kind)

    def all_gather(self, t: Tensor, kind: str) -> list[Tensor]:
        self._record(kind, t)
        return self.inner.all_gather(t, kind)

    def broadcast(self, t: Tensor, kind: str, src: int = 0) -> Tensor:
        self._record(kind, t)
        return self.inner.broadcast(t, kind, src)

    def barrier(self) -> None:
        self.inner.barrier()

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> RecordingGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
