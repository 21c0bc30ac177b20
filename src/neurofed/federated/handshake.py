"""The handshake that opens every federation: membership first, then agreement, then the resume round.

Every site holds its own Ed25519 key (:mod:`~neurofed.federated.identity`); with a roster, seat ``k``'s
key is the roster's key for ``k``.

1. **Membership.** Each site sends a fresh 32-byte nonce, a commitment ``SHA-256(coin)`` to a fresh random
   coin and its public key; then its signature over everything sent in this step (and the roster's digest).
   Every site checks every signature against the roster's key for that seat, exchanges its verdicts, and a
   seat that fails is named with its roster name. Nothing else — no weight, no statistic, no site name — is
   sent before this step passes, and a signature made in another session (other nonces) never verifies.
2. **Agreement.** Each site sends a digest of every field of its fingerprint (neurofed version, model, the
   aggregated parameters, strategy, rounds, seed, sampling, roster, ...). Where digests differ, the field's
   values are exchanged, so every site fails naming the field and each site's value.
3. **Resume and coins.** Each site sends the newest round it has committed and the one before it that it
   still holds, its declared example count (``-1`` under secure aggregation: not revealed) and its coin. The
   federation resumes from the newest round every site has committed; when some sites committed round 1 and
   others nothing (a stop between the sites' first commits), every site starts round 1 again.
4. **Transcript.** Each site signs the hash of every message of steps 1–3, in order, as it received them;
   every site checks every signature. A relay that changed a byte of any step (a declared count, a committed
   round, a fingerprint digest) is refused here, naming the seat whose transcript differs. The session is
   that hash: the round checks and secure-aggregation keys are signed under it.

The coins, checked against their commitments, give a random value that no site chose alone (it committed
before it saw the others'): secure aggregation draws its random mask partners from it.

``seats`` maps the group's ranks to roster seats, so the same handshake runs again at a round boundary for
a group of the sites present.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any

from neurofed.federated.errors import FederationAuthError, FederationMismatchError
from neurofed.federated.identity import PUBLIC_BYTES, SIGNATURE_BYTES, Roster, SiteIdentity, verify
from neurofed.federated.wire import bytes_tensor

__all__ = ["HandshakeResult", "handshake", "signed_exchange"]

NONCE_BYTES = 32
COIN_BYTES = 32
HELLO_BYTES = NONCE_BYTES + 32 + PUBLIC_BYTES
#: Fingerprint fields are digested to this many bytes each; the vector has room for ``MAX_FIELDS`` fields.
FIELD_DIGEST_BYTES = 8
MAX_FIELDS = 48
VALUE_BYTES = 120
_TAIL = struct.Struct("<qqd")  # newest committed round, the one before it, declared example count


@dataclass(frozen=True)
class HandshakeResult:
    """What the sites agreed on.

    Attributes:
        session: Hash of the whole signed transcript: binds this run's round checks and keys to it.
        resume_round: The round every site resumes from (``None`` for a fresh start).
        declared: Every site's declared training-example count (``-1`` where not revealed).
        public_keys: Every seat's Ed25519 public key, in group order (roster keys when there is a roster).
        names: Every seat's roster name (``site<k>`` without a roster).
        coin: 32 random bytes no single site chose (from the committed coins).
    """

    session: bytes
    resume_round: int | None
    declared: list[float]
    public_keys: list[bytes] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    coin: bytes = b""


def _bytes(t: Any) -> bytes:
    return bytes(t.tolist())


def signed_exchange(group: Any, identity: SiteIdentity, keys: list[bytes], message: bytes, what: str,
                    names: list[str]) -> None:
    """Every site signs ``message`` (the same bytes at every honest site) and checks every other's signature.

    Verdicts are exchanged too, so a site whose own signature failed elsewhere learns it. Raises
    :class:`FederationAuthError` naming the seats that failed.
    """
    me, n = group.site_rank, group.num_sites
    signatures = group.all_gather(bytes_tensor(identity.sign(message)), "handshake")
    failed = [i for i in range(n) if i != me and not verify(keys[i], message, _bytes(signatures[i]))]
    verdicts = group.all_gather(bytes_tensor(bytes(int(i in failed) for i in range(n))), "handshake")
    if failed:
        seats = ", ".join(f"seat {i} ({names[i]})" for i in failed)
        raise FederationAuthError(
            f"site {me}: {seats} failed authentication: its signature over {what} does not verify with the "
            "roster's key for that seat (another party in the seat, a relay that altered the exchange, or a key "
            "that is not the roster's); the federation stops before anything else is exchanged"
        )
    accusers = [k for k, v in enumerate(verdicts) if int(v[me]) > 0]
    if accusers:
        raise FederationAuthError(
            f"site {me}: site(s) {', '.join(map(str, accusers))} could not verify this site's signature over {what}; "
            "check that this site's key_file is the one the roster lists for its seat"
        )


def handshake(group: Any, identity: SiteIdentity, roster: Roster | None, fingerprint: dict[str, str],
              committed: tuple[int, int] | None, declared_examples: float | None,
              seats: list[int] | None = None) -> HandshakeResult:
    """Run the four steps above over ``group`` (site leaders only); raises naming the failing seat or field.

    Args:
        group: The cross-site group (``all_gather`` with payload kinds).
        identity: This site's key (its roster key, or an ephemeral one without a roster).
        roster: The federation's roster, or ``None`` (keys are then taken as sent: no identity is proven).
        fingerprint: Field name → value, identical at every site of a consistent federation.
        committed: (newest committed round, the one before it still held) when resuming, else ``None``.
        declared_examples: This site's number of training examples, or ``None`` to not reveal it.
        seats: Roster seat of each group rank (default: the group rank itself).
    """
    me, n = group.site_rank, group.num_sites
    seats = list(range(n)) if seats is None else list(seats)
    names = [roster.name(s) if roster is not None else f"site{s}" for s in seats]
    roster_digest = roster.digest.encode() if roster is not None else b"no roster"
    transcript = hashlib.sha256(b"neurofed handshake v2|" + roster_digest + f"|{seats}".encode())

    # 1. Membership: nonce, coin commitment and key; a signature over all of them.
    nonce, coin = secrets.token_bytes(NONCE_BYTES), secrets.token_bytes(COIN_BYTES)
    hellos = [_bytes(t) for t in group.all_gather(
        bytes_tensor(nonce + hashlib.sha256(coin).digest() + identity.public), "handshake")]
    keys = [h[-PUBLIC_BYTES:] for h in hellos]
    if roster is not None:
        keys = [roster.key(s) for s in seats]  # what a seat sent is checked by its signature, never trusted
    for h in hellos:
        transcript.update(h)
    try:
        signed_exchange(group, identity, keys, transcript.copy().digest(), "the membership step", names)
    finally:  # the exchange ran to its end, so every other site names this seat too
        if roster is not None and identity.public != keys[me]:
            raise FederationAuthError(f"site {me}: this site's key ({identity.source}) is not the one the roster "
                                      f"({roster.source}) lists for seat {seats[me]} ({names[me]}); use that seat's "
                                      "key_file, or fix the roster")

    # 2. Agreement on the fingerprint: digests first, values only where they differ.
    fingerprint = {**fingerprint, "roster": roster.digest[:16] if roster is not None else "none"}
    ordered_names = sorted(fingerprint)
    fields = {"fingerprint fields": ",".join(ordered_names), **fingerprint}
    ordered = ["fingerprint fields", *ordered_names][:MAX_FIELDS]
    digests = b"".join(hashlib.sha256(str(fields[f]).encode()).digest()[:FIELD_DIGEST_BYTES] for f in ordered)
    rows = [_bytes(t) for t in group.all_gather(bytes_tensor(digests, MAX_FIELDS * FIELD_DIGEST_BYTES), "handshake")]
    size = FIELD_DIGEST_BYTES
    differing = [i for i in range(len(ordered)) if len({r[i * size:(i + 1) * size] for r in rows}) > 1]
    if differing:
        # Every site sees every digest, so all pick the same field and exchange the same values. When the field
        # lists differ (another neurofed version, say), the other indices are not comparable: report the list.
        name = ordered[0 if 0 in differing else differing[0]]
        values = group.all_gather(bytes_tensor(str(fields[name]).encode("utf-8", "replace"), VALUE_BYTES), "handshake")
        shown = "; ".join(f"site {k}: {_bytes(v).rstrip(bytes(1)).decode('utf-8', 'replace')}"
                          for k, v in enumerate(values))
        raise FederationMismatchError(
            f"site {me}: the sites disagree on {name!r} ({shown}); start every site with the same settings "
            "and the same neurofed version"
        )
    for r in rows:
        transcript.update(r)

    # 3. Resume round, declared example count and the coin behind the commitment.
    mine = committed if committed is not None else (-1, -1)
    tail = _TAIL.pack(int(mine[0]), int(mine[1]), -1.0 if declared_examples is None else float(declared_examples))
    tails = [_bytes(t) for t in group.all_gather(bytes_tensor(tail + coin), "handshake")]
    for t in tails:
        transcript.update(t)

    # 4. The whole transcript, signed: nothing of steps 1-3 can have been altered on the way.
    session = transcript.digest()
    signed_exchange(group, identity, keys, b"transcript|" + session, "the handshake transcript", names)
    held = [_TAIL.unpack(t[:_TAIL.size]) for t in tails]
    coins = [t[_TAIL.size:] for t in tails]
    cheated = [i for i in range(n) if not hmac.compare_digest(hashlib.sha256(coins[i]).digest(),
                                                              hellos[i][NONCE_BYTES:NONCE_BYTES + 32])]
    if cheated:
        raise FederationAuthError(f"site {me}: seat(s) {', '.join(map(str, cheated))} revealed a coin that is not "
                                  "the one it committed to; the federation stops")
    coin_all = hashlib.sha256(b"".join(coins)).digest()
    declared = [float(h[2]) for h in held]
    result = dict(session=session, declared=declared, public_keys=keys, names=names, coin=coin_all)
    if committed is None:
        return HandshakeResult(resume_round=None, **result)
    newest = [int(h[0]) for h in held]
    if max(newest) < 0:
        raise FederationMismatchError(
            f"site {me}: nothing to resume: no site has committed a round of this run; start it without --ckpt_path"
        )
    agreed = min(newest)
    if agreed < 0 and max(newest) <= 1:
        # Killed between the sites' commits of round 1: some sites hold it, others nothing. Round 1 is cheap to
        # repeat, so every site starts it again (resume round 0: the fresh start, same seed, same weights).
        return HandshakeResult(resume_round=0, **result)
    lacking = [k for k, h in enumerate(held) if agreed not in (int(h[0]), int(h[1]))]
    if lacking or agreed < 0:
        detail = ", ".join(f"site {k} holds {_rounds_held(int(h[0]), int(h[1]))}" for k, h in enumerate(held))
        raise FederationMismatchError(
            f"site {me}: no round is committed at every site ({detail}), so the run cannot be resumed; start it "
            "over at every site with --trainer.overwrite true"
        )
    return HandshakeResult(resume_round=agreed, **result)


def _rounds_held(newest: int, previous: int) -> str:
    if newest < 0:
        return "no committed round"
    return f"rounds {previous} and {newest}" if previous >= 0 else f"round {newest}"
