"""Small, typed settings of a federation, so LightningCLI and YAML can describe them."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurofed.federated.errors import FederationConfigError

__all__ = ["SECRET_ENV", "Federation", "is_loopback"]


def is_loopback(host: str) -> bool:
    """True for a loopback address (``127.0.0.1``, ``::1``) or ``localhost``."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

#: Environment variable holding the federation secret when no ``secret_file`` is set.
SECRET_ENV = "NEUROFED_FEDERATION_SECRET"

#: A secret shorter than this is refused (``openssl rand -hex 32`` gives 64 characters, 32 random bytes).
MIN_SECRET_BYTES = 32


@dataclass
class Federation:
    """Where this site sits in the federation, how to reach the others and how much to trust them.

    Args:
        address: Host of site 0, which hosts the rendezvous store (``127.0.0.1`` for a simulation).
        port: TCP port of that store (1–65535); every site uses the same one.
        site_rank: This site's index, ``0 <= site_rank < num_sites``.
        num_sites: Number of sites. ``1`` means centralized training: no network is used at all.
        timeout_s: Seconds to wait for the other sites before failing with a clear error (at least 1).
        bind_address: Local address the rendezvous (site 0) and this site's gloo connections listen on;
            default: ``address`` at site 0, so loopback stays loopback.
        key_file: This site's Ed25519 private key (``neurofed federation keygen``; mode 600). Every message
            of the handshake and every round check is signed with it.
        roster_file: The federation's roster, one ``RANK NAME ed25519 PUBLIC_KEY`` line per seat
            (``neurofed federation roster``), the same file at every site, distributed out of band.
        secret_file: File holding the federation secret (at least 32 bytes, e.g. ``openssl rand -hex 32``;
            mode 600). Without it the secret is read from ``$NEUROFED_FEDERATION_SECRET``. It keeps outsiders
            out of the rendezvous store (every value in it is authenticated under the secret), and is never
            logged, saved or sent.
        insecure: Allow a federation without authentication (secret, key and roster) that is reachable
            from other machines (a warning at every site).
        max_update_norm: Leave out of a round any site whose update (parameters minus the round's global
            ones) has a larger L2 norm; ``None``: no absolute bound. This and the other screening settings
            below do not apply under secure aggregation, where no site's numbers cross in the clear.
        update_norm_factor: With at least three sites, also leave out a site whose update norm exceeds this
            multiple of the median norm of the round's sites.
        min_update_cosine: With at least three sites, also leave out a site whose weight update has a lower
            cosine to the other sites' updates (a flipped or unrelated direction); ``None``: no direction check.
            Not applied under DP-FedAvg either, which hides single sites' updates.
        max_variance_ratio: Leave out a site that sends a BatchNorm running variance more than this multiple
            of the global one, or less than its inverse; ``None``: only variances at or below zero are refused.
            The defaults of ``update_norm_factor``, ``min_update_cosine`` and ``max_variance_ratio`` are the
            extremes of honest updates measured by ``benchmarks/poisoned_site.py`` with a margin
            (``docs/robustness.md``).
        max_failed_rounds: Stop the run (exit code 2) after this many rounds in a row whose aggregate failed
            its checks (a non-finite parameter, a BatchNorm variance at or below zero, a non-finite pooled
            validation loss); such a round is never committed and the sites keep the previous global model.
    """

    address: str = "127.0.0.1"
    port: int = 29510
    site_rank: int = 0
    num_sites: int = 1
    timeout_s: float = 300.0
    bind_address: str | None = None
    key_file: str | None = None
    roster_file: str | None = None
    secret_file: str | None = None
    insecure: bool = False
    max_update_norm: float | None = None
    update_norm_factor: float = 6.5
    min_update_cosine: float | None = -0.9
    max_variance_ratio: float | None = 2.9
    max_failed_rounds: int = 3

    def __post_init__(self) -> None:
        if self.num_sites < 1 or not 0 <= self.site_rank < self.num_sites:
            raise FederationConfigError(
                f"Federation: site_rank={self.site_rank} must be in [0, num_sites={self.num_sites}); "
                "set --trainer.federation.site_rank and --trainer.federation.num_sites consistently"
            )
        if not 1 <= int(self.port) <= 65535:
            raise FederationConfigError(f"Federation: port must be in 1..65535, got {self.port}")
        if not self.timeout_s >= 1:
            raise FederationConfigError(f"Federation: timeout_s must be at least 1 second, got {self.timeout_s}")
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise FederationConfigError(f"Federation: max_update_norm must be > 0, got {self.max_update_norm}")
        if not self.update_norm_factor > 1:
            raise FederationConfigError(f"Federation: update_norm_factor must be > 1, got {self.update_norm_factor}")
        if self.min_update_cosine is not None and not -1 <= self.min_update_cosine < 1:
            raise FederationConfigError(
                f"Federation: min_update_cosine must be in [-1, 1) or null, got {self.min_update_cosine}"
            )
        if self.max_variance_ratio is not None and not self.max_variance_ratio > 1:
            raise FederationConfigError(
                f"Federation: max_variance_ratio must be > 1 or null, got {self.max_variance_ratio}"
            )
        if self.max_failed_rounds < 1:
            raise FederationConfigError(f"Federation: max_failed_rounds must be >= 1, got {self.max_failed_rounds}")
        if self.secret_file is not None and not Path(self.secret_file).is_file():
            raise FederationConfigError(
                f"Federation: secret_file {self.secret_file} does not exist; create it on every site with the "
                f"same content (e.g. `neurofed federation secret --out {self.secret_file}`)"
            )
        if (self.key_file is None) != (self.roster_file is None):
            raise FederationConfigError(
                "Federation: key_file and roster_file go together (this site's key, and every site's public key); "
                f"got key_file={self.key_file!r}, roster_file={self.roster_file!r}"
            )

    @property
    def on_loopback(self) -> bool:
        """True when every site is on this machine (a simulation): the address and the address this site
        listens on are loopback addresses. ``bind_address 0.0.0.0`` exposes a loopback address: not loopback."""
        return is_loopback(self.address) and (self.bind_address is None or is_loopback(self.bind_address))

    def load_secret(self) -> bytes | None:
        """The secret's bytes (``secret_file``, else ``$NEUROFED_FEDERATION_SECRET``), or ``None`` if neither.

        Kept out of every dataclass field on purpose, so the secret never reaches a saved config, a
        checkpoint's hyperparameters or a logger. A file readable by others, or a secret under 32 bytes, is
        refused in one line.
        """
        from neurofed.federated.identity import refuse_loose_permissions

        if self.secret_file is not None:
            refuse_loose_permissions(Path(self.secret_file), "secret_file")
            secret = Path(self.secret_file).read_bytes().strip()
            where = f"secret_file {self.secret_file}"
        elif os.environ.get(SECRET_ENV):
            secret = os.environ[SECRET_ENV].encode("utf-8").strip()
            where = f"${SECRET_ENV}"
        else:
            return None
        if len(secret) < MIN_SECRET_BYTES:
            raise FederationConfigError(
                f"Federation: the secret in {where} has {len(secret)} bytes; use at least {MIN_SECRET_BYTES} random "
                "bytes (`neurofed federation secret --out FILE`, or `openssl rand -hex 32`)"
            )
        return secret

    def load_identity(self) -> tuple[Any, Any]:
        """(this site's :class:`~neurofed.federated.identity.SiteIdentity`, the roster) from ``key_file`` and
        ``roster_file``; a throw-away key and no roster when they are not set."""
        from neurofed.federated.identity import Roster, SiteIdentity

        if self.key_file is None:
            return SiteIdentity.ephemeral(), None
        roster = Roster.load(self.roster_file)
        if len(roster) != self.num_sites:
            raise FederationConfigError(f"Federation: roster_file {self.roster_file} lists {len(roster)} sites but "
                                        f"num_sites is {self.num_sites}; give every site the same roster")
        return SiteIdentity.load(self.key_file), roster

    def require_secret_or_loopback(self) -> bytes | None:
        """The secret, or ``None`` where running without one is allowed (one site, loopback, ``insecure``).

        A federation reachable from other machines needs all three: the secret (rendezvous), and this site's
        key and the roster (identity); ``insecure: true`` runs without, with a warning at every site.
        """
        secret = self.load_secret()
        if self.num_sites > 1 and not self.on_loopback and not self.insecure:
            missing = [name for name, value in (("secret_file (or $" + SECRET_ENV + ")", secret),
                                                ("key_file", self.key_file), ("roster_file", self.roster_file))
                       if value is None]
            if missing:
                exposed = (f"listens on {self.bind_address}" if self.bind_address and not is_loopback(self.bind_address)
                           else f"is at {self.address}")
                raise FederationConfigError(
                    f"Federation: the federation {exposed}, reachable from other machines, but {', '.join(missing)} "
                    "is not set; set --trainer.federation.secret_file, key_file and roster_file at every site "
                    "(`neurofed federation keygen / roster / secret`), or --trainer.federation.insecure true to "
                    "run unauthenticated"
                )
        return secret
