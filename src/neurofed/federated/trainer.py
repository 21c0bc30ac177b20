"""FederatedTrainer: Lightning's ``Trainer`` API, run as a federation of sites on Fabric.

Centralized training is a federation of one site, so federated and centralized numbers come from this one
loop. Two levels of communication:

* inside a site, Fabric owns the default process group (DDP over the site's GPUs and nodes, or one CPU
  process);
* across sites, only the site leader (global rank 0 of its site) talks to the other leaders, then
  broadcasts what it received to the other ranks of its site.

The trainer *has* a :class:`~neurofed.federated.site.Site` (Fabric, link, loggers, model, optimizer). A
round reads top to bottom in :meth:`FederatedTrainer._run_round`; the strategy owns aggregation, local
training and evaluation live in their own modules, and callbacks observe every step.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from neurofed.federated import state as ckpt
from neurofed.federated.batches import after_transfer, datamodule_loader, num_examples
from neurofed.federated.collectives import Collectives
from neurofed.federated.config import Federation
from neurofed.federated.evaluation import (
    baseline_prediction,
    evaluate_federation,
    evaluate_split,
    pool_split,
)
from neurofed.federated.local_training import (
    LocalTraining,
    passes_per_round,
    train_locally,
)
from neurofed.federated.params import flatten, load_vector
from neurofed.federated.results import HISTORY_FILE, metrics_file, read_json, write_json
from neurofed.federated.site import Site, build_loggers
from neurofed.federated.strategies import Contribution, FedAvg, RoundContext, Strategy
from neurofed.metrics import format_table

__all__ = ["FederatedTrainer"]

log = logging.getLogger(__name__)


class FederatedTrainer:
    """Trains a LightningModule across sites, round after round, with the ``fit/validate/test/predict`` API.

    One round: global weights in; local training at the sampled sites; aggregation by the strategy (no
    server process: every site runs the same rule on the same numbers); every site validates the new global
    model; the pooled validation loss drives identical early-stopping and LR-plateau decisions everywhere;
    the round checkpoint is written atomically.

    The global leader writes the run's results as JSON next to its checkpoints: ``history.json`` (the
    per-round metrics, rounds numbered from 1) after every round, ``validate_metrics.json`` /
    ``test_metrics.json`` (the per-site and pooled table) after ``validate()`` / ``test()``. Loggers get each
    round's metrics at ``step = round``: the site's own under ``train/site/*`` and ``val/site/*``, the
    federation's under ``val/pooled/*``.

    The optimizer lives across rounds (its state is not reset when the global weights are loaded), so a
    federation of one site with ``rounds=R, local_epochs=1`` is bit-identical to ``rounds=1,
    local_epochs=R``: aggregating one site is the identity.

    Args:
        rounds: Number of federated rounds (aggregations).
        local_epochs: Passes over the site's training split per round (ignored when ``local_steps`` is set).
        local_steps: Optimizer steps per round instead of whole epochs (the loader restarts as needed).
        precision: Fabric precision, e.g. ``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``.
        accelerator: Fabric accelerator: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        devices: Devices per node of this site; more than one runs DDP inside the site.
        num_nodes: Machines this site runs on (each launched by ``torchrun`` or SLURM); only the site's global
            rank 0 joins the federation.
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
        callbacks: Objects with round hooks (:class:`~neurofed.federated.callbacks.Callback`).
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
        num_nodes: int = 1,
        strategy: Strategy | None = None,
        sites_per_round: int | None = None,
        patience: int | None = None,
        lr_plateau_patience: int | None = None,
        lr_plateau_factor: float = 0.5,
        min_lr: float = 1e-6,
        federation: Federation | None = None,
        logger: bool | Logger | list[Logger] = True,
        callbacks: list[Any] | None = None,
        default_root_dir: str = "checkpoints",
        run_name: str | None = None,
        seed: int = 0,
        enable_progress_bar: bool = True,
        compile: bool = False,
        deterministic: bool = True,
    ) -> None:
        if rounds < 1 or local_epochs < 1 or (local_steps is not None and local_steps < 1) or num_nodes < 1:
            raise ValueError(
                f"FederatedTrainer: rounds ({rounds}), local_epochs ({local_epochs}), local_steps "
                f"({local_steps}) and num_nodes ({num_nodes}) must be >= 1"
            )
        if not 0 < lr_plateau_factor <= 1:
            raise ValueError(f"FederatedTrainer: lr_plateau_factor must be in (0, 1], got {lr_plateau_factor}")
        if sites_per_round is not None and not 1 <= sites_per_round:
            raise ValueError(f"FederatedTrainer: sites_per_round must be >= 1, got {sites_per_round}")
        if lr_plateau_patience is not None and lr_plateau_patience < 1:
            raise ValueError(f"FederatedTrainer: lr_plateau_patience must be >= 1, got {lr_plateau_patience}")
        self.rounds = int(rounds)
        self.local_epochs = int(local_epochs)
        self.local_steps = local_steps
        self.precision = precision
        self.devices = devices
        self.strategy = strategy if strategy is not None else FedAvg()
        self.sites_per_round = sites_per_round
        self.patience = patience
        self.lr_plateau_patience = lr_plateau_patience
        self.lr_plateau_factor = float(lr_plateau_factor)
        self.min_lr = float(min_lr)
        self.federation = federation if federation is not None else Federation()
        self.default_root_dir = default_root_dir
        self.run_name = run_name or "run"
        self.seed = int(seed)
        self.enable_progress_bar = enable_progress_bar
        self.site = Site(
            self.federation, self.run_dir, seed=self.seed, precision=precision, accelerator=accelerator,
            devices=devices, num_nodes=num_nodes, loggers=build_loggers(logger, self.run_dir, self.federation.site_rank),
            callbacks=callbacks or [], compile=compile, deterministic=deterministic,
        )
        self.state = ckpt.RoundState()
        self.history: list[dict[str, float]] = []
        self._history_before_resume: list[dict[str, float]] = []  # rounds run before ``ckpt_path`` was written
        self.global_step = 0
        self.best_model_path: str | None = None
        self.predictions: list[Any] | None = None
        self._plateau: ReduceLROnPlateau | None = None

    # ------------------------------------------------------------------------------------------------
    # Where things are (the site holds them)
    # ------------------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        """Folder of this run: ``default_root_dir/run_name``."""
        return Path(self.default_root_dir) / self.run_name

    @property
    def fabric(self) -> Any:
        return self.site.fabric

    @property
    def loggers(self) -> list[Logger]:
        return self.site.loggers

    @property
    def site_name(self) -> str:
        return self.site.name

    @property
    def is_site_leader(self) -> bool:
        return self.site.is_leader

    @property
    def is_global_leader(self) -> bool:
        return self.site.is_global_leader

    @property
    def group(self) -> Any:
        """The cross-site group (see :attr:`Site.group`); assign one before ``fit`` to audit the wire."""
        return self.site.group

    @group.setter
    def group(self, value: Any) -> None:
        self.site.group = value

    def close(self) -> None:
        """Leave the federation (the group is kept across fit/validate/test until then)."""
        self.site.close()

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
        site = self.site
        fabric = site.launch()
        train_dataloaders = site.stage_loaders("fit", datamodule, train_dataloaders)
        if val_dataloaders is None and datamodule is not None:
            val_dataloaders = datamodule_loader(datamodule, "val_dataloader")
        n_train = num_examples(train_dataloaders)
        train_loader = fabric.setup_dataloaders(train_dataloaders)
        val_loader = site.setup_eval_loader(val_dataloaders)
        site.setup(model, with_optimizer=True)
        site.link.connect()
        self._log_hyperparams(model)

        self._share_target_mean(model, datamodule)
        self.state = ckpt.RoundState()
        self._plateau = self._plateau_scheduler()
        self._history_before_resume = []
        if ckpt_path is not None:
            self._resume(ckpt_path)
        keys = self.strategy.aggregated_keys(model.state_dict(), model)
        if not keys:
            raise ValueError(f"{self.strategy!r} aggregates no entry of {type(model).__name__}; nothing to federate")
        if ckpt_path is None:
            # One starting point for the federation: site 0's initial weights, whatever each site's seed gave.
            load_vector(model, site.link.broadcast(flatten(model.state_dict(), keys), "parameters"), keys)
        passes = passes_per_round(train_loader, self.local_epochs, self.local_steps)
        site.call("on_fit_start", trainer=self)

        bar = tqdm(
            total=self.rounds, initial=self.state.round, desc=f"{site.name} rounds",
            disable=not (self.enable_progress_bar and site.is_leader), dynamic_ncols=True,
        )
        try:
            while self.state.round < self.rounds and not self.state.stopped:
                metrics = self._run_round(self.state.round, keys, train_loader, val_loader, datamodule, n_train, passes)
                bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("train/site/loss", "val/pooled/loss", "val/pooled/mae")})
                bar.update(1)
        finally:
            bar.close()
        if self.state.stopped:
            log.info("%s: early stop after round %d (no improvement for %d rounds)",
                     site.name, self.state.round, self.state.rounds_without_improvement)
        site.call("on_fit_end", trainer=self)
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
        site = self.site
        site.launch()
        loader = site.setup_eval_loader(site.stage_loaders("predict", datamodule, dataloaders))
        site.setup(model, with_optimizer=False)
        site.load_weights(ckpt_path)
        outputs = []
        site.wrapped.eval()
        with torch.no_grad():
            for i, batch in enumerate(loader):
                batch = after_transfer(datamodule, batch, 0)
                outputs.append(site.wrapped.predict_step(batch, i))
        self.predictions = outputs
        return outputs

    # ------------------------------------------------------------------------------------------------
    # One round, top to bottom
    # ------------------------------------------------------------------------------------------------
    def _run_round(
        self, r: int, keys: list[str], train_loader: Any, val_loader: Any, datamodule: Any, n_train: int, passes: int,
    ) -> dict[str, float]:
        site, link, model, strategy = self.site, self.site.link, self.site.model, self.strategy
        link.bytes_sent = 0
        site.call("on_round_start", trainer=self, round=r)

        # (1) Global weights in. After the previous round's aggregation the model already holds them;
        # the aggregated entries are what every site shares, the rest (FedBN's batch norm) stays local.
        global_vec = flatten(model.state_dict(), keys)
        global_params = {k: v.detach().clone() for k, v in model.state_dict().items() if k in set(keys)}

        # (2) Local training, if this site is sampled this round (same draw at every site, no messages).
        t0 = time.perf_counter()
        sampled = self.federation.site_rank in self.sampled_sites(r)
        trained = LocalTraining.skipped()
        if sampled:
            trained = train_locally(site, train_loader, datamodule, strategy, global_params, r, passes,
                                    self.local_steps)
            self.global_step += trained.steps
        site.call("on_local_train_end", trainer=self, round=r, result=trained)
        t_train = time.perf_counter() - t0

        # (3) Aggregation, owned by the strategy: what this site sends (client_update), then how the sites'
        # contributions combine (aggregate), identically at every site.
        t0 = time.perf_counter()
        context = RoundContext(round=r, seed=self.seed, site_rank=self.federation.site_rank,
                               num_sites=self.federation.num_sites)
        sent = strategy.client_update(flatten(model.state_dict(), keys), global_vec, context)
        weight = strategy.site_weight(n_train) if sampled else 0.0
        new_global = strategy.aggregate(Contribution(sent, global_vec, weight), Collectives(link, r), context)
        load_vector(model, new_global, keys)
        site.call("on_aggregate_end", trainer=self, round=r, global_params=new_global)
        t_agg = time.perf_counter() - t0

        # (4) Every site validates the new global model; pooled metrics from the sites' summed statistics.
        t0 = time.perf_counter()
        own = evaluate_split(site, val_loader, datamodule, "validation_step", baseline_prediction(model))
        pooled = pool_split(link, own)
        site_metrics, pooled_metrics = own.compute(), pooled.compute()
        val_loss = pooled_metrics["loss"]
        t_val = time.perf_counter() - t0
        metrics: dict[str, float] = {"round": float(r + 1)}
        metrics |= {f"val/site/{k}": float(site_metrics.get(k, math.nan)) for k in _ROUND_METRICS}
        metrics |= {f"val/pooled/{k}": float(pooled_metrics.get(k, math.nan)) for k in _ROUND_METRICS}
        site.call("on_validation_end", trainer=self, round=r, metrics=metrics)

        # (5) Identical decisions everywhere: best model, early stopping, LR on plateau.
        has_val = pooled.count > 0
        if self.state.record(r, val_loss, has_val, self.patience):
            self._save_best(r)
        if self._plateau is not None and has_val:
            before = _learning_rates(site.optimizer)
            self._plateau.step(val_loss)
            if _learning_rates(site.optimizer) != before:
                self.state.lr_scale *= self.lr_plateau_factor
                log.info("%s: validation loss on a plateau; learning rate now %s", site.name,
                         _learning_rates(site.optimizer))

        # (6) Round checkpoint, written atomically (local file first, then the shared one).
        if site.is_leader:
            ckpt.save_round(
                self.run_dir, self.federation.site_rank, state=self.state,
                global_weights={k: v for k, v in model.state_dict().items() if k in set(keys)},
                strategy_state=strategy.state_dict(), sampling=self._sampling_rule(),
                lr=_learning_rates(site.optimizer), model_state=model.state_dict(),
                optimizer_state=site.optimizer.state_dict(), global_step=self.global_step,
                plateau_state=self._plateau.state_dict() if self._plateau is not None else None,
            )

        # (7) One row of history, logged at step = round (1-based), then the round is over.
        metrics |= {
            "train/site/loss": trained.loss, "train/site/volumes": float(trained.volumes),
            "lr": _learning_rates(site.optimizer)[0], "sampled": float(sampled),
            "time/train_s": t_train, "time/data_wait_s": trained.data_wait_s, "time/aggregate_s": t_agg,
            "time/validate_s": t_val, "bytes_sent": float(link.bytes_sent),
        }
        self.history.append(metrics)
        if site.is_global_leader:
            write_json(self.run_dir / HISTORY_FILE, self._history_before_resume + self.history)
        site.launched().log_dict({k: v for k, v in metrics.items() if k != "round"}, step=r + 1)
        log.info("%s round %d/%d: %s", site.name, r + 1, self.rounds,
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "round"))
        site.call("on_round_end", trainer=self, round=r, metrics=metrics)
        return metrics

    # ------------------------------------------------------------------------------------------------
    # The parts of a round
    # ------------------------------------------------------------------------------------------------
    def sampled_sites(self, r: int) -> set[int]:
        """Sites that train in round ``r`` (0-based): a pure function of ``(seed, r)``, identical at every site."""
        n, k = self.federation.num_sites, self.sites_per_round
        if k is None or k >= n:
            return set(range(n))
        return {int(s) for s in np.random.default_rng((self.seed, r)).choice(n, size=k, replace=False)}

    def _sampling_rule(self) -> dict[str, Any]:
        return {"seed": self.seed, "sites_per_round": self.sites_per_round, "num_sites": self.federation.num_sites}

    def _plateau_scheduler(self) -> ReduceLROnPlateau | None:
        """torch's plateau rule, set to reduce after ``lr_plateau_patience`` rounds without a lower loss.

        torch reduces once the count of bad rounds *exceeds* its patience, so it gets ours minus one;
        ``threshold=0`` makes any lower loss an improvement. The two rules then take the same decisions
        (``tests/federated/test_plateau.py``), except that torch skips reductions smaller than 1e-8.
        """
        if self.lr_plateau_patience is None:
            return None
        return ReduceLROnPlateau(self.site.optimizer, mode="min", factor=self.lr_plateau_factor,
                                 patience=self.lr_plateau_patience - 1, threshold=0.0, min_lr=self.min_lr)

    def _save_best(self, r: int) -> None:
        """Lightning-format ``best.ckpt``; under FedBN it holds this site's batch-norm layers.

        Every site leader writes ``site-<rank>/best.ckpt``; site 0 also writes the run's ``best.ckpt``.
        """
        self.best_model_path = str(ckpt.site_dir(self.run_dir, self.federation.site_rank) / ckpt.BEST_FILE)
        if self.site.is_leader:
            ckpt.save_best(self.site.model, self.run_dir, self.federation.site_rank, epoch=r,
                           global_step=self.global_step)

    def _resume(self, ckpt_path: str) -> None:
        """Restore weights, optimizer, strategy, counters and random state from a round checkpoint."""
        site = self.site
        path = self.run_dir / ckpt.ROUND_FILE if ckpt_path == "last" else Path(ckpt_path)
        self.state, self.global_step, plateau_state = ckpt.restore_round(
            path, self.federation.site_rank, site.model, site.optimizer, self.strategy, self._sampling_rule()
        )
        if self._plateau is not None and plateau_state is not None:
            self._plateau.load_state_dict(plateau_state)
        best = ckpt.site_dir(path.parent, self.federation.site_rank) / ckpt.BEST_FILE
        self.best_model_path = str(best) if best.is_file() else None
        history = self.run_dir / HISTORY_FILE
        if site.is_global_leader and history.is_file():  # keep the rounds run before the interruption
            self._history_before_resume = [h for h in read_json(history) if h["round"] <= self.state.round]
        log.info("%s: resumed from %s after round %d", site.name, path, self.state.round)

    def _share_target_mean(self, model: Any, datamodule: Any) -> None:
        """Pooled mean (and SD) of the training labels for models that centre and scale their output on them.

        Only the sum, count and sum of squares of each site's labels cross.
        """
        if not (hasattr(model, "set_target_mean") and hasattr(datamodule, "train_target_stats")):
            return
        stats = [float(v) for v in datamodule.train_target_stats()]
        total = self.site.link.all_reduce(torch.tensor(stats, dtype=torch.float64), "label_stats").tolist()
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
        site = self.site
        site.launch()
        dataloaders = site.stage_loaders(stage, datamodule, dataloaders)
        site.setup(model, with_optimizer=False)
        site.load_weights(ckpt_path)
        site.link.connect()
        loaders = list(dataloaders) if isinstance(dataloaders, (list, tuple)) else [dataloaders]
        rows = evaluate_federation(
            site, [site.setup_eval_loader(loader) for loader in loaders], datamodule,
            "test_step" if stage == "test" else "validation_step", baseline_prediction(model),
        )
        if site.is_global_leader:
            print(f"\n{stage} ({self.run_name}, {self.federation.num_sites} site(s))\n{format_table(rows)}", flush=True)
            write_json(self.run_dir / metrics_file(stage), rows)
        site.launched().log_dict(
            {f"{stage}/{name}/{key}": value for name, row in rows.items() for key, value in row.items()},
            step=max(self.state.round, 1),
        )
        for lg in self.loggers:
            lg.save()
        return rows

    def _log_hyperparams(self, model: Any) -> None:
        params = {
            "rounds": self.rounds, "local_epochs": self.local_epochs, "local_steps": self.local_steps,
            "precision": self.precision, "devices": str(self.devices), "num_nodes": self.site.num_nodes,
            "strategy": repr(self.strategy), "sites_per_round": self.sites_per_round, "patience": self.patience,
            "lr_plateau_patience": self.lr_plateau_patience, "num_sites": self.federation.num_sites,
            "site_rank": self.federation.site_rank, "site_name": self.site.name, "seed": self.seed,
            "model": type(model).__name__,
        }
        for lg in self.loggers:
            lg.log_hyperparams(params)


#: The validation metrics logged per round, for the site alone and pooled over the federation.
_ROUND_METRICS = ("loss", "mae", "r", "n", "baseline_mae")


def _learning_rates(optimizer: Any) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]

