"""FederatedTrainer: Lightning's ``Trainer`` API, run as a federation of sites on Fabric.

Centralized training is a federation of one site, so federated and centralized numbers come from this one
loop. Two levels of communication:

* inside a site, Fabric owns the default process group (DDP over the site's GPUs, or one CPU process);
* across sites, only the site leader (rank 0 of its site) talks to the other leaders through a
  :class:`~neurofed.federated.group.FederationGroup` (or a ``LocalGroup`` for one site) and then broadcasts
  what it received to the other ranks of its site.

Only what :mod:`neurofed.federated.wire` allows crosses a site boundary: parameters, example counts, loss
sums, metric and label sufficient statistics, and small control tensors. :meth:`FederatedTrainer._run_round`
reads top to bottom as one round.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from neurofed.federated import state as ckpt
from neurofed.federated.checkpoint_io import atomic_save
from neurofed.federated.config import Federation
from neurofed.federated.group import FederationGroup, LocalGroup
from neurofed.federated.params import flatten, unflatten
from neurofed.federated.strategies import FedAvg, Strategy
from neurofed.metrics import RegressionStats, format_table

__all__ = ["FederatedTrainer"]

log = logging.getLogger(__name__)


class FederatedTrainer:
    """Trains a LightningModule across sites, round after round, with the ``fit/validate/test/predict`` API.

    One round: global weights in; local training at the sampled sites; aggregation by the strategy
    (weighted all_reduce, then the same server update at every site, so no server process exists); every
    site validates the new global model; pooled validation loss drives identical early-stopping and
    LR-plateau decisions everywhere; the round checkpoint is written atomically.

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
        self.rounds = int(rounds)
        self.local_epochs = int(local_epochs)
        self.local_steps = local_steps
        self.precision = precision
        self.accelerator = accelerator
        self.devices = devices
        self.strategy = strategy if strategy is not None else FedAvg()
        self.federation = federation if federation is not None else Federation()
        if sites_per_round is not None and not 1 <= sites_per_round:
            raise ValueError(f"FederatedTrainer: sites_per_round must be >= 1, got {sites_per_round}")
        self.sites_per_round = sites_per_round
        self.patience = patience
        self.lr_plateau_patience = lr_plateau_patience
        self.lr_plateau_factor = float(lr_plateau_factor)
        self.min_lr = float(min_lr)
        self.default_root_dir = default_root_dir
        self.run_name = run_name or "run"
        self.seed = int(seed)
        self.enable_progress_bar = enable_progress_bar
        self.compile = compile
        self.deterministic = deterministic
        self.loggers: list[Logger] = self._build_loggers(logger)

        self.fabric: Fabric | None = None
        # The cross-site group; created on first use by the site leader. Assign one before ``fit`` to use
        # another transport or to audit the wire (``RecordingGroup``).
        self.group: Any = None
        self.state = ckpt.RoundState()
        self.history: list[dict[str, float]] = []
        self.global_step = 0
        self.site_name = f"site{self.federation.site_rank}"
        self.best_model_path: str | None = None
        self.predictions: list[Any] | None = None
        self._modules: dict[int, tuple[Any, Any]] = {}  # id(model) -> (Fabric module, Fabric optimizer)
        self._bytes_sent = 0

    # ------------------------------------------------------------------------------------------------
    # Where things are, who leads
    # ------------------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        """Folder of this run: ``default_root_dir/run_name``."""
        return Path(self.default_root_dir) / self.run_name

    @property
    def is_site_leader(self) -> bool:
        """Rank 0 of this site's processes: the one that talks to the other sites and writes files."""
        if self.fabric is not None:
            return self.fabric.global_rank == 0
        return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0

    @property
    def is_global_leader(self) -> bool:
        """Leader of site 0: prints the federation's tables and writes run-wide files."""
        return self.is_site_leader and self.federation.site_rank == 0

    def _build_loggers(self, logger: bool | Logger | list[Logger]) -> list[Logger]:
        if logger is True:
            return [CSVLogger(save_dir=str(self.run_dir), name=f"site-{self.federation.site_rank}")]
        if logger is False or logger is None:
            return []
        return list(logger) if isinstance(logger, (list, tuple)) else [logger]

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
                train_dataloaders = _loader(datamodule, "train_dataloader")
            if val_dataloaders is None:
                val_dataloaders = _loader(datamodule, "val_dataloader")
        if train_dataloaders is None:
            raise ValueError("FederatedTrainer.fit: pass a datamodule or train_dataloaders")
        self.site_name = self._site_name(datamodule)
        n_train = _num_examples(train_dataloaders)
        train_loader = fabric.setup_dataloaders(train_dataloaders)
        val_loader = self._setup_eval_loader(val_dataloaders)
        module, optimizer = self._setup_model(model, with_optimizer=True)
        self._group()
        self._log_hyperparams(model)

        self._share_target_mean(model, datamodule)
        self.state = ckpt.RoundState()
        if ckpt_path is not None:
            self._resume(model, optimizer, ckpt_path)
        keys = self.strategy.aggregated_keys(model.state_dict(), model)
        if not keys:
            raise ValueError(f"{self.strategy!r} aggregates no entry of {type(model).__name__}; nothing to federate")
        if ckpt_path is None:
            # One starting point for the federation: site 0's initial weights, whatever each site's seed gave.
            self._load_vector(model, self._broadcast(flatten(model.state_dict(), keys), "parameters"), keys)

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
        fabric = self._launch()
        if datamodule is not None:
            self._prepare(datamodule, "predict")
            if dataloaders is None:
                dataloaders = _loader(datamodule, "predict_dataloader")
        if dataloaders is None:
            raise ValueError("FederatedTrainer.predict: pass a datamodule or dataloaders")
        module, _ = self._setup_model(model, with_optimizer=False)
        self._load_weights(model, ckpt_path)
        loader = self._setup_eval_loader(dataloaders)
        outputs = []
        module.eval()
        with torch.no_grad():
            for i, batch in enumerate(loader):
                batch = _after_transfer(datamodule, batch, 0)
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
        self._bytes_sent = 0

        # (1) Global weights in. After the previous round's aggregation the model already holds them;
        # the aggregated entries are what every site shares, the rest (FedBN's batch norm) stays local.
        global_vec = flatten(model.state_dict(), keys)
        global_params = {k: v.detach().clone() for k, v in model.state_dict().items() if k in set(keys)}

        # (2) Local training, if this site is sampled this round (same draw at every site, no messages).
        t0 = time.perf_counter()
        sampled = self.federation.site_rank in self._sampled_sites(r)
        train_loss = math.nan
        if sampled:
            train_loss = self._local_training(r, model, module, optimizer, train_loader, datamodule, global_params)
        t_train = time.perf_counter() - t0

        # (3) Aggregation: weights are normalised first (so that one site is exactly the identity), then
        # one all_reduce of the flat vector; every site applies the same server update.
        t0 = time.perf_counter()
        weight = self.strategy.site_weight(n_train) if sampled else 0.0
        total_weight = self._all_reduce(torch.tensor([weight], dtype=torch.float64), "example_count").item()
        if total_weight <= 0:
            raise RuntimeError(
                f"round {r}: no site contributed training examples (total weight {total_weight}); "
                "check that every site's training split is non-empty"
            )
        local_vec = flatten(model.state_dict(), keys)
        mean_vec = self._all_reduce(local_vec * (weight / total_weight), "parameters")
        new_global = self.strategy.server_update(global_vec, mean_vec)
        self._load_vector(model, new_global, keys)
        t_agg = time.perf_counter() - t0

        # (4) Every site validates the new global model; pooled loss and metrics from summed statistics.
        t0 = time.perf_counter()
        site_loss_sum, site_count, site_stats = self._evaluate_loader(module, val_loader, datamodule, "validation_step")
        loss_sum = self._all_reduce(site_loss_sum, "loss_sum").item()
        count = self._all_reduce(site_count, "example_count").item()
        pooled = RegressionStats.from_tensor(self._all_reduce(site_stats, "metric_stats")).compute()
        local = RegressionStats.from_tensor(site_stats).compute()
        val_loss = loss_sum / count if count > 0 else math.nan
        t_val = time.perf_counter() - t0

        # (5) Identical decisions everywhere: best model, early stopping, LR on plateau.
        st = self.state
        st.round = r + 1
        if count == 0 or val_loss < st.best_val_loss:
            if count > 0:
                st.best_val_loss, st.best_round = val_loss, r
            st.rounds_without_improvement = st.rounds_on_plateau = 0
            self._save_best(model, r)
        else:
            st.rounds_without_improvement += 1
            st.rounds_on_plateau += 1
        if self.lr_plateau_patience is not None and st.rounds_on_plateau >= self.lr_plateau_patience:
            self._reduce_lr(optimizer)
            st.rounds_on_plateau = 0
        if self.patience is not None and st.rounds_without_improvement >= self.patience:
            st.stopped = True

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
            "round": float(r), "train/loss": train_loss, "val/loss": val_loss,
            "val/mae": pooled["mae"], "val/r": pooled["r"],
            "val/site_mae": local["mae"], "val/site_r": local["r"], "val/site_n": local["n"],
            "lr": _learning_rates(optimizer)[0], "sampled": float(sampled),
            "time/train_s": t_train, "time/aggregate_s": t_agg, "time/validate_s": t_val,
            "bytes_sent": float(self._bytes_sent),
        }
        self.history.append(metrics)
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
    ) -> float:
        """``local_epochs`` (or ``local_steps``) of training; returns the mean training loss.

        Random state is reseeded before every local epoch from (seed, epoch, site, rank), so data order,
        dropout and augmentation do not depend on history: a resumed run repeats an uninterrupted one.
        """
        fabric = self._fabric()
        module.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=fabric.device)
        seen, steps, epoch = 0, 0, 0
        while self.local_steps is not None or epoch < self.local_epochs:
            epoch_key = r * self.local_epochs + epoch if self.local_steps is None else r * 1_000_003 + epoch
            self._reseed(epoch_key, kind=0 if self.local_steps is None else 1)
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch_key)
            batches = 0
            for i, batch in enumerate(loader):
                batch = _after_transfer(datamodule, batch, 0)
                out = module.training_step(batch, i)
                loss = out["loss"] if isinstance(out, dict) else out
                extra = self.strategy.local_loss(model, global_params)
                fabric.backward(loss if extra is None else loss + extra)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                n = _batch_size(batch)
                loss_sum += loss.detach().double() * n
                seen += n
                steps += 1
                batches += 1
                self.global_step += 1
                if self.local_steps is not None and steps >= self.local_steps:
                    return (loss_sum / max(seen, 1)).item()
            if batches == 0:
                raise RuntimeError(f"{self.site_name}: the training dataloader is empty; nothing to train on")
            epoch += 1
        return (loss_sum / max(seen, 1)).item()

    def _evaluate_loader(
        self, module: Any, loader: Iterable | None, datamodule: Any, step: str, dataloader_idx: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Loss sum, example count and RegressionStats of one split, summed over this site's ranks."""
        loss_sum, count, stats = 0.0, 0.0, RegressionStats()
        if loader is not None:
            was_training = module.training
            module.eval()
            with torch.no_grad():
                for i, batch in enumerate(loader):
                    batch = _after_transfer(datamodule, batch, dataloader_idx)
                    out = getattr(module, step)(batch, i)
                    n = int(out["target"].numel())
                    loss_sum += float(out["loss"]) * n
                    count += n
                    stats = stats + RegressionStats.from_predictions(out["pred"], out["target"])
            module.train(was_training)
        return (
            self._site_sum(torch.tensor([loss_sum], dtype=torch.float64)),
            self._site_sum(torch.tensor([count], dtype=torch.float64)),
            self._site_sum(stats.to_tensor()),
        )

    def _load_vector(self, model: nn.Module, vec: Tensor, keys: list[str]) -> None:
        """Copy a flat global vector into the model's aggregated entries, in place."""
        sd = model.state_dict()
        with torch.no_grad():
            for k, v in unflatten(vec, sd, keys).items():
                sd[k].copy_(v)

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
        if not self.is_site_leader:
            return
        checkpoint = ckpt.lightning_checkpoint(model, epoch=r, global_step=self.global_step)
        atomic_save(checkpoint, self.best_model_path)
        if self.federation.site_rank == 0:
            atomic_save(checkpoint, self.run_dir / ckpt.BEST_FILE)

    def _resume(self, model: nn.Module, optimizer: Any, ckpt_path: str) -> None:
        """Restore weights, optimizer, strategy, counters and random state from a round checkpoint."""
        path = self.run_dir / ckpt.ROUND_FILE if ckpt_path == "last" else Path(ckpt_path)
        shared, local = ckpt.load_round(path, self.federation.site_rank)
        if shared["sampling"] != self._sampling_rule():
            raise ValueError(
                f"{path} was written with site sampling {shared['sampling']} but this run uses "
                f"{self._sampling_rule()}; resume with the same seed, sites_per_round and num_sites"
            )
        model.load_state_dict(local["model"])
        self._load_state(model, shared["global"])
        optimizer.load_state_dict(local["optimizer"])
        self.strategy.load_state_dict(shared["strategy"])
        self.state = ckpt.RoundState.from_dict(shared["trainer"])
        self.global_step = int(local["global_step"])
        ckpt.restore_rng(local["rng"])
        best = ckpt.site_dir(path.parent, self.federation.site_rank) / ckpt.BEST_FILE
        self.best_model_path = str(best) if best.is_file() else None
        log.info("%s: resumed from %s after round %d", self.site_name, path, self.state.round)

    @staticmethod
    def _load_state(model: nn.Module, weights: dict[str, Tensor]) -> None:
        sd = model.state_dict()
        with torch.no_grad():
            for k, v in weights.items():
                sd[k].copy_(v)

    def _share_target_mean(self, model: Any, datamodule: Any) -> None:
        """Pooled mean training label for models that centre their output on it (sum and count cross)."""
        if not (hasattr(model, "set_target_mean") and hasattr(datamodule, "train_target_stats")):
            return
        s, n = datamodule.train_target_stats()
        total = self._all_reduce(torch.tensor([float(s), float(n)], dtype=torch.float64), "label_stats")
        if total[1] <= 0:
            raise RuntimeError("no site has labelled training examples; cannot set the target mean")
        model.set_target_mean(float(total[0] / total[1]))

    # ------------------------------------------------------------------------------------------------
    # Evaluation across the federation (validate / test)
    # ------------------------------------------------------------------------------------------------
    def _evaluate_federation(
        self, stage: str, model: Any, datamodule: Any, ckpt_path: str | None, dataloaders: Any
    ) -> dict[str, dict[str, float]]:
        self._launch()
        if datamodule is not None:
            self._prepare(datamodule, stage)
            if dataloaders is None:
                dataloaders = _loader(datamodule, "test_dataloader" if stage == "test" else "val_dataloader")
        if dataloaders is None:
            raise ValueError(f"FederatedTrainer.{stage}: pass a datamodule or dataloaders")
        self.site_name = self._site_name(datamodule)
        module, _ = self._setup_model(model, with_optimizer=False)
        if ckpt_path is None and stage == "test" and self.best_model_path and Path(self.best_model_path).is_file():
            ckpt_path = self.best_model_path
        self._load_weights(model, ckpt_path)
        self._group()

        loaders = list(dataloaders) if isinstance(dataloaders, (list, tuple)) else [dataloaders]
        names = list(getattr(datamodule, "site_names", None) or [])
        names = names if len(loaders) > 1 and len(names) == len(loaders) else (
            [self.site_name] if len(loaders) == 1 else [f"{self.site_name}/{j}" for j in range(len(loaders))]
        )
        step = "test_step" if stage == "test" else "validation_step"
        mine = []
        for j, loader in enumerate(loaders):
            loss_sum, count, stats = self._evaluate_loader(module, self._setup_eval_loader(loader), datamodule, step, j)
            mine.append((torch.cat([loss_sum, count]), stats))

        # Sites may hold different numbers of splits: agree on the count, then gather one split at a time
        # (zeros where a site has fewer), so every payload stays a handful of numbers.
        counts = [int(t.item()) for t in self._all_gather(torch.tensor([len(mine)], dtype=torch.int64), "control")]
        rows: dict[str, dict[str, float]] = {}
        pooled_stats, pooled_loss = RegressionStats(), torch.zeros(2, dtype=torch.float64)
        for j in range(max(counts)):
            loss_t, stats_t = mine[j] if j < len(mine) else (torch.zeros(2, dtype=torch.float64), torch.zeros(7, dtype=torch.float64))
            all_loss = self._all_gather(loss_t, "loss_sum")
            all_stats = self._all_gather(stats_t, "metric_stats")
            for k in range(self.federation.num_sites):
                if j >= counts[k]:
                    continue
                name = names[j] if k == self.federation.site_rank else (f"site{k}" if counts[k] == 1 else f"site{k}/{j}")
                stats = RegressionStats.from_tensor(all_stats[k])
                rows[name] = _row(stats, all_loss[k])
                pooled_stats, pooled_loss = pooled_stats + stats, pooled_loss + all_loss[k]
        rows["pooled"] = _row(pooled_stats, pooled_loss)

        if self.is_global_leader:
            print(f"\n{stage} ({self.run_name}, {self.federation.num_sites} site(s))\n{format_table(rows)}", flush=True)
        self._fabric().log_dict(
            {f"{stage}/{name}/{key}": value for name, row in rows.items() for key, value in row.items()}
        )
        for lg in self.loggers:
            lg.save()
        return rows

    # ------------------------------------------------------------------------------------------------
    # Communication: cross-site through the group, inside a site through the default process group
    # ------------------------------------------------------------------------------------------------
    def _all_reduce(self, t: Tensor, kind: str) -> Tensor:
        """Sum over sites. The leader sends; every rank of the site receives the result."""
        if self.is_site_leader:
            self._bytes_sent += t.numel() * t.element_size()
            out = self._group().all_reduce_sum(t, kind)
        else:
            out = torch.empty_like(t, device="cpu")
        return self._site_broadcast(out)

    def _all_gather(self, t: Tensor, kind: str) -> list[Tensor]:
        """Every site's ``t`` (in site order) on every rank of every site."""
        if self.is_site_leader:
            self._bytes_sent += t.numel() * t.element_size()
            stacked = torch.stack(self._group().all_gather(t, kind))
        else:
            stacked = torch.empty((self.federation.num_sites, *t.shape), dtype=t.dtype)
        return list(self._site_broadcast(stacked).unbind(0))

    def _broadcast(self, t: Tensor, kind: str) -> Tensor:
        """Site 0's ``t`` on every rank of every site."""
        if self.is_site_leader:
            if self.federation.site_rank == 0:
                self._bytes_sent += t.numel() * t.element_size()
            t = self._group().broadcast(t, kind, src=0)
        return self._site_broadcast(t)

    def _site_broadcast(self, t: Tensor) -> Tensor:
        fabric = self._fabric()
        if fabric.world_size == 1:
            return t
        x = t.to(fabric.device)
        torch.distributed.broadcast(x, src=0)
        return x.cpu()

    def _site_sum(self, t: Tensor) -> Tensor:
        fabric = self._fabric()
        if fabric.world_size == 1:
            return t
        return fabric.all_reduce(t.to(fabric.device), reduce_op="sum").cpu()

    def _group(self) -> Any:
        """The cross-site group (site leader only): ``LocalGroup`` for one site, else a FederationGroup.

        A FederationGroup that cannot reach the other sites raises ``FederationTimeoutError`` within
        ``federation.timeout_s``.
        """
        if self.group is None and self.is_site_leader:
            fed = self.federation
            self.group = (
                LocalGroup() if fed.num_sites == 1
                else FederationGroup(fed.address, fed.port, fed.site_rank, fed.num_sites, fed.timeout_s)
            )
        return self.group

    def close(self) -> None:
        """Leave the federation (the group is kept across fit/validate/test until then)."""
        if self.group is not None:
            self.group.close()
            self.group = None

    # ------------------------------------------------------------------------------------------------
    # Fabric plumbing
    # ------------------------------------------------------------------------------------------------
    def _launch(self) -> Fabric:
        if self.fabric is None:
            multi = not (isinstance(self.devices, int) and self.devices == 1) and str(self.devices) not in ("1", "auto")
            fabric = Fabric(
                accelerator=self.accelerator, devices=self.devices, precision=self.precision,
                strategy="ddp" if multi else "auto", loggers=self.loggers,
            )
            fabric.launch()
            fabric.seed_everything(self.seed)
            if self.deterministic and fabric.device.type == "cpu":
                torch.use_deterministic_algorithms(True, warn_only=True)
            self.fabric = fabric
        return self.fabric

    def _fabric(self) -> Fabric:
        if self.fabric is None:
            raise RuntimeError("FederatedTrainer: call fit/validate/test/predict first")
        return self.fabric

    def _prepare(self, datamodule: Any, stage: str) -> None:
        fabric = self._fabric()
        with fabric.rank_zero_first(local=True):
            if fabric.local_rank == 0 and hasattr(datamodule, "prepare_data"):
                datamodule.prepare_data()
        if hasattr(datamodule, "setup"):
            datamodule.setup(stage)

    def _setup_model(self, model: Any, with_optimizer: bool) -> tuple[Any, Any]:
        """Fabric-wrap the model once (kept for later calls) and build its optimizer once.

        Keeping the optimizer across rounds and calls is what makes one-site federation equal to
        centralized training.
        """
        fabric = self._fabric()
        module, optimizer = self._modules.get(id(model), (None, None))
        if module is None:
            module = fabric.setup_module(torch.compile(model) if self.compile else model)
        if with_optimizer and optimizer is None:
            optimizer = fabric.setup_optimizers(_single_optimizer(model.configure_optimizers()))
        self._modules[id(model)] = (module, optimizer)
        return module, optimizer

    def _setup_eval_loader(self, loader: Any) -> Any:
        """Shard an evaluation loader over the site's ranks without padding (sums must count each once)."""
        if loader is None:
            return None
        fabric = self._fabric()
        if fabric.world_size > 1 and isinstance(loader, DataLoader):
            from lightning.fabric.utilities.data import _update_dataloader
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(
                loader.dataset, num_replicas=fabric.world_size, rank=fabric.global_rank, shuffle=False
            )
            loader = _update_dataloader(loader, sampler)
        return fabric.setup_dataloaders(loader, use_distributed_sampler=False)

    def _load_weights(self, model: nn.Module, ckpt_path: str | None) -> None:
        if ckpt_path is None:
            return
        path = ckpt.resolve_weights_path(ckpt_path, self.run_dir, self.federation.site_rank)
        weights, strict = ckpt.weights_from_checkpoint(path, self.federation.site_rank)
        if strict:
            model.load_state_dict(weights)
        else:
            self._load_state(model, weights)
        log.info("%s: loaded weights from %s", self.site_name, path)

    def _reseed(self, epoch_key: int, kind: int) -> None:
        entropy = [self.seed, kind, epoch_key, self.federation.site_rank, self._fabric().global_rank]
        seed_everything(int(np.random.SeedSequence(entropy).generate_state(1)[0]), workers=True, verbose=False)

    def _site_name(self, datamodule: Any) -> str:
        names = getattr(datamodule, "site_names", None)
        return str(names[0]) if names else f"site{self.federation.site_rank}"

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


def _single_optimizer(configured: Any) -> torch.optim.Optimizer:
    """The optimizer from ``configure_optimizers`` (an optimizer, a one-element list, or a dict)."""
    if isinstance(configured, (list, tuple)):
        if len(configured) != 1:
            raise ValueError(f"configure_optimizers returned {len(configured)} optimizers; return exactly one")
        configured = configured[0]
    if isinstance(configured, dict):
        if configured.get("lr_scheduler") is not None:
            log.warning("configure_optimizers returned an lr_scheduler; the federated trainer ignores it and "
                        "reduces the learning rate on plateau itself (lr_plateau_patience)")
        configured = configured["optimizer"]
    if not isinstance(configured, torch.optim.Optimizer):
        raise TypeError(f"configure_optimizers must return a torch optimizer, got {type(configured).__name__}")
    return configured


def _loader(datamodule: Any, name: str) -> Any:
    """``datamodule.<name>()``, or ``None`` when a LightningDataModule leaves it unimplemented."""
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not hasattr(datamodule, name):
        return None
    if isinstance(datamodule, pl.LightningDataModule) and not is_overridden(name, datamodule, pl.LightningDataModule):
        return None
    return getattr(datamodule, name)()


def _after_transfer(datamodule: Any, batch: Any, dataloader_idx: int) -> Any:
    """The datamodule's device-side hook (GPU augmentation), as Lightning's Trainer would call it."""
    hook = getattr(datamodule, "on_after_batch_transfer", None)
    return hook(batch, dataloader_idx) if hook is not None else batch


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict) and "target" in batch:
        return int(len(batch["target"]))
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return int(batch[0].shape[0])
    return 1


def _num_examples(loader: Any) -> int:
    """Size of the site's training split: the weight of its update under weighted FedAvg."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return sum(_batch_size(b) for b in loader)


def _learning_rates(optimizer: Any) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


def _row(stats: RegressionStats, loss: Tensor) -> dict[str, float]:
    row = stats.compute()
    row["loss"] = float(loss[0] / loss[1]) if float(loss[1]) > 0 else math.nan
    return row
