"""The federation: site leaders talking to each other, and nothing else.

Inside a site, Fabric owns the default process group (DDP over local GPUs). Across sites, only each
site's leader joins a separate gloo group built on its own TCPStore, so federation traffic never mixes
with the site's DDP traffic and works without GPUs or a shared file system. Every send goes through
:func:`neurofed.federated.wire.check_payload`, and every failure to reach the other sites becomes a
:class:`FederationTimeoutError` within the configured timeout rather than a hang, naming the site that
left when it can be told.

The rendezvous store is unauthenticated: before the handshake (:mod:`neurofed.federated.handshake`) it
carries only a seat claim, each site's number of sites and heartbeats — never a secret, a statistic or a
weight. Site 0's store listens only on ``bind_address`` (default: the configured address, so loopback
stays loopback), and every site's gloo connections listen on that address too.
"""

from __future__ import annotations

import atexit
import logging
import socket
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from neurofed.federated.config import is_loopback
from neurofed.federated.errors import FederationConfigError, FederationTimeoutError
from neurofed.federated.wire import check_payload

__all__ = ["FederationGroup", "FederationTimeoutError", "LocalGroup", "RecordingGroup"]

log = logging.getLogger(__name__)

_PRE = "neurofed/pre"
#: Seconds between heartbeats; a site silent for ``_GONE_AFTER`` heartbeats is named as having left.
_HEARTBEAT_S = 1.0
_GONE_AFTER = 4


def _wire_copy(t: Tensor) -> Tensor:
    """Contiguous CPU copy that the collective may overwrite without touching the caller's tensor."""
    return t.detach().to("cpu").clone().contiguous()


