"""Evaluating the global model at every site and pooling the results across the federation.

A site reduces each split to a :class:`~neurofed.metrics.SplitStats` — loss sum, example count, the model's
regression sums and, for models that predict around a ``target_mean`` buffer, the sums of predicting that
training mean for every scan (the baseline a model has to beat). Only those sums and the sites' dataset
names cross; every site builds the same per-site and pooled table from them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import Tensor

from neurofed.federated.batches import after_transfer
from neurofed.federated.integrity import round_digest
from neurofed.federated.results import metrics_file, write_json
from neurofed.federated.wire import bytes_tensor, decode_site_name, encode_site_name
from neurofed.metrics import SplitStats, format_table

if TYPE_CHECKING:
    from neurofed.federated.site import Site
    from neurofed.federated.site_link import SiteLink

__all__ = ["baseline_prediction", "evaluate_federation", "evaluate_split", "evaluation_stage", "federation_table",
           "gather_site_names", "pool_split", "predict_outputs", "split_names"]


def baseline_prediction(model: Any) -> float | None:
    """The training-label mean that ``model`` centres its output on, if it has a ``target_mean`` buffer."""
    value = getattr(model, "target_mean", None)
    return float(value) if isinstance(value, Tensor) else None


def evaluate_split(
    site: Site, loader: Iterable | None, datamodule: Any, step: str, baseline: float | None, dataloader_idx: int = 0,
) -> SplitStats:
    """Run ``<step>`` (``validation_step``/``test_step``) of the site's model over one split, summed over its ranks.

    The sums accumulate on the device and are read back once per split: validation runs every round, and a
    host read per batch would stall the GPU queue each time. The module's epoch hooks run around the split,
    as under Lightning's ``Trainer``.
    """
    wrapped = site.wrapped
    acc: Tensor | None = None
    stage = step.removesuffix("_step")  # "validation" or "test"
    if loader is not None:
        was_training = wrapped.training
        wrapped.eval()
        _call_hook(wrapped, f"on_{stage}_epoch_start")
        with torch.no_grad():
            for i, batch in enumerate(loader):
                batch = after_transfer(datamodule, batch, dataloader_idx)
                out = getattr(wrapped, step)(batch, i)
                row = SplitStats.batch(out["loss"], out["pred"], out["target"], baseline)
                acc = row if acc is None else acc + row
        _call_hook(wrapped, f"on_{stage}_epoch_end")
        wrapped.train(was_training)
    local = acc.cpu() if acc is not None else torch.zeros(SplitStats.WIDTH, dtype=torch.float64)
    summed = site.link.site_sum(local).cpu()  # one collective inside the site for all of the sums
    return SplitStats.from_row(summed, with_baseline=baseline is not None)


def _call_hook(module: Any, name: str) -> None:
    hook = getattr(module, name, None)
    if callable(hook):
        hook()


def pool_split(link: SiteLink, split: SplitStats) -> SplitStats:
    """The sum over sites of a split every site holds (validation during a round); masked under secure
    aggregation (:meth:`SiteLink.sum_statistics`)."""
    loss = torch.cat([link.sum_statistics(split.loss[0:1], "loss_sum"),
                      link.sum_statistics(split.loss[1:2], "example_count")])
    model = link.sum_statistics(split.model, "metric_stats")
    baseline = link.sum_statistics(split.baseline, "metric_stats") if split.baseline is not None else None
    return SplitStats(loss, model, baseline)


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
    link: SiteLink, splits: list[SplitStats], local_names: list[str], site_names: list[str], with_baseline: bool,
) -> dict[str, dict[str, float]]:
    """Per-site (per-split) rows and the pooled row, identical at every site.

    Under secure aggregation the table holds this site's own rows and the pooled row only: the pooled row is
    one masked sum, and no other site's row crosses. Otherwise sites may hold different numbers of splits (a
    pooled centralized site evaluates each root apart): they agree on the counts first, then gather one split at a time, zeros where a site has fewer, so every
    payload stays a handful of numbers. This site's rows are named ``local_names``; another site's rows
    are named after its dataset name (``name/j`` when it holds several splits).
    """
    site_rank = link.federation.site_rank
    if link.masking is not None:  # secure aggregation: no site's own row crosses, only the masked pooled sum
        rows = {name: split.compute() for name, split in zip(local_names, splits)}
        total = SplitStats.from_row(None, with_baseline)
        for split in splits:
            total = total + split
        rows["pooled"] = pool_split(link, total).compute()
        return rows
    counts = [int(t.item()) for t in link.all_gather(torch.tensor([len(splits)], dtype=torch.int64), "control")]
    rows: dict[str, dict[str, float]] = {}
    pooled = SplitStats.from_row(None, with_baseline)
    for j in range(max(counts)):
        mine = splits[j] if j < len(splits) else SplitStats.from_row(None, with_baseline)
        all_loss = link.all_gather(mine.loss, "loss_sum")
        all_model = link.all_gather(mine.model, "metric_stats")
        all_base = link.all_gather(mine.baseline, "metric_stats") if with_baseline else [None] * len(counts)
        for k, n_splits in enumerate(counts):
            if j >= n_splits:
                continue
            name = local_names[j] if k == site_rank else (site_names[k] if n_splits == 1 else f"{site_names[k]}/{j}")
            if name in rows or name == "pooled":
                name = f"{name}@site{k}"  # two sites with one dataset name keep a row each
            theirs = SplitStats(all_loss[k], all_model[k], all_base[k])
            rows[name] = theirs.compute()
            pooled = pooled + theirs
    rows["pooled"] = pooled.compute()
    return rows


def evaluate_federation(
    site: Site, loaders: list[Any], datamodule: Any, step: str, baseline: float | None,
) -> dict[str, dict[str, float]]:
    """Evaluate this site's splits and build the federation's table (what ``validate``/``test`` return).

    The sites' dataset names are gathered first so that every site's table names every row.
    """
    site_names = gather_site_names(site.link, site.name)
    local_names = split_names(site_names[site.federation.site_rank], datamodule, len(loaders))
    splits = [evaluate_split(site, loader, datamodule, step, baseline, j) for j, loader in enumerate(loaders)]
    return federation_table(site.link, splits, local_names, site_names, with_baseline=baseline is not None)


def evaluation_stage(
    site: Site, stage: str, loaders: Any, datamodule: Any, baseline: float | None, run_name: str, step: int,
    fingerprint: dict[str, str],
) -> dict[str, dict[str, float]]:
    """``validate()`` / ``test()`` after the model is loaded: the federation's table, printed, saved and logged.

    The pooled row is checked like a round's result (every site holds the same, signed by each seat's key).
    Site 0's leader prints the table and writes ``<stage>_metrics.json`` in the run folder; every site logs
    ``<stage>/<row>/<metric>`` at ``step`` (the last round, so that the logs' steps stay monotonic).
    """
    site.link.open(fingerprint)  # the handshake, unless this site's fit already ran it
    loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
    step_name = "test_step" if stage == "test" else "validation_step"
    rows = evaluate_federation(site, [site.setup_eval_loader(loader) for loader in loaders], datamodule, step_name,
                               baseline)
    # the round check: every site holds the same pooled result, each signed by its own key (integrity.py)
    pooled = torch.tensor([v for _, v in sorted(rows["pooled"].items())], dtype=torch.float64)
    site.link.check_round(step, round_digest(step, bytes_tensor(stage.encode()), pooled))
    if site.is_global_leader:
        print(f"\n{stage} ({run_name}, {site.federation.num_sites} site(s))\n{format_table(rows)}", flush=True)
        write_json(site.run_dir / metrics_file(stage), rows)
    site.launched().log_dict(
        {f"{stage}/{name}/{key}": value for name, row in rows.items() for key, value in row.items()}, step=step
    )
    for logger in site.loggers:
        logger.save()
    return rows


def predict_outputs(site: Site, loader: Iterable, datamodule: Any) -> list[Any]:
    """``predict_step`` over this site's scans (nothing crosses a site boundary)."""
    outputs = []
    site.wrapped.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            outputs.append(site.wrapped.predict_step(after_transfer(datamodule, batch, 0), i))
    return outputs
