"""The pooled mean and SD of the training labels, for models that centre and scale their output on them.

Why before the first round: an L1 head starts at the label mean (and scale), and a model trained at one site
must not start from another site's mean; every site gets the same pooled numbers. Only each site's label
sum, count and sum of squares cross (payload kind ``label_stats``), masked under secure aggregation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from neurofed.federated.site_link import SiteLink

__all__ = ["share_target_stats"]


def share_target_stats(link: SiteLink, model: Any, datamodule: Any) -> None:
    """Set ``model``'s target mean (and SD) from every site's ``datamodule.train_target_stats()``.

    Does nothing for a model without ``set_target_mean`` or a datamodule without ``train_target_stats``.
    """
    if not (hasattr(model, "set_target_mean") and hasattr(datamodule, "train_target_stats")):
        return
    stats = [float(v) for v in datamodule.train_target_stats()]
    total = link.sum_statistics(torch.tensor(stats, dtype=torch.float64), "label_stats").tolist()
    if total[1] <= 0:
        raise RuntimeError("no site has labelled training examples; cannot set the target mean")
    if hasattr(model, "set_target_stats"):
        model.set_target_stats(*model.label_moments(total))
    else:
        model.set_target_mean(total[0] / total[1])