class FederationGroup:
    """Gloo group of ``num_sites`` site leaders rendezvousing at ``address:port`` (site 0 hosts it).

    Results come back as CPU tensors with the dtype that was sent; send float64 for statistics whose sums
    must not lose precision. Before the gloo group forms, every site claims its seat (a second process
    claiming the same seat is refused) and compares its ``num_sites`` with site 0's, so a mismatch fails
    in seconds with both values instead of at the timeout.
    """

    def __init__(self, address: str, port: int, site_rank: int, num_sites: int, timeout_s: float = 300.0,
                 bind_address: str | None = None) -> None:
        if num_sites < 1 or not 0 <= site_rank < num_sites:
            raise ValueError(f"FederationGroup: site_rank {site_rank} is not in [0, num_sites={num_sites})")
        self.address, self.port = address, int(port)
        self.site_rank, self.num_sites = int(site_rank), int(num_sites)
        self.timeout_s = float(timeout_s)
        self.bind_address = bind_address or (address if site_rank == 0 or is_loopback(address) else None)
        self.stage = "joining"  # what the federation is doing, for error messages (the trainer sets "round k")
        self._pg = self._store = None
        self._stop = threading.Event()
        timeout = timedelta(seconds=self.timeout_s)
        log.info("site %d/%d joining the federation at %s:%d", site_rank, num_sites, address, port)
        if self.site_rank != 0:
            self._reach_rendezvous()
        try:
            self._store = dist.TCPStore(
                address, self.port, None, is_master=self.site_rank == 0, timeout=timeout, wait_for_workers=False,
                master_listen_fd=self._listen() if self.site_rank == 0 else None,
            )
            self._claim_seat()
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = [
                dist.ProcessGroupGloo.create_device(hostname=self.bind_address) if self.bind_address
                else dist.ProcessGroupGloo.create_default_device()
            ]
            self._pg = dist.ProcessGroupGloo(dist.PrefixStore("federation", self._store), self.site_rank,
                                             self.num_sites, options)
        except FederationConfigError:
            self.close()
            raise
        except RuntimeError as e:  # DistStoreError / DistNetworkError / gloo errors are RuntimeErrors
            self.close()
            raise self._timeout_error("could not form the federation", e) from e
        self._beat = threading.Thread(target=self._heartbeat, name="neurofed-heartbeat", daemon=True)
        self._beat.start()
        atexit.register(self.close)  # a process that stops on an error still leaves the group cleanly

    # -- before the group: the listening socket, the seat, the size -----------------------------------
    def _listen(self) -> int:
        """Site 0's rendezvous socket, bound to ``bind_address`` only; its file descriptor goes to the store."""
        family = socket.AF_INET6 if ":" in self.bind_address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.bind_address, self.port))
        except OSError as e:
            sock.close()
            raise FederationConfigError(
                f"site 0 cannot listen on {self.bind_address}:{self.port} ({e.strerror}); is another federation "
                "using the port, or is bind_address not an address of this machine?"
            ) from e
        sock.listen(128)
        return sock.detach()  # the store owns the descriptor from now on, and closes it

    def _reach_rendezvous(self) -> None:
        """Wait, at most ``timeout_s``, until site 0's rendezvous accepts a connection.

        torch's store client retries a refused connection with back-off delays that can run past its own
        timeout; probing first keeps "site 0 is not there" within ``timeout_s``.
        """
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                socket.create_connection((self.address, self.port), timeout=1.0).close()
                return
            except OSError as e:
                if time.monotonic() >= deadline:
                    raise FederationTimeoutError(
                        f"site {self.site_rank} of {self.num_sites} could not reach the rendezvous at {self.address}:"
                        f"{self.port} within timeout_s={self.timeout_s:g} s: is site 0 running and listening there? "
                        f"({e.strerror or e})"
                    ) from e
                time.sleep(0.2)

    def _claim_seat(self) -> None:
        store, me = self._store, self.site_rank
        if store.add(f"{_PRE}/seat/{me}", 1) > 1:
            raise FederationConfigError(
                f"seat {me} of the federation at {self.address}:{self.port} is already taken by another process; "
                "check --trainer.federation.site_rank (two sites with the same rank?)"
            )
        store.set(f"{_PRE}/size/{me}", str(self.num_sites))
        store.set(f"{_PRE}/alive/{me}", repr(time.time()))
        others = [0] if me != 0 else list(range(1, self.num_sites))
        for k in others:
            try:
                store.wait([f"{_PRE}/size/{k}"], timedelta(seconds=self.timeout_s))
            except RuntimeError as e:
                raise FederationTimeoutError(
                    f"site {me} of {self.num_sites}: site {k} did not join the federation at {self.address}:"
                    f"{self.port} within timeout_s={self.timeout_s:g} s; is it running, with the same address, "
                    f"port and num_sites? ({str(e).splitlines()[0]})"
                ) from e
            theirs = int(store.get(f"{_PRE}/size/{k}"))
            if theirs != self.num_sites:
                raise FederationConfigError(
                    f"federation settings differ: num_sites is {theirs} at site {k} but {self.num_sites} at site {me}; "
                    "give every site the same --trainer.federation.num_sites"
                )

    def _heartbeat(self) -> None:
        """Write this site's sign of life every second, on its own store connection, until closed."""
        try:
            client = dist.TCPStore(self.address, self.port, None, False, timedelta(seconds=5), False)
            while not self._stop.wait(_HEARTBEAT_S):
                client.set(f"{_PRE}/alive/{self.site_rank}", repr(time.time()))
        except RuntimeError:
            return  # the store is gone: the federation is ending

    def _who_left(self) -> str:
        """Which sites stopped sending heartbeats (no new one for ``_GONE_AFTER`` periods), as a phrase.

        A site that notices a failure says so in the store first, so that a site which stops *because* another
        left is not named as the one that left: survivors stop one after another, and by the time a slower one
        looks, the faster ones are gone too.
        """
        if self.site_rank != 0:
            try:
                probe = dist.TCPStore(self.address, self.port, None, False, timedelta(seconds=3), False)
            except RuntimeError:
                return "site 0 (the rendezvous host) is unreachable: it left the federation"
        else:
            probe = self._store
        try:
            probe.set(f"{_PRE}/noticed/{self.site_rank}", repr(time.time()))
        except RuntimeError:
            return "site 0 (the rendezvous host) is unreachable: it left the federation"
        others = [k for k in range(self.num_sites) if k != self.site_rank]

        def beats() -> dict[int, str | None]:
            out = {}
            for k in others:
                try:
                    out[k] = probe.get(f"{_PRE}/alive/{k}").decode() if probe.check([f"{_PRE}/alive/{k}"]) else None
                except RuntimeError:
                    out[k] = None
            return out

        try:
            before = beats()
            time.sleep(_GONE_AFTER * _HEARTBEAT_S * 0.75)
            after = beats()
            gone = [k for k in others if after[k] is None or after[k] == before[k]]
            followed = [k for k in gone if probe.check([f"{_PRE}/noticed/{k}"])]
        except RuntimeError:
            return "site 0 (the rendezvous host) is unreachable: it left the federation"
        left = [k for k in gone if k not in followed]
        then = f" (then site {', '.join(map(str, followed))} stopped too)" if followed else ""
        if not left:
            return (f"no site left first: site {', '.join(map(str, followed))} stopped after noticing a failure, "
                    "as this one (a network problem between sites?)") if followed else \
                "every other site is still alive (a network problem between sites?)"
        return f"site {', '.join(map(str, left))} left the federation{then}"

    def _timeout_error(self, what: str, cause: BaseException) -> FederationTimeoutError:
        hint = (
            "is site 0 running and listening there?" if self.site_rank != 0
            else "did every other site start, with the same address, port and num_sites?"
        )
        if self._pg is not None:
            hint = f"{self._who_left()} during {self.stage}"
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
        self._stop.set()
        beat = getattr(self, "_beat", None)
        if beat is not None and beat is not threading.current_thread():
            beat.join(timeout=5)  # a heartbeat inside the store client at interpreter exit would abort the process
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
