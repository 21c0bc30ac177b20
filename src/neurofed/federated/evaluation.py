"""Evaluating the global model at every site and pooling the results across the federation.

A site reduces each split to a few sums: loss sum, example count, the model's
:class:`~neurofed.metrics.RegressionStats` and, for models that predict around a ``target_mean`` buffer, the
statistics of predicting that training mean for every scan (the baseline a model has to beat). Only those
sums and the sites' dataset names cross; every site builds the same per-site and pooled table from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from neurofed.federated.batches import after_transfer
from neurofed.federated.site_link import SiteLink
from neurofed.federated.wire import decode_site_name, encode_site_name
from neurofed.metrics import RegressionStats

__all__ = ["SplitSums", "baseline_prediction", "evaluate_federation", "evaluate_split", "federation_table",
           "gather_site_names", "pool_split", "row", "split_names"]

_N_STATS = len(RegressionStats.FIELDS)


@dataclass(frozen=True)
class SplitSums:
    """One split's sums at one site, over all of the site's ranks (float64 CPU tensors).

    ``baseline`` holds the RegressionStats of the constant prediction ``target_mean``; ``None`` for a
    model without one.
    """

    loss_sum: Tensor
    count: Tensor
    stats: Tensor
    baseline: Tensor | None

    @classmethod
    def empty(cls, with_baseline: bool) -> SplitSums:
        """Zeros, sent by a site for a split it does not hold so that every site sends the same messages."""
        zeros = torch.zeros(_N_STATS, dtype=torch.float64)
        one = torch.zeros(1, dtype=torch.float64)
        return cls(one, one.clone(), zeros, zeros.clone() if with_baseline else None)


def baseline_prediction(model: Any) -> float | None:
    """The training-label mean that ``model`` centres its output on, if it has a ``target_mean`` buffer."""
    value = getattr(model, "target_mean", None)
    return float(value) if isinstance(value, Tensor) else None


def evaluate_split(
    module: Any, loader: Iterable | None, datamodule: Any, step: str, link: SiteLink,
    baseline: float | None, dataloader_idx: int = 0,
) -> SplitSums:
    """Run ``module.<step>`` over one split and reduce it to sums over this site's ranks.

    The sums accumulate on the device and are read back once per split: validation runs every round, and a
    host read per batch would stall the GPU queue each time.
    """
    width = 2 + 2 * _N_STATS
    acc: Tensor | None = None
    stage = step.removesuffix("_step")  # "validation" or "test": the epoch hooks Lightning's Trainer calls
    if loader is not None:
        was_training = module.training
        module.eval()
        _call_hook(module, f"on_{stage}_epoch_start")
        with torch.no_grad():
            for i, batch in enumerate(loader):
                batch = after_transfer(datamodule, batch, dataloader_idx)
                out = getattr(module, step)(batch, i)
                pred, target = out["pred"], out["target"]
                n = torch.full((1,), float(target.numel()), dtype=torch.float64, device=pred.device)
                parts = [out["loss"].detach().double().reshape(1) * n, n,
                         RegressionStats.tensor_from_predictions(pred, target)]
                if baseline is not None:
                    constant = torch.full_like(pred, baseline)
                    parts.append(RegressionStats.tensor_from_predictions(constant, target))
                else:
                    parts.append(torch.zeros(_N_STATS, dtype=torch.float64, device=pred.device))
                row_t = torch.cat(parts)
                acc = row_t if acc is None else acc + row_t
        _call_hook(module, f"on_{stage}_epoch_end")
        module.train(was_training)
    local = acc.cpu() if acc is not None else torch.zeros(width, dtype=torch.float64)
    summed = link.site_sum(local).cpu()  # one collective inside the site for all of the sums
    return SplitSums(
        loss_sum=summed[0:1], count=summed[1:2], stats=summed[2 : 2 + _N_STATS],
        baseline=summed[2 + _N_STATS :] if baseline is not None else None,
    )


def _call_hook(module: Any, name: str) -> None:
    """Call a LightningModule epoch hook if the model has one, so its epoch state starts and ends with the split."""
    hook = getattr(module, name, None)
    if callable(hook):
        hook()


def row(stats: RegressionStats, loss: Tensor, baseline: RegressionStats | None = None) -> dict[str, float]:
    """One table row: the metrics of ``stats``, the mean loss from ``[loss_sum, count]`` and the baseline MAE."""
    out = stats.compute()
    out["loss"] = float(loss[0] / loss[1]) if float(loss[1]) > 0 else math.nan
    if baseline is not None:
        out["baseline_mae"] = baseline.compute()["mae"]
    return out


def pool_split(link: SiteLink, sums: SplitSums) -> tuple[dict[str, float], float]:
    """The pooled row of one split held by every site (validation during a round), and its example count."""
    loss = torch.cat([link.all_reduce(sums.loss_sum, "loss_sum"), link.all_reduce(sums.count, "example_count")])
    stats = RegressionStats.from_tensor(link.all_reduce(sums.stats, "metric_stats"))
    baseline = None
    if sums.baseline is not None:
        baseline = RegressionStats.from_tensor(link.all_reduce(sums.baseline, "metric_stats"))
    return row(stats, loss, baseline), float(loss[1])


def gather_site_names(link: SiteLink, name: str) -> list[str]:
    """Every site's dataset name, in site order (``site<k>`` where a site sent none)."""
    gathered = link.all_gather(encode_site_name(name), "site_name")
    return [decode_site_name(t) or f"site{k}" for k, t in enumerate(gathered)]


