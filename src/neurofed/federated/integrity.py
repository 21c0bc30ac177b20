"""The round check: nothing is committed unless every site holds the same result, signed by each seat's key.

After aggregation and pooled validation (and after ``validate()`` / ``test()``), each site hashes what the
round produced (the new global vector and the pooled statistics) and sends the hash with its Ed25519
signature of ``session | round | site | hash``. Each site checks every signature against that seat's key
(no other party can make one, not even another member; altered bytes break it) and groups the sites by
hash: a site whose result differs from the majority's is named. Only then is the round written.

What it cannot see: an alteration that gives every site the same wrong sum (a change inside the reduction
itself). Transport integrity between sites is the VPN overlay's job (README, "Deployment").
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

from torch import Tensor

from neurofed.federated.errors import FederationIntegrityError
from neurofed.federated.identity import SiteIdentity, verify
from neurofed.federated.wire import bytes_tensor

__all__ = ["check_round", "round_digest"]


def round_digest(round: int, *tensors: Tensor) -> bytes:
    """SHA-256 over the round number and the exact bytes of ``tensors`` (CPU, contiguous)."""
    h = hashlib.sha256(str(round).encode())
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


def _message(session: bytes, round: int, site: int, digest: bytes) -> bytes:
    return b"round|" + session + f"|{round}|{site}|".encode() + digest


def check_round(group: Any, identity: SiteIdentity, keys: list[bytes], session: bytes, round: int,
                digest: bytes) -> None:
    """Exchange (hash, signature) with every site and raise :class:`FederationIntegrityError` naming any site
    whose signature does not verify with its key or that does not hold the majority's result."""
    me = group.site_rank
    sent = bytes_tensor(digest + identity.sign(_message(session, round, me, digest)))
    received = [bytes(t.tolist()) for t in group.all_gather(sent, "round_mac")]
    forged = [k for k, b in enumerate(received) if not verify(keys[k], _message(session, round, k, b[:32]), b[32:])]
    if forged:
        raise FederationIntegrityError(
            f"site {me}, round {round + 1}: the round check of site(s) {', '.join(map(str, forged))} is not signed by "
            "that seat's key (a hijacked seat, or traffic altered on the way); nothing of this round was written. "
            "Use a VPN overlay between sites and check who holds that seat"
        )
    counts = Counter(b[:32] for b in received)
    if len(counts) > 1:
        majority, top = counts.most_common(1)[0]
        tie = sum(1 for c in counts.values() if c == top) > 1
        odd = [k for k, b in enumerate(received) if tie or b[:32] != majority]
        raise FederationIntegrityError(
            f"site {me}, round {round + 1}: the sites do not hold the same result; site(s) {', '.join(map(str, odd))} "
            f"{'disagree' if tie else 'differ from the others'} (a diverging site, or traffic altered on the way); "
            "nothing of this round was written. Resume with --ckpt_path last once the cause is fixed"
        )
