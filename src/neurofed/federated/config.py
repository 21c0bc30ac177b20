"""Small, typed settings of a federation, so LightningCLI and YAML can describe them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Federation"]


@dataclass
class Federation:
    """Where this site sits in the federation and how to reach the others.

    Args:
        address: Host of site 0, which hosts the rendezvous store (``127.0.0.1`` for a simulation).
        port: TCP port of that store; every site uses the same one.
        site_rank: This site's index, ``0 <= site_rank < num_sites``.
        num_sites: Number of sites. ``1`` means centralized training: no network is used at all.
        timeout_s: Seconds to wait for the other sites before failing with a clear error.
    """

    address: str = "127.0.0.1"
    port: int = 29510
    site_rank: int = 0
    num_sites: int = 1
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.num_sites < 1 or not 0 <= self.site_rank < self.num_sites:
            raise ValueError(
                f"Federation: site_rank={self.site_rank} must be in [0, num_sites={self.num_sites}); "
                "set --trainer.federation.site_rank and --trainer.federation.num_sites consistently"
            )
        if self.timeout_s <= 0:
            raise ValueError(f"Federation: timeout_s must be > 0, got {self.timeout_s}")