def split_names(site_name: str, datamodule: Any, n_splits: int) -> list[str]:
    """Row names of this site's splits: its name, or one per pooled root from ``datamodule.site_names``."""
    roots = list(getattr(datamodule, "site_names", None) or [])
    if n_splits == 1:
        return [site_name]
    return [str(x) for x in roots] if len(roots) == n_splits else [f"{site_name}/{j}" for j in range(n_splits)]


def federation_table(
    link: SiteLink, splits: list[SplitSums], local_names: list[str], site_names: list[str], with_baseline: bool,
) -> dict[str, dict[str, float]]:
    """Per-site (per-split) rows and the pooled row, identical at every site.

    Sites may hold different numbers of splits (a pooled centralized site evaluates each root apart): they
    agree on the counts first, then gather one split at a time, zeros where a site has fewer, so every
    payload stays a handful of numbers. This site's rows are named ``local_names``; another site's rows
    are named after its dataset name (``name/j`` when it holds several splits).
    """
    site_rank = link.federation.site_rank
    counts = [int(t.item()) for t in link.all_gather(torch.tensor([len(splits)], dtype=torch.int64), "control")]
    rows: dict[str, dict[str, float]] = {}
    pooled_stats, pooled_base, pooled_loss = RegressionStats(), RegressionStats(), torch.zeros(2, dtype=torch.float64)
    for j in range(max(counts)):
        mine = splits[j] if j < len(splits) else SplitSums.empty(with_baseline)
        all_loss = link.all_gather(torch.cat([mine.loss_sum, mine.count]), "loss_sum")
        all_stats = link.all_gather(mine.stats, "metric_stats")
        all_base = link.all_gather(mine.baseline, "metric_stats") if with_baseline else [None] * len(counts)
        for k, n_splits in enumerate(counts):
            if j >= n_splits:
                continue
            name = local_names[j] if k == site_rank else (site_names[k] if n_splits == 1 else f"{site_names[k]}/{j}")
            if name in rows or name == "pooled":
                name = f"{name}@site{k}"  # two sites with one dataset name keep a row each
            stats = RegressionStats.from_tensor(all_stats[k])
            base = RegressionStats.from_tensor(all_base[k]) if with_baseline else None
            rows[name] = row(stats, all_loss[k], base)
            pooled_stats, pooled_loss = pooled_stats + stats, pooled_loss + all_loss[k]
            if base is not None:
                pooled_base = pooled_base + base
    rows["pooled"] = row(pooled_stats, pooled_loss, pooled_base if with_baseline else None)
    return rows


def evaluate_federation(
    link: SiteLink, module: Any, loaders: list[Any], datamodule: Any, step: str, site_name: str,
    baseline: float | None,
) -> dict[str, dict[str, float]]:
    """Evaluate this site's splits and build the federation's table (what ``validate``/``test`` return).

    Every site calls it with its own loaders; the sites' dataset names are gathered first so that every
    site's table names every row.
    """
    site_names = gather_site_names(link, site_name)
    local_names = split_names(site_names[link.federation.site_rank], datamodule, len(loaders))
    splits = [evaluate_split(module, loader, datamodule, step, link, baseline, j) for j, loader in enumerate(loaders)]
    return federation_table(link, splits, local_names, site_names, with_baseline=baseline is not None)
