"""The federation: site leaders talking to each other, and nothing else.

Inside a site, Fabric owns the default process group (DDP over local GPUs). Across sites, only each
site's leader joins a separate gloo group built on its own TCPStore, so federation traffic never mixes
with the site's DDP traffic and works without GPUs or a shared file system. Every send goes through
:func:`neurofed.federated.wire.check_payload`, and every failure to reach the other sites becomes a
:class:`FederationTimeoutError` within the configured timeout rather than a hang, naming the site that
left when it can be told.

The rendezvous store (torch's TCPStore) has no access control: anyone who reaches its port can list,
read, write and delete keys. So it carries only what the group needs — a seat claim, each site's number of
sites, heartbeats, a mark that a site noticed a failure and gloo's own addresses — never a secret, a
statistic or a weight; and with a federation secret every value is written with an HMAC under it and
checked when read (:class:`AuthenticatedStore`), under a prefix derived from it. A store outsider can then
neither redirect gloo's connections (a moved or altered address fails its check) nor hold a seat (a claim
without a valid tag is not a claim, and a claim whose heartbeat stopped is taken over), although it can
still delete keys: denial of service is what the VPN overlay or a firewall stops. Site 0's store listens
only on ``bind_address`` (default: the configured address, so loopback stays loopback), and every site's
gloo connections listen on that address too.

The store lives in site 0's process, so sites leave in order: each stops its heartbeat and marks itself as
leaving, and site 0 keeps the store up until every other site has left or stopped beating. A peer then never
finds the store gone under a heartbeat (which torch reports with a C++ stack trace).
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import logging
import secrets as _secrets
import socket
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from neurofed.federated.config import is_loopback
from neurofed.federated.errors import FederationConfigError, FederationError, FederationTimeoutError
from neurofed.federated.wire import check_payload

__all__ = ["AuthenticatedStore", "FederationGroup", "FederationTimeoutError", "LocalGroup", "RecordingGroup"]

log = logging.getLogger(__name__)

_TAG_BYTES = 32


class AuthenticatedStore(dist.Store):
    """A store whose values carry ``HMAC(secret, key | value)``: a value written by someone without the secret,
    or moved from another key, fails its check when read (``RuntimeError`` naming the key), never silently used.

    Gloo's rendezvous goes through it too (a Python ``dist.Store`` works as gloo's store), so the addresses
    its connections go to are authenticated.
    """

    def __init__(self, inner: dist.Store, secret: bytes) -> None:
        super().__init__()
        self.inner, self._secret = inner, secret

    def _tag(self, key: str, value: bytes) -> bytes:
        return hmac.new(self._secret, b"store|" + key.encode() + b"|" + value, hashlib.sha256).digest()

    def set(self, key: str, value) -> None:
        value = value if isinstance(value, bytes) else str(value).encode()
        self.inner.set(key, self._tag(key, value) + value)

    def get(self, key: str) -> bytes:
        raw = bytes(self.inner.get(key))
        tag, value = raw[:_TAG_BYTES], raw[_TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(key, value)):
            raise RuntimeError(f"the rendezvous value of {key!r} is not authenticated by the federation secret "
                               "(written or moved by a party without it)")
        return value

    def valid(self, key: str) -> bytes | None:
        """The value of ``key`` if it is present and authenticated, else ``None``."""
        try:
            return self.get(key) if self.inner.check([key]) else None
        except RuntimeError:
            return None

    def add(self, key: str, amount: int) -> int:
        return self.inner.add(key, amount)

    def wait(self, keys, timeout=None) -> None:
        return self.inner.wait(keys) if timeout is None else self.inner.wait(keys, timeout)

    def check(self, keys) -> bool:
        return self.inner.check(keys)

    def compare_set(self, key: str, expected, desired) -> bytes:
        return self.inner.compare_set(key, expected, desired)

    def delete_key(self, key: str) -> bool:
        return self.inner.delete_key(key)

    def num_keys(self) -> int:
        return self.inner.num_keys()

    def set_timeout(self, timeout) -> None:
        self.inner.set_timeout(timeout)


class _OpenStore:
    """The same interface without a secret (loopback simulations): values as written."""

    def __init__(self, inner: dist.Store) -> None:
        self.inner = inner

    def valid(self, key: str) -> bytes | None:
        return bytes(self.inner.get(key)) if self.inner.check([key]) else None

    def __getattr__(self, name):
        return getattr(self.inner, name)


def rendezvous_prefix(secret: bytes | None) -> str:
    """Prefix of every key the federation writes: derived from the secret, so runs under other secrets (or
    none) never read each other's keys."""
    if secret is None:
        return "neurofed/open"
    return "neurofed/" + hmac.new(secret, b"rendezvous prefix", hashlib.sha256).hexdigest()[:16]
