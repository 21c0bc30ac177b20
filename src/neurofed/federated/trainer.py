"""FederatedTrainer: Lightning's ``Trainer`` API, run as a federation of sites on Fabric.

Centralized training is a federation of one site, so federated and centralized numbers come from this one
loop. Two levels of communication:

* inside a site, Fabric owns the default process group (DDP over the site's GPUs, or one CPU process);
* across sites, only the site leader (rank 0 of its site) talks to the other leaders through a
  :class:`~neurofed.federated.group.FederationGroup` (or a ``LocalGroup`` for one site) and then broadcasts
  what it received to the other ranks of its site.

:class:`~neurofed.federated.site_link.SiteLink` carries both levels. Only what :mod:`neurofed.federated.wire`
allows crosses a site boundary: parameters, example counts, loss sums, metric and label sufficient
statistics, small control tensors and the sites' dataset names. :meth:`FederatedTrainer._run_round` reads
top to bottom as one round; local training and evaluation live in their own modules.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from neurofed.federated import state as ckpt
from neurofed.federated.batches import after_transfer, datamodule_loader, num_examples
from neurofed.federated.config import Federation
from neurofed.federated.evaluation import baseline_prediction, evaluate_federation, evaluate_split, pool_split
from neurofed.federated.local_training import LocalTraining, train_locally
from neurofed.federated.params import flatten, load_vector
from neurofed.federated.results import HISTORY_FILE, metrics_file, read_json, write_json
from neurofed.federated.site_runtime import SiteRuntime
from neurofed.federated.strategies import FedAvg, Strategy
from neurofed.metrics import RegressionStats, format_table

__all__ = ["FederatedTrainer"]

log = logging.getLogger(__name__)


class FederatedTrainer(SiteRuntime):
    """Trains a LightningModule across sites, round after round, with the ``fit/validate/test/predict`` API.

    One round: global weights in; local training at the sampled sites; aggregation by the strategy
    (weighted all_reduce, then the same server update at every site, so no server process exists); every
    site validates the new global model; pooled validation loss drives identical early-stopping and
    LR-plateau decisions everywhere; the round checkpoint is written atomically.

    The global leader writes the run's results as JSON next to its checkpoints: ``history.json`` (the
    per-round metrics) after every round, ``validate_metrics.json`` / ``test_metrics.json`` (the per-site
    and pooled table) after ``validate()`` / ``test()``.

    The optimizer lives across rounds (its state is not reset when the global weights are loaded), so a
    federation of one site with ``rounds=R, local_epochs=1`` is bit-identical to ``rounds=1,
    local_epochs=R``: aggregating one site is the identity.

    Args:
        rounds: Number of federated rounds (aggregations).
        local_epochs: Passes over the site's training split per round (ignored when ``local_steps`` is set).
        local_steps: Optimizer steps per round instead of whole epochs (the loader restarts as needed).
        precision: Fabric precision, e.g. ``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``.
        accelerator: Fabric accelerator: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        devices: Devices of this site; more than one runs DDP inside the site.
        strategy: Aggregation rule; default :class:`~neurofed.federated.strategies.FedAvg`.
        sites_per_round: Train only this many sites per round, drawn from ``(seed, round)`` identically at
            every site; ``None`` trains all sites. Unsampled sites send weight 0 but still validate.
        patience: Stop after this many rounds without a lower pooled validation loss; ``None`` never stops.
        lr_plateau_patience: Multiply every learning rate by ``lr_plateau_factor`` after this many rounds
            without improvement; ``None`` keeps the learning rate.
        lr_plateau_factor: Factor of each LR reduction.
        min_lr: Learning rates are never reduced below this.
        federation: Where this site sits in the federation; default: one local site (centralized).
        logger: ``True`` for a CSV logger under ``default_root_dir/run_name/site-<rank>``, ``False`` for
            none, or Lightning logger(s) used as given (e.g. a WandbLogger set up by the CLI).
        default_root_dir: Root folder of all runs' checkpoints and logs.
        run_name: Folder of this run under ``default_root_dir``; default ``"run"``.
        seed: Seed of weight initialisation, data order, augmentation and site sampling.
        enable_progress_bar: Show a progress bar over rounds on the site leader.
        compile: ``torch.compile`` the model before training.
        deterministic: Use deterministic algorithms (on CPU, results are then bit-reproducible).
    """

    def __init__(
        self,
        rounds: int = 10,
        local_epochs: int = 1,
        local_steps: int | None = None,
        precision: str = "32-true",
        accelerator: str = "auto",
        devices: int | str = 1,
        strategy: Strategy | None = None,
        sites_per_round: int | None = None,
        patience: int | None = None,
        lr_plateau_patience: int | None = None,
        lr_plateau_factor: float = 0.5,
        min_lr: float = 1e-6,
        federation: Federation | None = None,
        logger: bool | Logger | list[Logger] = True,
        default_root_dir: str = "checkpoints",
        run_name: str | None = None,
        seed: int = 0,
        enable_progress_bar: bool = True,
        compile: bool = False,
        deterministic: bool = True,
    ) -> None:
        if rounds < 1 or local_epochs < 1 or (local_steps is not None and local_steps < 1):
            raise ValueError(
                f"FederatedTrainer: rounds ({rounds}), local_epochs ({local_epochs}) and local_steps "
                f"({local_steps}) must be >= 1"
            )
        if not 0 < lr_plateau_factor <= 1:
            raise ValueError(f"FederatedTrainer: lr_plateau_factor must be in (0, 1], got {lr_plateau_factor}")
        if sites_per_round is not None and not 1 <= sites_per_round:
            raise ValueError(f"FederatedTrainer: sites_per_round must be >= 1, got {sites_per_round}")
        super().__init__(precision, accelerator, devices, federation, logger, default_root_dir, run_name, seed,
                         compile, deterministic)
        self.rounds = int(rounds)
        self.local_epochs = int(local_epochs)
        self.local_steps = local_steps
        self.strategy = strategy if strategy is not None else FedAvg()
        self.sites_per_round = sites_per_round
        self.patience = patience
        self.lr_plateau_patience = lr_plateau_patience
        self.lr_plateau_factor = float(lr_plateau_factor)
        self.min_lr = float(min_lr)
        self.enable_progress_bar = enable_progress_bar
        self.state = ckpt.RoundState()
        self.history: list[dict[str, float]] = []
        self._history_before_resume: list[dict[str, float]] = []  # rounds run before ``ckpt_path`` was written
        self.global_step = 0
        self.best_model_path: str | None = None
        self.predictions: list[Any] | None = None

    # ------------------------------------------------------------------------------------------------
    # Public API (mirrors lightning.Trainer)
    # ------------------------------------------------------------------------------------------------
    def fit(
        self,
        model: Any,
        datamodule: Any = None,
        train_dataloaders: DataLoader | None = None,
        val_dataloaders: DataLoader | None = None,
        ckpt_path: str | None = None,
    ) -> None:
        """Run the rounds; resume from a round checkpoint with ``ckpt_path="last"`` (or its path)."""
        fabric = self._launch()
        if datamodule is not None:
            self._prepare(datamodule, "fit")
            if train_dataloaders is None:
                train_dataloaders = datamodule_loader(datamodule, "train_dataloader")
            if val_dataloaders is None:
                val_dataloaders = datamodule_loader(datamodule, "val_dataloader")
        if train_dataloaders is None:
            raise ValueError("FederatedTrainer.fit: pass a datamodule or train_dataloaders")
        self.site_name = self._site_name(datamodule)
        n_train = num_examples(train_dataloaders)
        train_loader = fabric.setup_dataloaders(train_dataloaders)
        val_loader = self._setup_eval_loader(val_dataloaders)
        module, optimizer = self._setup_model(model, with_optimizer=True)
        self.link.connect()
        self._log_hyperparams(model)

        self._share_target_mean(model, datamodule)
        self.state = ckpt.RoundState()
        self._history_before_resume = []
        if ckpt_path is not None:
            self._resume(model, optimizer, ckpt_path)
        keys = self.strategy.aggregated_keys(model.state_dict(), model)
        if not keys:
            raise ValueError(f"{self.strategy!r} aggregates no entry of {type(model).__name__}; nothing to federate")
        if ckpt_path is None:
            # One starting point for the federation: site 0's initial weights, whatever each site's seed gave.
            load_vector(model, self.link.broadcast(flatten(model.state_dict(), keys), "parameters"), keys)

        bar = tqdm(
            total=self.rounds, initial=self.state.round, desc=f"{self.site_name} rounds",
            disable=not (self.enable_progress_bar and self.is_site_leader), dynamic_ncols=True,
        )
        try:
            while self.state.round < self.rounds and not self.state.stopped:
                metrics = self._run_round(
                    self.state.round, model, module, optimizer, keys, train_loader, val_loader, datamodule, n_train
                )
                bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("train/loss", "val/loss", "val/mae")})
                bar.update(1)
        finally:
            bar.close()
        if self.state.stopped:
            log.info("%s: early stop after round %d (no improvement for %d rounds)",
                     self.site_name, self.state.round, self.state.rounds_without_improvement)
        for lg in self.loggers:
            lg.finalize("success")

    def validate(
        self, model: Any, datamodule: Any = None, ckpt_path: str | None = None,
        dataloaders: DataLoader | list[DataLoader] | None = None,
    ) -> dict[str, dict[str, float]]:
        """Evaluate on every site's validation split; per-site and pooled metrics."""
        return self._evaluate_federation("validate", model, datamodule, ckpt_path, dataloaders)

    def test(
        self, model: Any, datamodule: Any = None, ckpt_path: str | None = None,
        dataloaders: DataLoader | list[DataLoader] | None = None,
    ) -> dict[str, dict[str, float]]:
        """Evaluate the best (or given) global model on every site's fixed test split.

        ``ckpt_path=None`` uses the best model of a ``fit`` run by this trainer, else the current weights.
        Only sufficient statistics cross sites, and every site gets the per-site table and the pooled row.
        """
        return self._evaluate_federation("test", model, datamodule, ckpt_path, dataloaders)

    def predict(
        self, model: Any, datamodule: Any = None, ckpt_path: str | None = None,
        dataloaders: DataLoader | None = None,
    ) -> list[Any]:
        """Outputs of ``predict_step`` for this site's scans; nothing crosses a site boundary."""
        module, dataloaders = self._setup_stage("predict", model, datamodule, ckpt_path, dataloaders)
        loader = self._setup_eval_loader(dataloaders)
        outputs = []
        module.eval()
        with torch.no_grad():
            for i, batch in enumerate(loader):
                batch = after_transfer(datamodule, batch, 0)
                outputs.append(module.predict_step(batch, i))
        self.predictions = outputs
        return outputs

    # ------------------------------------------------------------------------------------------------
    # One round, top to bottom
    # ------------------------------------------------------------------------------------------------
    def _run_round(
        self, r: int, model: nn.Module, module: Any, optimizer: Any, keys: list[str],
        train_loader: Iterable, val_loader: Iterable | None, datamodule: Any, n_train: int,
    ) -> dict[str, float]:
        link = self.link
        link.bytes_sent = 0

        # (1) Global weights in. After the previous round's aggregation the model already holds them;
        # the aggregated entries are what every site shares, the rest (FedBN's batch norm) stays local.
        global_vec = flatten(model.state_dict(), keys)
        global_params = {k: v.detach().clone() for k, v in model.state_dict().items() if k in set(keys)}

        # (2) Local training, if this site is sampled this round (same draw at every site, no messages).
        t0 = time.perf_counter()
        sampled = self.federation.site_rank in self._sampled_sites(r)
        trained = LocalTraining.skipped()
        if sampled:
            trained = self._local_training(r, model, module, optimizer, train_loader, datamodule, global_params)
        t_train = time.perf_counter() - t0

        # (3) Aggregation: weights are normalised first (so that one site is exactly the identity), then
        # one all_reduce of the flat vector; every site applies the same server update.
        t0 = time.perf_counter()
        weight = self.strategy.site_weight(n_train) if sampled else 0.0
        total_weight = link.all_reduce(torch.tensor([weight], dtype=torch.float64), "example_count").item()
        if total_weight <= 0:
            raise RuntimeError(
                f"round {r}: no site contributed training examples (total weight {total_weight}); "
                "check that every site's training split is non-empty"
            )
        local_vec = flatten(model.state_dict(), keys)
        mean_vec = link.all_reduce(local_vec * (weight / total_weight), "parameters")
        new_global = self.strategy.server_update(global_vec, mean_vec)
        load_vector(model, new_global, keys)
        t_agg = time.perf_counter() - t0

        # (4) Every site validates the new global model; pooled loss and metrics from summed statistics.
        t0 = time.perf_counter()
        site_val = evaluate_split(module, val_loader, datamodule, "validation_step", link, baseline_prediction(model))
        pooled, count = pool_split(link, site_val)
        local = RegressionStats.from_tensor(site_val.stats).compute()
        val_loss = pooled["loss"]
        t_val = time.perf_counter() - t0

        # (5) Identical decisions everywhere: best model, early stopping, LR on plateau.
        st = self.state
        improved, reduce_lr = st.record(r, val_loss, count > 0, self.patience, self.lr_plateau_patience)
        if improved:
            self._save_best(model, r)
        if reduce_lr:
            self._reduce_lr(optimizer)

        # (6) Round checkpoint, written atomically (local file first, then the shared one).
        if self.is_site_leader:
            ckpt.save_round(
                self.run_dir, self.federation.site_rank, state=st,
                global_weights={k: v for k, v in model.state_dict().items() if k in set(keys)},
                strategy_state=self.strategy.state_dict(), sampling=self._sampling_rule(),
                lr=_learning_rates(optimizer), model_state=model.state_dict(),
                optimizer_state=optimizer.state_dict(), global_step=self.global_step,
            )

        metrics = {
            "round": float(r), "train/loss": trained.loss, "train/volumes": float(trained.volumes),
            "val/loss": val_loss, "val/mae": pooled["mae"], "val/r": pooled["r"],
            "val/baseline_mae": pooled.get("baseline_mae", math.nan),
            "val/site_mae": local["mae"], "val/site_r": local["r"], "val/site_n": local["n"],
            "lr": _learning_rates(optimizer)[0], "sampled": float(sampled),
            "time/train_s": t_train, "time/data_wait_s": trained.data_wait_s, "time/aggregate_s": t_agg,
            "time/validate_s": t_val, "bytes_sent": float(link.bytes_sent),
        }
        self.history.append(metrics)
        if self.is_global_leader:
            write_json(self.run_dir / HISTORY_FILE, self._history_before_resume + self.history)
        self._fabric().log_dict(metrics, step=r)
        log.info("%s round %d/%d: %s", self.site_name, r + 1, self.rounds,
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "round"))
        return metrics

    # ------------------------------------------------------------------------------------------------
    # The parts of a round
    # ------------------------------------------------------------------------------------------------
    def _sampled_sites(self, r: int) -> set[int]:
        """Sites that train in round ``r``: a pure function of ``(seed, r)``, identical at every site."""
        n, k = self.federation.num_sites, self.sites_per_round
        if k is None or k >= n:
            return set(range(n))
        return {int(s) for s in np.random.default_rng((self.seed, r)).choice(n, size=k, replace=False)}

    def _sampling_rule(self) -> dict[str, Any]:
        return {"seed": self.seed, "sites_per_round": self.sites_per_round, "num_sites": self.federation.num_sites}

    def _local_training(
        self, r: int, model: nn.Module, module: Any, optimizer: Any, loader: Iterable, datamodule: Any,
        global_params: dict[str, Tensor],
    ) -> LocalTraining:
        """``local_epochs`` (or ``local_steps``) of training at this site.

        Random state is reseeded before every local epoch from (seed, epoch, site, rank), so data order,
        dropout and augmentation do not depend on history: a resumed run repeats an uninterrupted one.
        """
        if self.local_steps is None:
            epoch_keys, kind = range(r * self.local_epochs, (r + 1) * self.local_epochs), 0
        else:
            epoch_keys, kind = itertools.count(r * 1_000_003), 1
        trained = train_locally(
            self._fabric(), model, module, optimizer, loader, datamodule, self.strategy, global_params,
            epoch_keys, self.local_steps, reseed=lambda key: self._reseed(key, kind),
        )
        self.global_step += trained.steps
        return trained

    def _reduce_lr(self, optimizer: Any) -> None:
        """Scale every param group's learning rate by ``lr_plateau_factor``, not below ``min_lr``."""
        for g in optimizer.param_groups:
            if g["lr"] > self.min_lr:
                g["lr"] = max(g["lr"] * self.lr_plateau_factor, self.min_lr)
        self.state.lr_scale *= self.lr_plateau_factor
        log.info("%s: validation loss on a plateau; learning rate now %s", self.site_name, _learning_rates(optimizer))

    def _save_best(self, model: nn.Module, r: int) -> None:
        """Lightning-format ``best.ckpt``; under FedBN it holds this site's batch-norm layers.

        Every site leader writes ``site-<rank>/best.ckpt``; site 0 also writes the run's ``best.ckpt``.
        """
        self.best_model_path = str(ckpt.site_dir(self.run_dir, self.federation.site_rank) / ckpt.BEST_FILE)
        if self.is_site_leader:
            ckpt.save_best(model, self.run_dir, self.federation.site_rank, epoch=r, global_step=self.global_step)

    def _resume(self, model: nn.Module, optimizer: Any, ckpt_path: str) -> None:
        """Restore weights, optimizer, strategy, counters and random state from a round checkpoint."""
        path = self.run_dir / ckpt.ROUND_FILE if ckpt_path == "last" else Path(ckpt_path)
        self.state, self.global_step = ckpt.restore_round(
            path, self.federation.site_rank, model, optimizer, self.strategy, self._sampling_rule()
        )
        best = ckpt.site_dir(path.parent, self.federation.site_rank) / ckpt.BEST_FILE
        self.best_model_path = str(best) if best.is_file() else None
        history = self.run_dir / HISTORY_FILE
        if self.is_global_leader and history.is_file():  # keep the rounds run before the interruption
            self._history_before_resume = [h for h in read_json(history) if h["round"] < self.state.round]
        log.info("%s: resumed from %s after round %d", self.site_name, path, self.state.round)

    def _share_target_mean(self, model: Any, datamodule: Any) -> None:
        """Pooled mean (and SD) of the training labels for models that centre and scale their output on them.

        Only the sum, count and sum of squares of each site's labels cross.
        """
        if not (hasattr(model, "set_target_mean") and hasattr(datamodule, "train_target_stats")):
            return
        stats = [float(v) for v in datamodule.train_target_stats()]
        total = self.link.all_reduce(torch.tensor(stats, dtype=torch.float64), "label_stats").tolist()
        if total[1] <= 0:
            raise RuntimeError("no site has labelled training examples; cannot set the target mean")
        if hasattr(model, "set_target_stats"):
            model.set_target_stats(*model.label_moments(total))
        else:
            model.set_target_mean(total[0] / total[1])

    # ------------------------------------------------------------------------------------------------
    # Evaluation across the federation (validate / test)
    # ------------------------------------------------------------------------------------------------
    def _evaluate_federation(
        self, stage: str, model: Any, datamodule: Any, ckpt_path: str | None, dataloaders: Any
    ) -> dict[str, dict[str, float]]:
        if ckpt_path is None and stage == "test" and self.best_model_path and Path(self.best_model_path).is_file():
            ckpt_path = self.best_model_path
        module, dataloaders = self._setup_stage(stage, model, datamodule, ckpt_path, dataloaders)
        self.site_name = self._site_name(datamodule)
        self.link.connect()
        loaders = list(dataloaders) if isinstance(dataloaders, (list, tuple)) else [dataloaders]
        rows = evaluate_federation(
            self.link, module, [self._setup_eval_loader(loader) for loader in loaders], datamodule,
            "test_step" if stage == "test" else "validation_step", self.site_name, baseline_prediction(model),
        )

        if self.is_global_leader:
            print(f"\n{stage} ({self.run_name}, {self.federation.num_sites} site(s))\n{format_table(rows)}", flush=True)
            write_json(self.run_dir / metrics_file(stage), rows)
        self._fabric().log_dict(
            {f"{stage}/{name}/{key}": value for name, row in rows.items() for key, value in row.items()}
        )
        for lg in self.loggers:
            lg.save()
        return rows

    def _log_hyperparams(self, model: Any) -> None:
        params = {
            "rounds": self.rounds, "local_epochs": self.local_epochs, "local_steps": self.local_steps,
            "precision": self.precision, "devices": str(self.devices), "strategy": repr(self.strategy),
            "sites_per_round": self.sites_per_round, "patience": self.patience,
            "lr_plateau_patience": self.lr_plateau_patience, "num_sites": self.federation.num_sites,
            "site_rank": self.federation.site_rank, "site_name": self.site_name, "seed": self.seed,
            "model": type(model).__name__,
        }
        for lg in self._fabric().loggers:
            lg.log_hyperparams(params)


def _learning_rates(optimizer: Any) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]
