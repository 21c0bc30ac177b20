"""Synthetic multi-site BIDS cohorts (healthy ageing and MS) built from the MNI152 template."""

from neurofed.data.synth.generate import generate_site
from neurofed.data.synth.sites import DEFAULT_SITES, SITES, SiteProfile, get_site
from neurofed.data.synth.summary import read_tsv, summarize_site

__all__ = ["DEFAULT_SITES", "SITES", "SiteProfile", "generate_site", "get_site", "read_tsv",
           "summarize_site"]
