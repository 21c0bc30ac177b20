"""Synthetic multi-site BIDS cohorts (healthy ageing and MS) built from the MNI152 template.

The site profiles load at once; the generator and the summary (which import torch for the metrics) when first
used, so that ``neurofed synth --help`` stays instant.
"""

from __future__ import annotations

import importlib
from typing import Any

from neurofed.data.synth.sites import DEFAULT_SITES, SITES, SiteProfile, get_site

_LAZY = {"generate_site": "neurofed.data.synth.generate", "read_tsv": "neurofed.data.synth.summary",
         "summarize_site": "neurofed.data.synth.summary"}

__all__ = ["DEFAULT_SITES", "SITES", "SiteProfile", "generate_site", "get_site", "read_tsv",
           "summarize_site"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'neurofed.data.synth' has no attribute {name!r}")
