"""The handshake that opens every federation: membership first, then agreement, then the resume round.

1. **Membership** (mutual challenge–response). Each site sends a fresh 32-byte nonce and the address it
   claims; then, for every other site ``j``, ``HMAC-SHA256(secret, "auth" | me | j | nonce_j | nonce_me)``;
   then its verdict on every other site's tags, checked with ``hmac.compare_digest``. A process without the
   secret learns nothing but nonces, tags and verdicts, and every real site names the seat that failed.
   Nothing else — no weight, no label statistic, no site name — is sent before this step passes.
2. **Agreement.** Each site sends a digest of every field of its fingerprint (neurofed version, model class,
   the aggregated parameters' names, shapes and dtypes, strategy and hyperparameters, rounds, local epochs
   or steps, seed, sampling rule, number of sites, precision, screening, whether it resumes). Where digests
   differ, the field's values are exchanged, so every site fails naming the field and each site's value —
   before any collective whose size depends on them could abort gloo.
3. **Resume.** Each site sends the newest round it has committed and the one before it that it still
   holds; the federation resumes from the newest round every site has committed. When some sites committed
   round 1 and others nothing (a stop between the sites' first commits), every site starts round 1 again.

Without a secret (a simulation on loopback, or ``insecure``) the same exchange runs with an empty key: it
still catches sites that disagree, but proves nothing about who they are.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
from dataclasses import dataclass
from typing import Any

import torch

from neurofed.federated.errors import FederationAuthError, FederationMismatchError
from neurofed.federated.wire import bytes_tensor

__all__ = ["HandshakeResult", "handshake", "round_key"]

NONCE_BYTES = 32
ADDRESS_BYTES = 32
TAG_BYTES = 32
#: Fingerprint fields are digested to this many bytes each; the vector has room for ``MAX_FIELDS`` fields.
FIELD_DIGEST_BYTES = 8
MAX_FIELDS = 48
VALUE_BYTES = 120


@dataclass(frozen=True)
class HandshakeResult:
    """What the sites agreed on.

    Attributes:
        session: Hash of every site's nonce: binds this run's round checks to this handshake.
        resume_round: The round every site resumes from (``None`` for a fresh start).
        declared: Every site's declared training-example count (what its weight may never exceed).
    """

    session: bytes
    resume_round: int | None
    declared: list[float]


def _mac(key: bytes, *parts: bytes | int | str) -> bytes:
    msg = b"|".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)
    return hmac.new(key, msg, hashlib.sha256).digest()


def round_key(secret: bytes | None) -> bytes:
    """The HMAC key of the trust layer (empty without a secret: integrity against accidents only)."""
    return secret or b""


def _claimed_address() -> bytes:
    try:
        return socket.gethostname().encode("ascii", "replace")[:ADDRESS_BYTES]
    except OSError:
        return b"?"


def handshake(group: Any, secret: bytes | None, fingerprint: dict[str, str], committed: tuple[int, int] | None,
              declared_examples: float) -> HandshakeResult:
    """Run the three steps above over ``group`` (site leaders only); raises naming the failing seat or field.

    Args:
        group: The cross-site group (``all_gather`` with payload kinds).
        secret: The federation secret, or ``None``.
        fingerprint: Field name → value, identical at every site of a consistent federation.
        committed: (newest committed round, the one before it still held) when resuming, else ``None``.
        declared_examples: This site's number of training examples (0 for evaluation stages).
    """
    me, n, key = group.site_rank, group.num_sites, round_key(secret)

    # 1. Membership: nonces (and claimed addresses), tags, verdicts.
    nonce = secrets.token_bytes(NONCE_BYTES)
    hello = group.all_gather(bytes_tensor(nonce + _claimed_address().ljust(ADDRESS_BYTES, b"\0")), "handshake")
    nonces = [bytes(t[:NONCE_BYTES].tolist()) for t in hello]
    addresses = ["".join(ch if 32 <= ord(ch) < 127 else "?" for ch in bytes(t[NONCE_BYTES:].tolist()).rstrip(b"\0")
                         .decode("latin-1")) for t in hello]  # claimed, unauthenticated: printable characters only
    tags = b"".join(_mac(key, "auth", me, j, nonces[j], nonce) for j in range(n))
    all_tags = group.all_gather(bytes_tensor(tags), "handshake")
    failed = [
        i for i in range(n) if i != me and not hmac.compare_digest(
            bytes(all_tags[i][me * TAG_BYTES:(me + 1) * TAG_BYTES].tolist()), _mac(key, "auth", i, me, nonce, nonces[i]))
    ]
    verdicts = group.all_gather(bytes_tensor(bytes(int(i in failed) for i in range(n))), "handshake")
    if failed:
        seats = ", ".join(f"seat {i} (claims to be {addresses[i]!r})" for i in failed)
        raise FederationAuthError(
            f"site {me}: {seats} failed authentication: it does not hold this federation's secret; the federation "
            "stops before anything else is exchanged. Give every site the same secret_file; if that seat is not "
            "one of your sites, someone else reached the rendezvous port"
        )
    accusers = [k for k, v in enumerate(verdicts) if int(v.sum()) > 0]
    if accusers:
        raise FederationAuthError(
            f"site {me}: site(s) {', '.join(map(str, accusers))} could not verify this site's secret; "
            "give every site the same secret_file"
        )
    session = hashlib.sha256(b"".join(nonces)).digest()

    # 2. Agreement on the fingerprint: digests first, values only where they differ.
    names = sorted(fingerprint)
    fields = {"fingerprint fields": ",".join(names), **fingerprint}
    ordered = ["fingerprint fields", *names][:MAX_FIELDS]
    digests = b"".join(hashlib.sha256(str(fields[f]).encode()).digest()[:FIELD_DIGEST_BYTES] for f in ordered)
    theirs = group.all_gather(bytes_tensor(digests, MAX_FIELDS * FIELD_DIGEST_BYTES), "handshake")
    rows = [bytes(t.tolist()) for t in theirs]
    size = FIELD_DIGEST_BYTES
    differing = [i for i in range(len(ordered)) if len({r[i * size:(i + 1) * size] for r in rows}) > 1]
    if differing:
        # Every site sees every digest, so all pick the same field and exchange the same values. When the field
        # lists differ (another neurofed version, say), the other indices are not comparable: report the list.
        field = ordered[0 if 0 in differing else differing[0]]
        values = group.all_gather(bytes_tensor(str(fields[field]).encode("utf-8", "replace"), VALUE_BYTES), "handshake")
        shown = "; ".join(f"site {k}: {bytes(v.tolist()).rstrip(bytes(1)).decode('utf-8', 'replace')}"
                          for k, v in enumerate(values))
        raise FederationMismatchError(
            f"site {me}: the sites disagree on {field!r} ({shown}); start every site with the same settings "
            "and the same neurofed version"
        )

    # 3. Resume round, and each site's declared example count.
    mine = committed if committed is not None else (-1, -1)
    held = group.all_gather(torch.tensor([*mine, int(declared_examples)], dtype=torch.int64), "control")
    declared = [float(t[2]) for t in held]
    if committed is None:
        return HandshakeResult(session, None, declared)
    newest = [int(t[0]) for t in held]
    if max(newest) < 0:
        raise FederationMismatchError(
            f"site {me}: nothing to resume: no site has committed a round of this run; start it without --ckpt_path"
        )
    agreed = min(newest)
    if agreed < 0 and max(newest) <= 1:
        # Killed between the sites' commits of round 1: some sites hold it, others nothing. Round 1 is cheap to
        # repeat, so every site starts it again (resume round 0: the fresh start, same seed, same weights).
        return HandshakeResult(session, 0, declared)
    lacking = [k for k, t in enumerate(held) if agreed not in (int(t[0]), int(t[1]))]
    if lacking or agreed < 0:
        detail = ", ".join(f"site {k} holds {_rounds_held(int(t[0]), int(t[1]))}" for k, t in enumerate(held))
        raise FederationMismatchError(
            f"site {me}: no round is committed at every site ({detail}), so the run cannot be resumed; start it "
            "over at every site with --trainer.overwrite true"
        )
    return HandshakeResult(session, agreed, declared)


def _rounds_held(newest: int, previous: int) -> str:
    if newest < 0:
        return "no committed round"
    return f"rounds {previous} and {newest}" if previous >= 0 else f"round {newest}"
