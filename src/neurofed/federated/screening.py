"""Update screening: a faulty or malicious site cannot poison the round, whatever it sends or claims.

Before aggregation every site shares three numbers: the L2 norm of its update (its parameters minus the
round's global ones), its weight, and whether the update was finite. A site never sends a non-finite
update: it contributes the global parameters with weight 0 instead. Every site then applies the same rules
to the same numbers and leaves out, with weight 0,

* a non-finite update;
* a weight above what the site declared at the handshake (``site_weight`` of its example count);
* an update norm above ``max_update_norm``, when set;
* with at least three contributing sites, an update norm above ``update_norm_factor`` times the median
  norm of the contributing sites.

Each exclusion is logged with the site's name, and the round goes on with the others.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Screened", "screen_update"]

log = logging.getLogger(__name__)

#: Fewest contributing sites for which the median norm is a meaningful reference.
MIN_SITES_FOR_MEDIAN = 3


@dataclass(frozen=True)
class Screened:
    """This site's contribution after screening, and which sites the round leaves out (with reasons)."""

    params: Tensor
    weight: float
    excluded: dict[int, str]


def screen_update(link: Any, params: Tensor, global_params: Tensor, weight: float, declared: list[float],
                  max_norm: float | None, factor: float, round: int, names: list[str]) -> Screened:
    """Apply the rules above; ``declared`` holds every site's maximum weight, ``names`` the sites' names."""
    me = link.federation.site_rank
    update = params.double() - global_params.double()
    finite = bool(torch.isfinite(update).all())
    norm = float(update.norm()) if finite else math.inf
    shared = link.all_gather(torch.tensor([norm if finite else -1.0, weight, float(finite)], dtype=torch.float64),
                             "update_norm")
    norms, weights, finites = ([float(t[i]) for t in shared] for i in range(3))
    excluded: dict[int, str] = {}
    for k in range(len(shared)):
        if weights[k] <= 0:
            continue
        if not finites[k] or not math.isfinite(norms[k]):
            excluded[k] = "its update is not finite (NaN or inf)"
        elif weights[k] > declared[k] + 1e-9:
            excluded[k] = f"it claims weight {weights[k]:g} but declared at most {declared[k]:g}"
        elif max_norm is not None and norms[k] > max_norm:
            excluded[k] = f"its update norm {norms[k]:.4g} exceeds max_update_norm {max_norm:g}"
    contributing = [norms[k] for k in range(len(shared)) if weights[k] > 0 and k not in excluded]
    if len(contributing) >= MIN_SITES_FOR_MEDIAN:
        median = float(torch.tensor(contributing).median())
        for k in range(len(shared)):
            if weights[k] > 0 and k not in excluded and norms[k] > factor * median:
                excluded[k] = f"its update norm {norms[k]:.4g} exceeds {factor:g} x the median {median:.4g}"
    for k, reason in sorted(excluded.items()):
        log.warning("round %d: site %d (%s) left out of the aggregation: %s", round + 1, k,
                    names[k] if k < len(names) else f"site{k}", reason)
    if me in excluded or not finite:
        return Screened(global_params.clone(), 0.0, excluded)
    return Screened(params, weight, excluded)
