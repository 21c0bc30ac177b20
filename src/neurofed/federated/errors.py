"""What can go wrong in a federation, as exception types the command line turns into one line and exit 2.

Every error names what failed and the fix: the seat that failed authentication, the field two sites
disagree on, the site that left and the round, the folder that ran out of space.
"""

from __future__ import annotations

from neurofed.errors import SettingsError

__all__ = [
    "SettingsError", "FederationAggregateError", "FederationAuthError",
    "FederationConfigError", "FederationError", "FederationIntegrityError",
    "FederationMismatchError", "FederationStorageError", "FederationTimeoutError",
]


class FederationError(RuntimeError):
    """Base of every federation failure."""


class FederationConfigError(FederationError, ValueError):
    """A setting that cannot work (a port out of range, no secret off loopback, ...); found before any port opens."""


class FederationTimeoutError(FederationError):
    """The other sites could not be reached, or one of them left, within the timeout."""


class FederationAuthError(FederationError):
    """A seat did not prove knowledge of the federation secret."""


class FederationMismatchError(FederationError):
    """The sites' fingerprints differ: they would not train the same model the same way."""


class FederationIntegrityError(FederationError):
    """After a round, the sites do not hold the same result (a diverging site, or altered traffic)."""


class FederationStorageError(FederationError):
    """A round could not be committed to disk (no space left, say); the last committed round is intact."""


class FederationAggregateError(FederationError):
    """Round after round the new global model failed its checks (it could not be evaluated); the run stops with
    the last committed round intact."""
