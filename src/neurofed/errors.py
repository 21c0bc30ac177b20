"""Errors every part of neurofed shares; the command line turns them into one line and exit code 2."""

from __future__ import annotations

__all__ = ["SettingsError"]


class SettingsError(ValueError):
    """A setting that cannot work (rounds 0, batch size 0, ...), refused before any work or port opens."""