#: Seconds between heartbeats; a site silent for ``_GONE_AFTER`` heartbeats is named as having left.
_HEARTBEAT_S = 1.0
_GONE_AFTER = 4
#: Longest that site 0 keeps the rendezvous up for the other sites to leave (also bounded by ``timeout_s``).
_LEAVE_WAIT_S = 60.0


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
                 bind_address: str | None = None, secret: bytes | None = None) -> None:
        if num_sites < 1 or not 0 <= site_rank < num_sites:
            raise ValueError(f"FederationGroup: site_rank {site_rank} is not in [0, num_sites={num_sites})")
        self.address, self.port = address, int(port)
        self.site_rank, self.num_sites = int(site_rank), int(num_sites)
        self.timeout_s = float(timeout_s)
        self.bind_address = bind_address or (address if site_rank == 0 or is_loopback(address) else None)
        self.stage = "joining"  # what the federation is doing, for error messages (the trainer sets "round k")
        self._pg = self._store = None
        self._secret, self._pre = secret, rendezvous_prefix(secret)
        self._claim = _secrets.token_hex(16)  # this process's seat claim
        self._seated = False  # this process holds its seat (and may mark it as leaving)
        self._stop = threading.Event()
        timeout = timedelta(seconds=self.timeout_s)
        log.info("site %d/%d joining the federation at %s:%d", site_rank, num_sites, address, port)
        if self.site_rank != 0:
            self._reach_rendezvous()
        try:
            raw = dist.TCPStore(
                address, self.port, None, is_master=self.site_rank == 0, timeout=timeout, wait_for_workers=False,
                master_listen_fd=self._listen() if self.site_rank == 0 else None,
            )
            self._raw_store = raw
            self._store = self._wrap(raw)
            self._claim_seat()
            self._beat = threading.Thread(target=self._heartbeat, name="neurofed-heartbeat", daemon=True)
            self._beat.start()
            self._wait_for_seats()
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = [
                dist.ProcessGroupGloo.create_device(hostname=self.bind_address) if self.bind_address
                else dist.ProcessGroupGloo.create_default_device()
            ]
            gloo_store = dist.PrefixStore(f"{self._pre}/gloo", raw)
            if self._secret is not None:
                gloo_store = AuthenticatedStore(gloo_store, self._secret)
            self._pg = dist.ProcessGroupGloo(gloo_store, self.site_rank, self.num_sites, options)
        except FederationError:  # already says what went wrong (a taken seat, a site that never joined)
            self.close()
            raise
        except RuntimeError as e:  # DistStoreError / DistNetworkError / gloo errors are RuntimeErrors
            self.close()
            raise self._timeout_error("could not form the federation", e) from e
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

    def _rendezvous_open(self) -> bool:
        """Whether site 0's rendezvous still accepts connections."""
        try:
            socket.create_connection((self.address, self.port), timeout=1.0).close()
            return True
        except OSError:
            return False

    def _wrap(self, store: dist.Store):
        return AuthenticatedStore(store, self._secret) if self._secret is not None else _OpenStore(store)

    def _claim_seat(self) -> None:
        """Take this site's seat: a claim (authenticated under the secret) that no live process holds.

        A value without a valid tag is not a claim and is overwritten; a valid claim whose heartbeat has not
        moved for ``_GONE_AFTER`` periods belonged to a process that left, and is taken over. Only a live
        claim by another holder of the secret refuses this site.
        """
        store, me = self._store, self.site_rank
        seat = f"{self._pre}/seat/{me}"
        holder = store.valid(seat)
        if holder is not None and holder.decode() != self._claim:
            beat = store.valid(f"{self._pre}/alive/{me}")
            time.sleep(_GONE_AFTER * _HEARTBEAT_S)
            if store.valid(f"{self._pre}/alive/{me}") != beat or store.valid(seat) != holder:
                raise FederationConfigError(
                    f"seat {me} of the federation at {self.address}:{self.port} is already taken by another process; "
                    "check --trainer.federation.site_rank (two sites with the same rank?)"
                )
            log.warning("site %d: taking over seat %d, whose holder stopped sending heartbeats", me, me)
        store.set(seat, self._claim)
        self._seated = True
        store.set(f"{self._pre}/size/{me}", str(self.num_sites))
        store.set(f"{self._pre}/alive/{me}", repr(time.time()))

    def _wait_for_seats(self) -> None:
        """Wait, at most ``timeout_s``, until every seat holds an authenticated size; name the sites that never
        joined. The store is polled rather than waited on: a blocking wait that times out makes torch print C++
        warnings, and a polled one can tell which seats are still empty (an outsider's value is not a size).
        """
        store, me = self._store, self.site_rank
        missing = [k for k in range(self.num_sites) if k != me]
        deadline = time.monotonic() + self.timeout_s
        while missing:
            for k in list(missing):
                theirs = store.valid(f"{self._pre}/size/{k}")
                if theirs is None:
                    continue
                if int(theirs) != self.num_sites:
                    raise FederationConfigError(
                        f"federation settings differ: num_sites is {int(theirs)} at site {k} but {self.num_sites} at "
                        f"site {me}; give every site the same --trainer.federation.num_sites"
                    )
                missing.remove(k)
            if missing and time.monotonic() >= deadline:
                raise FederationTimeoutError(
                    f"site {me} of {self.num_sites}: site {', '.join(map(str, missing))} did not join the federation "
                    f"at {self.address}:{self.port} within timeout_s={self.timeout_s:g} s; is it running, with the "
                    "same address, port, num_sites and secret?"
                )
            time.sleep(0.05 if missing else 0)

    def _heartbeat(self) -> None:
        """Write this site's sign of life every second, on its own store connection, until closed."""
        try:
            client = self._wrap(dist.TCPStore(self.address, self.port, None, False, timedelta(seconds=5), False))
            while not self._stop.wait(_HEARTBEAT_S):
                client.set(f"{self._pre}/alive/{self.site_rank}", repr(time.time()))
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
                probe = self._wrap(dist.TCPStore(self.address, self.port, None, False, timedelta(seconds=3), False))
            except RuntimeError:
                return "site 0 (the rendezvous host) is unreachable: it left the federation"
        else:
            probe = self._store
        try:
            probe.set(f"{self._pre}/noticed/{self.site_rank}", repr(time.time()))
        except RuntimeError:
            return "site 0 (the rendezvous host) is unreachable: it left the federation"
        others = [k for k in range(self.num_sites) if k != self.site_rank]

        def beats() -> dict[int, str | None]:
            out = {}
            for k in others:
                try:
                    value = probe.valid(f"{self._pre}/alive/{k}")
                    out[k] = value.decode() if value is not None else None
                except RuntimeError:
                    out[k] = None
            return out

        try:
            before = beats()
            time.sleep(_GONE_AFTER * _HEARTBEAT_S * 0.75)
            after = beats()
            gone = [k for k in others if after[k] is None or after[k] == before[k]]
            followed = [k for k in gone if probe.valid(f"{self._pre}/noticed/{k}") is not None]
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
        """Leave the federation in order (see the module docstring) and release the group; safe to call twice."""
        self._stop.set()
        beat = getattr(self, "_beat", None)
        if beat is not None and beat is not threading.current_thread():
            beat.join(timeout=5)  # a heartbeat inside the store client at interpreter exit would abort the process
        pg, self._pg = getattr(self, "_pg", None), None
        if pg is not None:
            try:
                pg.shutdown()  # a peer still inside a collective with this site fails now, not at its timeout
            except RuntimeError as e:
                log.debug("federation group shutdown: %s", e)
        store, self._store = getattr(self, "_store", None), None
        if store is not None and self._seated:
            self._leave(store)

    def _leave(self, store) -> None:
        """Mark this site as leaving; site 0, whose process holds the store, first waits for the others.

        Site 0 waits until every other site has marked itself as leaving or has sent no heartbeat for
        ``_GONE_AFTER`` periods (crashed, or never joined), at most ``timeout_s`` or ``_LEAVE_WAIT_S``.
        """
        me, pre = self.site_rank, self._pre
        if me != 0 and not self._rendezvous_open():
            return  # site 0 is gone already: writing to its store would only print torch's C++ warnings
        try:
            store.set(f"{pre}/left/{me}", "1")
            if me != 0:
                return
            deadline, told = time.monotonic() + min(self.timeout_s, _LEAVE_WAIT_S), False
            last_beat: dict[int, tuple[bytes | None, float]] = {}
            started = time.monotonic()
            waiting = list(range(1, self.num_sites))
            while waiting and time.monotonic() < deadline:
                now = time.monotonic()
                for k in list(waiting):
                    beat = store.valid(f"{pre}/alive/{k}")
                    if k not in last_beat or beat != last_beat[k][0]:
                        last_beat[k] = (beat, now)
                    silent = beat is None or now - last_beat[k][1] > _GONE_AFTER * _HEARTBEAT_S
                    if silent or store.valid(f"{pre}/left/{k}") is not None:
                        waiting.remove(k)
                if waiting and not told and now > started + 5.0:
                    log.info("site 0: waiting for site %s to leave before closing the rendezvous",
                             ", ".join(map(str, waiting)))
                    told = True
                time.sleep(0.1 if waiting else 0)
        except RuntimeError as e:  # the store itself is gone (site 0 crashed): nothing left to leave
            log.debug("federation store while leaving: %s", e)

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
    """Wraps a group and records ``(kind, dtype, shape)`` of every payload, for auditing the wire, and in
    :attr:`ops` the collective that carried it: ``"sum"`` (only the sum over sites comes back) or ``"gather"``
    / ``"broadcast"`` (every site receives this site's own payload)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.sent: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        self.ops: list[str] = []

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
        self.ops.append("sum")
        return self.inner.all_reduce_sum(t, kind)

    def all_gather(self, t: Tensor, kind: str) -> list[Tensor]:
        self._record(kind, t)
        self.ops.append("gather")
        return self.inner.all_gather(t, kind)

    def broadcast(self, t: Tensor, kind: str, src: int = 0) -> Tensor:
        self._record(kind, t)
        self.ops.append("broadcast")
        return self.inner.broadcast(t, kind, src)

    def barrier(self) -> None:
        self.inner.barrier()

    @property
    def stage(self) -> str:
        return getattr(self.inner, "stage", "")

    @stage.setter
    def stage(self, text: str) -> None:
        if hasattr(self.inner, "stage"):
            self.inner.stage = text

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> RecordingGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
