"""Who each site is: its own Ed25519 key, and a roster of every site's public key.

A shared secret proves that a party is *a* member, not *which* one: any holder can compute every seat's
messages. So each site holds its own Ed25519 private key (``neurofed federation keygen``), and the
federation shares a **roster** — one line per seat, ``RANK NAME ed25519 PUBLIC_KEY`` — distributed out of
band like SSH's ``known_hosts`` (``neurofed federation roster``). The roster's digest is part of the
fingerprint; the handshake transcript, every round check and every secure-aggregation key are signed, and
each signature is checked against the roster's key for that seat, so a site cannot act for another.

Without a roster (a simulation on loopback, or ``insecure``) each process makes a throw-away key: the same
signatures then catch accidents (altered or mixed-up messages), but prove nothing about who signed.

The private key never leaves its file and process: never logged, sent, saved in a config or checkpoint. A
key file readable by anyone but its owner is refused.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from neurofed.federated.errors import FederationConfigError

__all__ = ["PUBLIC_BYTES", "SIGNATURE_BYTES", "Roster", "RosterEntry", "SiteIdentity", "refuse_loose_permissions",
           "verify"]

PUBLIC_BYTES = 32
SIGNATURE_BYTES = 64


def refuse_loose_permissions(path: Path, what: str) -> None:
    """One-line refusal of a secret file that its group or others may read (``chmod 600`` fixes it)."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise FederationConfigError(
            f"{what} {path} is readable by others (mode {stat.S_IMODE(mode):o}); make it private with `chmod 600 {path}`"
        )


def verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public``'s Ed25519 signature of ``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public)).verify(bytes(signature), bytes(message))
        return True
    except (InvalidSignature, ValueError):
        return False


class SiteIdentity:
    """This site's Ed25519 key pair; only :attr:`public` and signatures leave the process."""

    def __init__(self, private: Ed25519PrivateKey, source: str) -> None:
        self._private = private
        self.source = source  # the key file, or "ephemeral"
        self.public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def ephemeral(cls) -> SiteIdentity:
        """A throw-away key for a federation without a roster (it proves nothing about who signs)."""
        return cls(Ed25519PrivateKey.generate(), "ephemeral")

    @classmethod
    def load(cls, path: str | os.PathLike) -> SiteIdentity:
        """The key written by :meth:`write` (PEM, PKCS#8); refuses a missing, foreign or loosely protected file."""
        path = Path(path)
        if not path.is_file():
            raise FederationConfigError(f"key_file {path} does not exist; make one with `neurofed federation keygen "
                                        f"--name SITE --out {path}`")
        refuse_loose_permissions(path, "key_file")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as e:
            raise FederationConfigError(f"key_file {path} is not a PEM private key ({e}); make one with "
                                        "`neurofed federation keygen`") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise FederationConfigError(f"key_file {path} holds a {type(key).__name__}, not an Ed25519 key; make one "
                                        "with `neurofed federation keygen`")
        return cls(key, str(path))

    def write(self, path: str | os.PathLike) -> None:
        """Write the private key to ``path`` (created with mode 600; an existing file is never overwritten)."""
        pem = self._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(bytes(message))

    def __repr__(self) -> str:  # never show the private key
        return f"SiteIdentity(public={self.public.hex()[:16]}…, from {self.source})"


@dataclass(frozen=True)
class RosterEntry:
    """One seat of the roster: its rank, the site's name and its Ed25519 public key."""

    rank: int
    name: str
    public: bytes

    def line(self) -> str:
        return f"{self.rank} {self.name} ed25519 {base64.b64encode(self.public).decode()}"


class Roster:
    """Every seat's name and public key, in rank order (``RANK NAME ed25519 BASE64`` lines; ``#`` comments).

    Args:
        entries: One per seat, ranks 0..n−1.
        source: Where it was read from, for error messages.
    """

    def __init__(self, entries: list[RosterEntry], source: str = "roster") -> None:
        ranks = [e.rank for e in entries]
        if sorted(ranks) != list(range(len(entries))):
            raise FederationConfigError(f"{source}: the ranks are {sorted(ranks)}, not 0..{len(entries) - 1}; give "
                                        "every seat exactly one line")
        keys = [e.public for e in entries]
        if len(set(keys)) != len(keys):
            raise FederationConfigError(f"{source}: two seats have the same public key; each site needs its own "
                                        "`neurofed federation keygen`")
        self.entries = sorted(entries, key=lambda e: e.rank)
        self.source = source

    @classmethod
    def parse(cls, text: str, source: str = "roster") -> Roster:
        entries = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            try:
                if len(parts) != 4 or parts[2] != "ed25519":
                    raise ValueError("expected `RANK NAME ed25519 PUBLIC_KEY`")
                public = base64.b64decode(parts[3], validate=True)
                if len(public) != PUBLIC_BYTES:
                    raise ValueError(f"the key has {len(public)} bytes, not {PUBLIC_BYTES}")
                entries.append(RosterEntry(int(parts[0]), parts[1], public))
            except ValueError as e:
                raise FederationConfigError(f"{source}, line {number}: {e} (got {raw.strip()!r}); write the roster "
                                            "with `neurofed federation roster`") from e
        if not entries:
            raise FederationConfigError(f"{source} lists no site; write it with `neurofed federation roster`")
        return cls(entries, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Roster:
        path = Path(path)
        if not path.is_file():
            raise FederationConfigError(f"roster_file {path} does not exist; write it with `neurofed federation roster`")
        return cls.parse(path.read_text(encoding="utf-8"), str(path))

    def text(self) -> str:
        return "".join(e.line() + "\n" for e in self.entries)

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical roster text: equal at every site holding the same roster."""
        return hashlib.sha256(self.text().encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.entries)

    def key(self, rank: int) -> bytes:
        return self.entries[rank].public

    def name(self, rank: int) -> str:
        return self.entries[rank].name
