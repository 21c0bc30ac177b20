"""Update screening: a faulty or hostile site's update is left out of the round before it reaches the rule.

Every site shares a few numbers about its update (its parameters minus the round's global ones): the L2
norm of the whole update and of its trained weights alone, its weight, whether it was finite, the smallest
and largest ratio of its BatchNorm running variances to the global ones, and the cosine between its weight
update and the other sites' updates. The cosine needs
one extra all_reduce, of each site's *unit* weight update: a site's reference is the sum of the other
sites' unit vectors, so one large hostile update cannot drag the honest sites' reference along with it. A
site never sends a non-finite update: it contributes the global parameters with weight 0 instead. Every
site then applies the same rules to the same numbers and leaves out, with weight 0,

* a non-finite update;
* a weight above what the site declared at the handshake (``site_weight`` of its example count);
* an update norm above ``max_update_norm``, when set;
* a BatchNorm running variance at or below zero: an honest site's running variance is an average of batch
  variances, so only an update that extrapolates (``global + factor × (local − global)``) produces one;
* a BatchNorm running variance more than ``max_variance_ratio`` times the global one, or less than its
  inverse: local training moves the running statistics only part of the way from the global ones;
* with at least three contributing sites, an update norm above ``update_norm_factor`` times their median, for
  the whole update or for its weights alone (BatchNorm statistics can dominate the whole norm, so that a
  change of the weights alone hides in it);
* with at least three contributing sites, a weight update whose cosine to the others' is below
  ``min_update_cosine`` (a flipped or unrelated direction).

The thresholds are the trust layer's settings (:class:`~neurofed.federated.config.Federation`); their
defaults come from the measured distribution of honest updates (``benchmarks/poisoned_site.py``). Each
exclusion is logged with the site's name and the reason, and the round goes on with the others.

Under secure aggregation nothing individual crosses in the clear, so screening does not run at all (the
trainer calls it only while no masks are attached): a site's numbers about its own hidden update could not be
checked by anyone, and the masked sum's range check and the aggregate checks
(:mod:`~neurofed.federated.aggregate_checks`) take its place. Under DP-FedAvg without masks the cosine is not
computed (its all_reduce would expose partial sums of single sites' directions); the norms, weights and the
BatchNorm check remain.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from neurofed.federated.vector_layout import VectorLayout

__all__ = ["Screened", "UpdateStats", "individual_updates_hidden", "screen_update"]

log = logging.getLogger(__name__)

#: Fewest contributing sites for which the median norm and the others' direction are meaningful references.
MIN_SITES_FOR_MEDIAN = 3


@dataclass(frozen=True)
class UpdateStats:
    """What every site knows about one site's update in a round (NaN where not computed).

    Attributes:
        norm: L2 norm of the whole update (``-1`` when it was not finite).
        weight_norm: L2 norm of the update of the trained weights alone.
        weight: The weight the site claims.
        finite: Whether the update was finite.
        cosine: Cosine between its weight update and the sum of the other sites' unit weight updates.
        variance_ratio_min: Smallest ratio of a sent BatchNorm running variance to the global one.
        variance_ratio_max: Largest such ratio.
    """

    norm: float
    weight_norm: float
    weight: float
    finite: bool
    cosine: float
    variance_ratio_min: float
    variance_ratio_max: float


@dataclass(frozen=True)
class Screened:
    """This site's contribution after screening, every site's statistics, and which sites are left out (why)."""

    params: Tensor
    weight: float
    excluded: dict[int, str]
    stats: list[UpdateStats]


def individual_updates_hidden(strategy: Any) -> bool:
    """True when ``strategy`` (or a rule it wraps) promises that no single site's update is revealed:
    secure aggregation and DP-FedAvg."""
    from neurofed.federated.strategies import DPFedAvg, SecureAggregation

    while strategy is not None:
        if isinstance(strategy, (SecureAggregation, DPFedAvg)):
            return True
        strategy = getattr(strategy, "inner", None)
    return False


def _variance_ratios(sent: Tensor, global_params: Tensor, layout: VectorLayout) -> tuple[float, float]:
    if not layout.variances:
        return math.nan, math.nan
    ratio = layout.variance_values(sent) / layout.variance_values(global_params).clamp_min(1e-30)
    return float(ratio.min()), float(ratio.max())


def _cosine_to_others(link: Any, update: Tensor, contributes: bool, layout: VectorLayout) -> float:
    """Cosine between this site's weight update and the sum of the other contributing sites' unit updates."""
    mine = layout.weight_values(update)
    norm = float(mine.norm())
    unit = mine / norm if contributes and norm > 0 else torch.zeros_like(mine)
    others = link.all_reduce(unit.float(), "update_direction").double() - unit
    scale = norm * float(others.norm())
    return float(mine @ others) / scale if scale > 0 else math.nan


def screen_update(link: Any, params: Tensor, global_params: Tensor, weight: float, declared: list[float],
                  round: int, names: list[str], layout: VectorLayout, directions: bool = True) -> Screened:
    """Apply the rules above with the thresholds of ``link.federation``.

    Args:
        link: This site's :class:`~neurofed.federated.site_link.SiteLink`.
        params: What this site sends (after ``client_update``); ``global_params``: the round's global vector.
        weight: This site's weight (0 when it did not train this round).
        declared: Every site's maximum weight, from the handshake.
        round: The round (0-based), for the log.
        names: The sites' dataset names, for the log.
        layout: Where the weights and BatchNorm variances are in the vectors.
        directions: Compare update directions (off when individual updates must stay hidden).
    """
    fed = link.federation
    update = params.double() - global_params.double()
    finite = bool(torch.isfinite(update).all())
    norm = float(update.norm()) if finite else math.inf
    cosine = _cosine_to_others(link, update if finite else torch.zeros_like(update), finite and weight > 0,
                               layout) if directions and fed.num_sites >= MIN_SITES_FOR_MEDIAN else math.nan
    low, high = _variance_ratios(params.double(), global_params.double(), layout) if finite else (math.nan,) * 2
    weight_norm = float(layout.weight_values(update).norm()) if finite else -1.0
    shared = link.all_gather(torch.tensor([norm if finite else -1.0, weight_norm, weight, float(finite), cosine, low,
                                           high], dtype=torch.float64), "update_norm")
    stats = [UpdateStats(float(t[0]), float(t[1]), float(t[2]), bool(t[3]), float(t[4]), float(t[5]), float(t[6]))
             for t in shared]
    excluded = _exclusions(stats, declared, fed)
    for k, reason in sorted(excluded.items()):
        log.warning("round %d: site %d (%s) left out of the aggregation: %s", round + 1, k,
                    names[k] if k < len(names) else f"site{k}", reason)
    me = fed.site_rank
    if me in excluded or not finite:
        return Screened(global_params.clone(), 0.0, excluded, stats)
    return Screened(params, weight, excluded, stats)


def _exclusions(stats: list[UpdateStats], declared: list[float], fed: Any) -> dict[int, str]:
    """Site → reason, for every contributing site a rule leaves out (identical at every site)."""
    excluded: dict[int, str] = {}
    for k, s in enumerate(stats):
        if s.weight <= 0:
            continue
        if not s.finite or not math.isfinite(s.norm):
            excluded[k] = "its update is not finite (NaN or inf)"
        elif s.weight > declared[k] + 1e-9:
            excluded[k] = f"it claims weight {s.weight:g} but declared at most {declared[k]:g}"
        elif fed.max_update_norm is not None and s.norm > fed.max_update_norm:
            excluded[k] = f"its update norm {s.norm:.4g} exceeds max_update_norm {fed.max_update_norm:g}"
        elif s.variance_ratio_min <= 0:
            excluded[k] = "it sends a BatchNorm running variance at or below zero (an extrapolated update)"
        elif fed.max_variance_ratio is not None and math.isfinite(s.variance_ratio_min) and not (
                1 / fed.max_variance_ratio <= s.variance_ratio_min and s.variance_ratio_max <= fed.max_variance_ratio):
            excluded[k] = (f"its BatchNorm running variances are {s.variance_ratio_min:.3g} to {s.variance_ratio_max:.3g}"
                           f" times the global ones, outside 1/{fed.max_variance_ratio:g} to {fed.max_variance_ratio:g}")
    contributing = [k for k, s in enumerate(stats) if s.weight > 0 and k not in excluded]
    if len(contributing) < MIN_SITES_FOR_MEDIAN:
        return excluded
    median = float(torch.tensor([stats[k].norm for k in contributing]).median())
    weights_median = float(torch.tensor([stats[k].weight_norm for k in contributing]).median())
    factor = fed.update_norm_factor
    for k in contributing:
        s = stats[k]
        if s.norm > factor * median:
            excluded[k] = f"its update norm {s.norm:.4g} exceeds {factor:g} x the median {median:.4g}"
        elif s.weight_norm > factor * weights_median:
            excluded[k] = (f"the norm of its weights' update {s.weight_norm:.4g} exceeds {factor:g} x the median "
                           f"{weights_median:.4g}")
        elif fed.min_update_cosine is not None and s.cosine < fed.min_update_cosine:
            excluded[k] = (f"its update points away from the other sites' (cosine {s.cosine:.3f} < min_update_cosine "
                           f"{fed.min_update_cosine:g})")
    return excluded
