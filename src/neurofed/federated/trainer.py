"""FederatedTrainer: Lightning's ``Trainer`` API, run as a federation of sites on Fabric.

The trainer *has* a :class:`~neurofed.federated.site.Site` (Fabric, the link to the other sites, loggers,
model, optimizer). A round reads top to bottom in :meth:`FederatedTrainer._run_round`: the strategy owns
aggregation, local training and evaluation live in their own modules, and callbacks observe every step.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from neurofed.federated import evaluation
from neurofed.federated import state as ckpt
from neurofed.federated.aggregate_checks import AggregateChecks
from neurofed.federated.agreement import evaluation_fingerprint, training_fingerprint
from neurofed.federated.collectives import Collectives
from neurofed.federated.commit import clean_orphans, commit_round, forget_rounds
from neurofed.federated.config import Federation
from neurofed.federated.dp_sgd import DPSGD, PrivateSite, steps_per_round
from neurofed.federated.errors import SettingsError
from neurofed.federated.fit_setup import FitLoaders, setup_fit
from neurofed.federated.integrity import round_digest
from neurofed.federated.local_training import LocalTraining, train_locally
from neurofed.federated.lr_plateau import PlateauLR, learning_rates
from neurofed.federated.lr_schedule import RoundSchedule, apply_round_lr
from neurofed.federated.params import flatten, float_keys, load_vector, unflatten
from neurofed.federated.precise_bn import batchnorm_statistics_keys, recompute_site_batchnorm
from neurofed.federated.results import HISTORY_FILE, write_json
from neurofed.federated.resume import committed_for, refuse_changed_settings, resume
from neurofed.federated.sampling import SiteSampling
from neurofed.federated.screening import Screened, individual_updates_hidden, screen_update
from neurofed.federated.site import Site, build_loggers
from neurofed.federated.strategies import Contribution, FedAvg, RoundContext, Strategy
from neurofed.federated.strategies.secure_aggregation import secure_aggregation_of
from neurofed.federated.target_stats import share_target_stats
from neurofed.federated.weight_average import WeightAverage
from neurofed.tracking import run_config

__all__ = ["FederatedTrainer"]

log = logging.getLogger(__name__)


class FederatedTrainer:
    """Trains a LightningModule across sites, round after round, with the ``fit/validate/test/predict`` API.

    Centralized training is a federation of one site, so federated and centralized numbers come from one
    loop. Inside a site, Fabric owns the process group (DDP over its GPUs and nodes); across sites, only the
    site leader (global rank 0 of its site) talks to the other leaders. There is no server process: every
    site runs the strategy on the same numbers and takes the same decisions.

    Results: ``history.json`` (per-round metrics, rounds from 1), ``validate_metrics.json`` /
    ``test_metrics.json``; loggers get each round at ``step = round`` as ``train/site/*``, ``val/site/*`` and
    ``val/pooled/*``. The optimizer lives across rounds, so one site with ``rounds=R, local_epochs=1`` is
    bit-identical to ``rounds=1, local_epochs=R``: aggregating one site is the identity.

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
        min_rounds: Never stop early before this many rounds, and choose the best model only among rounds from
            here on (default: the schedule's warm-up), so that an early lucky round cannot be selected.
        lr_schedule: Learning rate across rounds (:class:`~neurofed.federated.lr_schedule.RoundSchedule`:
            warm-up, then cosine or step decay); ``None`` keeps the optimizer's learning rate.
        lr_plateau_patience: Multiply every learning rate by ``lr_plateau_factor`` after this many rounds
            without improvement; ``None`` keeps the learning rate.
        lr_plateau_factor: Factor of each LR reduction.
        min_lr: Learning rates are never reduced below this.
        precise_bn: Keep BatchNorm running statistics local and re-estimate them on this site's training
            split before the first round and after each aggregation, before the site validates and commits
            the round (:mod:`~neurofed.federated.precise_bn`). No effect on a model without BatchNorm.
        gradient_clip_val: Clip the gradient norm of each local step to this value; ``None`` does not clip.
        ema_decay: Validate, keep and test an exponential moving average of the model over rounds
            (:mod:`~neurofed.federated.weight_average`) instead of the round's own weights; training goes on
            from the round's weights. ``None`` evaluates the round's model.
        federation: Where this site sits in the federation; default: one local site (centralized).
        logger: ``True`` for a CSV logger under ``default_root_dir/run_name/site-<rank>``, ``False`` for
            none, or Lightning logger(s) used as given (e.g. a WandbLogger set up by the CLI).
        callbacks: Objects with round hooks (:class:`~neurofed.federated.callbacks.Callback`).
        default_root_dir: Root folder of all runs' checkpoints and logs.
        run_name: Folder of this run under ``default_root_dir``; default ``"run"``.
        overwrite: Let ``neurofed fit`` reuse a run folder that already holds a run (its checkpoints, history
            and predictions are replaced); without it the command refuses and names ``--ckpt_path last``.
        seed: Seed of weight initialisation, data order, augmentation and site sampling.
        enable_progress_bar: Show a progress bar over rounds on the site leader.
        compile: ``torch.compile`` the model before training.
        deterministic: Use deterministic algorithms (on CPU, results are then bit-reproducible).
        privacy: Sample-level DP-SGD at this site (:class:`~neurofed.federated.dp_sgd.DPSGD`): Poisson
            batches, per-example clipping and noise; ε at δ from Opacus' accountant is in every round's
            metrics (``privacy/epsilon``, ``privacy/delta``), and training stops before a round that would
            spend more than ``target_epsilon``. The model must not use BatchNorm (``norm="group"``).
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
        min_rounds: int | None = None,
        lr_schedule: RoundSchedule | None = None,
        lr_plateau_patience: int | None = None,
        lr_plateau_factor: float = 0.5,
        min_lr: float = 1e-6,
        precise_bn: bool = True,
        gradient_clip_val: float | None = None,
        ema_decay: float | None = None,
        federation: Federation | None = None,
        logger: bool | Logger | list[Logger] = True,
        callbacks: list[Any] | None = None,
        default_root_dir: str = "checkpoints",
        run_name: str | None = None,
        overwrite: bool = False,
        seed: int = 0,
        enable_progress_bar: bool = True,
        compile: bool = False,
        deterministic: bool = True,
        privacy: DPSGD | None = None,
    ) -> None:
        fed = federation if federation is not None else Federation()
        if rounds < 1 or local_epochs < 1 or (local_steps is not None and local_steps < 1) or num_nodes < 1:
            raise SettingsError(
                f"FederatedTrainer: rounds ({rounds}), local_epochs ({local_epochs}), local_steps "
                f"({local_steps}) and num_nodes ({num_nodes}) must be >= 1"
            )
        if not 0 < lr_plateau_factor <= 1:
            raise SettingsError(f"FederatedTrainer: lr_plateau_factor must be in (0, 1], got {lr_plateau_factor}")
        if sites_per_round is not None and not 1 <= sites_per_round <= fed.num_sites:
            raise SettingsError(f"FederatedTrainer: sites_per_round must be in 1..num_sites={fed.num_sites}, "
                                f"got {sites_per_round}")
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise SettingsError(f"FederatedTrainer: ema_decay must be in [0, 1), got {ema_decay}")
        if gradient_clip_val is not None and privacy is not None:
            raise SettingsError("FederatedTrainer: gradient_clip_val does not combine with DP-SGD (privacy), which "
                                "clips each example's gradient itself (privacy.max_grad_norm)")
        if lr_plateau_patience is not None and lr_plateau_patience < 1:
            raise SettingsError(f"FederatedTrainer: lr_plateau_patience must be >= 1, got {lr_plateau_patience}")
        if (min_rounds is not None and min_rounds < 0) or (gradient_clip_val is not None and gradient_clip_val <= 0):
            raise SettingsError(f"FederatedTrainer: min_rounds ({min_rounds}) must be >= 0 and gradient_clip_val "
                                f"({gradient_clip_val}) > 0")
        self.rounds, self.local_epochs, self.local_steps = int(rounds), int(local_epochs), local_steps
        self.precision, self.devices = precision, devices
        self.strategy = strategy if strategy is not None else FedAvg()
        self.sites_per_round, self.patience = sites_per_round, patience
        self.lr_plateau_patience, self.lr_plateau_factor, self.min_lr = lr_plateau_patience, lr_plateau_factor, min_lr
        self.lr_schedule = lr_schedule
        warmup = lr_schedule.warmup_rounds if lr_schedule is not None else 0
        self.min_rounds = int(min_rounds) if min_rounds is not None else warmup
        self.precise_bn, self.gradient_clip_val, self.ema_decay = bool(precise_bn), gradient_clip_val, ema_decay
        self._average: WeightAverage | None = None
        self.federation = fed
        self.default_root_dir, self.run_name, self.seed = default_root_dir, run_name or "run", int(seed)
        self.enable_progress_bar = enable_progress_bar
        self.overwrite = bool(overwrite)
        self.privacy = privacy
        self._private: PrivateSite | None = None  # this site's DP-SGD state during fit
        self.site = Site(
            self.federation, self.run_dir, seed=self.seed, precision=precision, accelerator=accelerator,
            devices=devices, num_nodes=num_nodes, loggers=build_loggers(logger, self.run_dir, self.federation.site_rank),
            callbacks=callbacks or [], compile=compile, deterministic=deterministic,
        )
        self.state = ckpt.RoundState()
        self.history: list[dict[str, float]] = []
        self.history_before_resume: list[dict[str, float]] = []  # rounds run before ``ckpt_path`` was written
        self.global_step = 0
        self.best_model_path: str | None = None
        self.predictions: list[Any] | None = None
        self.plateau: PlateauLR | None = None
        self._global_vec: torch.Tensor | None = None  # the aggregated entries every site holds
        self._keys: list[str] = []
        self.screening: Screened | None = None  # the last round's update screening (every site's statistics)
        #: The configuration the trainer was built from (``trainer``/``model``/``data`` sections), which the
        #: loggers record; the ``neurofed`` command sets its resolved one. ``None``: the trainer's own settings.
        self.config: dict[str, Any] | None = None

    @property
    def run_dir(self) -> Path:
        """Folder of this run: ``default_root_dir/run_name``."""
        return Path(self.default_root_dir) / self.run_name

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        """The aggregated entries of the current global model, identical at every site (empty before ``fit``).

        The site's model holds them too, beside what stays local: BatchNorm statistics under ``precise_bn`` and
        entries a strategy keeps local (FedBN's batch-norm layers).
        """
        if self._global_vec is None:
            return {}
        return unflatten(self._global_vec, self.site.model.state_dict(), self._keys)

    @property
    def fabric(self) -> Any:
        """This site's launched Fabric (``None`` before the first stage)."""
        return self.site.fabric

    @property
    def loggers(self) -> list[Logger]:
        """This site's Lightning loggers."""
        return self.site.loggers

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

    # -- Public API (mirrors lightning.Trainer) ----------------------------------------------------------
    def fit(self, model: Any, datamodule: Any = None, train_dataloaders: DataLoader | None = None,
            val_dataloaders: DataLoader | None = None, ckpt_path: str | None = None) -> None:
        """Run the rounds; resume from a round checkpoint with ``ckpt_path="last"`` (or its path)."""
        site = self.site
        committed = (committed_for(self.run_dir, self.federation.site_rank, ckpt_path, self.federation.num_sites)
                     if ckpt_path is not None else None)
        loaders = setup_fit(self, model, datamodule, train_dataloaders, val_dataloaders)
        keys = self.strategy.aggregated_keys(model.state_dict(), model)
        local_statistics = batchnorm_statistics_keys(model)
        if self.precise_bn:  # each site's own statistics, re-estimated every round (precise_bn.py)
            keys = [k for k in keys if k not in local_statistics]
        if not keys:
            raise ValueError(f"{self.strategy!r} aggregates no entry of {type(model).__name__}; nothing to federate")
        if site.is_leader:
            clean_orphans(self.run_dir, self.federation.site_rank)
            if committed is None:  # a fresh fit replaces whatever rounds the folder held
                forget_rounds(self.run_dir, self.federation.site_rank)
        # Membership, agreement and the resume round, before anything else crosses (handshake.py).
        opened_fingerprint = training_fingerprint(self, model, keys, committed is not None)
        refuse_changed_settings(self.run_dir, self.federation.site_rank, committed, opened_fingerprint)
        self._settings = opened_fingerprint
        secure = secure_aggregation_of(self.strategy)  # masks statistics too: no count is declared in the clear
        opened = site.link.open(opened_fingerprint, committed,
                                None if secure else self.strategy.site_weight(loaders.n_train))
        if secure is not None:
            secure.attach(site.link)
        self._declared = opened.declared
        several = self.federation.num_sites > 1
        self._site_names = evaluation.gather_site_names(site.link, site.name) if several else [site.name]
        self._checks = AggregateChecks(model, keys, self.strategy, self.federation.max_failed_rounds,
                                       self._site_names)
        for lg in site.loggers:  # the run's settings, one dotted name each, and where this site sits
            lg.log_hyperparams(run_config(self, model, site.name))

        share_target_stats(site.link, model, datamodule)
        self.state = ckpt.RoundState()
        self.plateau = None if self.lr_plateau_patience is None else PlateauLR(
            site.optimizer, self.lr_plateau_patience, self.lr_plateau_factor, self.min_lr)
        self.history_before_resume = []
        self._average = None if self.ema_decay is None else WeightAverage(
            self.ema_decay, [k for k in float_keys(model.state_dict()) if not (self.precise_bn and k in local_statistics)])
        resumed = committed is not None and bool(opened.resume_round)
        if resumed:
            resume(self, opened.resume_round)
        else:
            if committed is not None and site.is_leader:  # resume round 0: every site starts round 1 again
                log.info("%s: round 1 is not committed at every site; every site starts it again", site.name)
                forget_rounds(self.run_dir, self.federation.site_rank)
            # One starting point for the federation: site 0's initial weights, whatever each site's seed gave.
            load_vector(model, site.link.broadcast(flatten(model.state_dict(), keys), "parameters"), keys)
        self._global_vec, self._keys = flatten(model.state_dict(), keys), keys  # every site holds it; (1) loads it
        if self.precise_bn and not resumed:  # statistics of this site's scans from the first round on
            recompute_site_batchnorm(site, loaders.train, datamodule)
        if self._private is not None:  # DP-SGD: no round starts that would exceed target_epsilon (resume included)
            next_round = steps_per_round(loaders.train, loaders.passes, self.local_steps)
            self.state.stopped |= self._private.federation_budget_spent(site.link, next_round)
        site.call("on_fit_start", trainer=self)

        bar = tqdm(total=self.rounds, initial=self.state.round, desc=f"{site.name} rounds", dynamic_ncols=True,
                   disable=not (self.enable_progress_bar and site.is_leader))
        try:
            while self.state.round < self.rounds and not self.state.stopped:
                metrics = self._run_round(self.state.round, keys, loaders, datamodule)
                bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("train/site/loss", "val/pooled/loss", "val/pooled/mae")})
                bar.update(1)
        finally:
            bar.close()
        if self._average is not None and self._average.average:  # the model after fit is the one last evaluated
            self._average.swap_in(model)
        if self.state.stopped:
            log.info("%s: early stop after round %d (no improvement for %d rounds)",
                     site.name, self.state.round, self.state.rounds_without_improvement)
        site.call("on_fit_end", trainer=self)
        for lg in self.site.loggers:
            lg.finalize("success")

    def validate(self, model: Any, datamodule: Any = None, ckpt_path: str | None = None,
                 dataloaders: DataLoader | list[DataLoader] | None = None) -> dict[str, dict[str, float]]:
        """Evaluate on every site's validation split; per-site and pooled metrics."""
        return self._evaluate_federation("validate", model, datamodule, ckpt_path, dataloaders)

    def test(self, model: Any, datamodule: Any = None, ckpt_path: str | None = None,
             dataloaders: DataLoader | list[DataLoader] | None = None) -> dict[str, dict[str, float]]:
        """Evaluate the best (or given) global model on every site's fixed test split.

        ``ckpt_path=None`` uses the best model of a ``fit`` run by this trainer, else the current weights.
        Only sufficient statistics cross sites, and every site gets the per-site table and the pooled row.
        """
        return self._evaluate_federation("test", model, datamodule, ckpt_path, dataloaders)

    def predict(self, model: Any, datamodule: Any = None, ckpt_path: str | None = None,
                dataloaders: DataLoader | None = None) -> list[Any]:
        """Outputs of ``predict_step`` for this site's scans; nothing crosses a site boundary."""
        loaders = self._stage_model("predict", model, datamodule, ckpt_path, dataloaders)
        self.predictions = evaluation.predict_outputs(self.site, self.site.setup_eval_loader(loaders), datamodule)
        return self.predictions

    # -- One round, top to bottom ------------------------------------------------------------------------
    def _run_round(self, r: int, keys: list[str], loaders: FitLoaders, datamodule: Any) -> dict[str, float]:
        site, link, model, strategy = self.site, self.site.link, self.site.model, self.strategy
        train_loader, val_loader, n_train, passes = loaders.train, loaders.val, loaders.n_train, loaders.passes
        link.bytes_sent = 0
        link.set_stage(f"round {r + 1}")
        site.call("on_round_start", trainer=self, round=r)

        # (1) Global weights in: the aggregated entries every site shares; the rest (BatchNorm statistics under
        # precise_bn, FedBN's batch-norm layers) stays local. The round's learning rate follows the schedule
        # (identical at every site: a function of the round).
        global_vec = self._global_vec
        load_vector(model, global_vec, keys)
        global_params = {k: v.detach().clone() for k, v in model.state_dict().items() if k in set(keys)}
        if self.lr_schedule is not None:
            apply_round_lr(site.optimizer, self.lr_schedule, r, self.rounds, self.state.lr_scale, self.min_lr)

        # (2) Local training, if this site is sampled this round (same draw at every site, no messages).
        t0 = time.perf_counter()
        sampled = self.federation.site_rank in self.sampled_sites(r)
        trained = LocalTraining.skipped()
        if sampled:
            trained = train_locally(site, train_loader, datamodule, strategy, global_params, r, passes,
                                    self.local_steps, privacy=self._private, clip_norm=self.gradient_clip_val)
            self.global_step += trained.steps
        site.call("on_local_train_end", trainer=self, round=r, result=trained)
        t_train = time.perf_counter() - t0

        # (3) Aggregation, owned by the strategy: what this site sends (client_update), then how the sites'
        # contributions combine (aggregate), identically at every site.
        t0 = time.perf_counter()
        context = RoundContext(round=r, seed=self.seed, site_rank=self.federation.site_rank,
                               num_sites=self.federation.num_sites)
        sent = strategy.client_update(flatten(model.state_dict(), keys), global_vec, context)
        weight, self.screening = strategy.site_weight(n_train) if sampled else 0.0, None
        if self.federation.num_sites > 1 and link.masking is None:  # screening: non-finite, extrapolated, outsized
            self.screening = screen_update(  # or flipped updates get weight 0 (directions only where updates may show)
                link, sent, global_vec, weight, self._declared, r, self._site_names, self._checks.layout,
                directions=not individual_updates_hidden(strategy))
            sent, weight = self.screening.params, self.screening.weight
        elif not bool(torch.isfinite(sent).all()):  # masked: no site's statistics cross in clear, and a
            sent, weight = global_vec, 0.0  # non-finite update is never sent (the aggregate checks still apply)
        offer = Contribution(sent, global_vec, weight)
        self._checks.before_aggregate()
        new_global = strategy.aggregate(offer, Collectives(link, r), context)
        load_vector(model, new_global, keys)
        self._global_vec = new_global
        site.call("on_aggregate_end", trainer=self, round=r, global_params=new_global)
        t_agg = time.perf_counter() - t0

        # (4) Every site validates the new global model, with BatchNorm statistics of its own training scans
        # (precise_bn.py); pooled metrics from the sites' summed statistics.
        t0 = time.perf_counter()
        training_weights, average_before = None, None
        if self._average is not None:  # the model evaluated, kept and tested: the average over rounds
            average_before = copy.deepcopy(self._average.state_dict())  # put back if the round is rejected
            self._average.update(model)
            training_weights = self._average.swap_in(model)
        if self.precise_bn:
            recompute_site_batchnorm(site, train_loader, datamodule)
        t_bn = time.perf_counter() - t0
        baseline = evaluation.baseline_prediction(model)
        own = evaluation.evaluate_split(site, val_loader, datamodule, "validation_step", baseline)
        pooled = evaluation.pool_split(link, own)
        site_metrics, pooled_metrics = own.compute(), pooled.compute()
        val_loss = pooled_metrics["loss"]
        t_val = time.perf_counter() - t0
        metrics: dict[str, float] = {"round": float(r + 1)}
        metrics |= {f"val/site/{k}": float(site_metrics.get(k, math.nan)) for k in _ROUND_METRICS}
        metrics |= {f"val/pooled/{k}": float(pooled_metrics.get(k, math.nan)) for k in _ROUND_METRICS}
        site.call("on_validation_end", trainer=self, round=r, metrics=metrics)

        # (5) The round check: every site holds the same result, made by holders of the secret (integrity.py).
        link.check_round(r, round_digest(r, new_global, pooled.loss, pooled.model))
        # Never commit a model that cannot be evaluated (aggregate_checks.py): if the new global model fails a
        # check, every site puts the round's starting model back and the round is not committed.
        rejected = self._checks.verify(self, offer, context, new_global, pooled, self.screening, loaders, datamodule)
        if rejected is not None:  # the round's starting point again: global weights, their average, statistics
            self._global_vec, training_weights = global_vec, None
            if self._average is not None:
                self._average.load_state_dict(average_before)
            if self.precise_bn:
                recompute_site_batchnorm(site, train_loader, datamodule)

        # (6) Identical decisions everywhere: best model (finite losses only), early stopping, LR on plateau.
        has_val = pooled.count > 0 or rejected is not None  # a rejected round is a round without improvement
        improved = self.state.record(r, math.nan if rejected else val_loss, has_val, self.patience, self.min_rounds)
        if self.plateau is not None and has_val and not rejected and self.plateau.step(val_loss):
            self.state.lr_scale *= self.lr_plateau_factor
            log.info("%s: validation loss on a plateau; learning rate now %s", site.name,
                     learning_rates(site.optimizer))
        if self._private is not None:  # DP-SGD: stop before another round exceeds target_epsilon at some site
            next_round = steps_per_round(train_loader, passes, self.local_steps)
            self.state.stopped |= self._private.federation_budget_spent(link, next_round)
        metrics |= {
            "train/site/loss": trained.loss, "train/site/volumes": float(trained.volumes),
            "lr": learning_rates(site.optimizer)[0], "sampled": float(sampled), "rejected": float(bool(rejected)),
            "screened_out": float(len(self.screening.excluded) if self.screening else 0),
            "time/train_s": t_train, "time/data_wait_s": trained.data_wait_s, "time/aggregate_s": t_agg,
            "time/validate_s": t_val, "time/precise_bn_s": t_bn, "bytes_sent": float(link.bytes_sent),
        }
        metrics |= strategy.round_metrics()  # e.g. site-level ε of DP-FedAvg, clipped updates
        if self._private is not None:
            metrics |= self._private.metrics()  # sample-level ε of DP-SGD at this site

        # (7) The round is one commit: its files, then the pointer (commit.py); a Lightning best.ckpt if improved.
        # Training goes on from the round's own weights, which the local record keeps for a resume.
        best = ckpt.lightning_checkpoint(model, epoch=r, global_step=self.global_step) if improved else None
        if training_weights is not None:
            self._average.swap_out(model, training_weights)
        if site.is_leader and not rejected:
            commit_round(
                self.run_dir, self.federation.site_rank, self.state.round,
                shared=ckpt.shared_record(
                    self.state, self.global_state,
                    strategy.state_dict(), self.sampling().as_dict(), learning_rates(site.optimizer),
                    self.plateau.state_dict() if self.plateau is not None else None,
                    self.history_before_resume + self.history + [metrics], self._settings),
                local=ckpt.local_record(self.state.round, model.state_dict(), site.optimizer.state_dict(),
                                        self.global_step, self._private.state_dict() if self._private else None,
                                        self._average.state_dict() if self._average is not None else None),
                best=best,
            )
        if improved:
            self.best_model_path = str(ckpt.site_dir(self.run_dir, self.federation.site_rank) / ckpt.BEST_FILE)

        # (8) One row of history, logged at step = round (1-based), then the round is over.
        self.history.append(metrics)
        if site.is_global_leader:
            write_json(self.run_dir / HISTORY_FILE, self.history_before_resume + self.history)
        site.launched().log_dict({k: v for k, v in metrics.items() if k != "round"}, step=r + 1)
        log.info("%s round %d/%d: train %.4g | pooled val loss %.4g, MAE %.4g | site MAE %.4g | %.1f s",
                 site.name, r + 1, self.rounds, trained.loss, val_loss, metrics["val/pooled/mae"],
                 metrics["val/site/mae"], t_train + t_agg + t_val)
        site.call("on_round_end", trainer=self, round=r, metrics=metrics)
        return metrics

    # -- The parts of a round ----------------------------------------------------------------------------
    def sampled_sites(self, r: int) -> set[int]:
        """Sites that train in round ``r`` (0-based), identical at every site (:class:`SiteSampling`)."""
        return self.sampling().draw(r)

    def sampling(self) -> SiteSampling:
        return SiteSampling(self.seed, self.sites_per_round, self.federation.num_sites)

    def _evaluate_federation(
        self, stage: str, model: Any, datamodule: Any, ckpt_path: str | None, dataloaders: Any
    ) -> dict[str, dict[str, float]]:
        if ckpt_path is None and stage == "test" and self.best_model_path and Path(self.best_model_path).is_file():
            ckpt_path = self.best_model_path
        loaders = self._stage_model(stage, model, datamodule, ckpt_path, dataloaders)
        fingerprint = evaluation_fingerprint(model, self.federation.num_sites)
        secure = secure_aggregation_of(self.strategy)
        if secure is not None and self.site.link.masking is None:  # statistics cross masked, as in fit
            self.site.link.open(fingerprint, declared_examples=None)
            secure.attach(self.site.link)
        return evaluation.evaluation_stage(
            self.site, stage, loaders, datamodule, evaluation.baseline_prediction(model), self.run_name,
            step=max(self.state.round, 1), fingerprint=fingerprint)

    def _stage_model(self, stage: str, model: Any, datamodule: Any, ckpt_path: str | None, loaders: Any) -> Any:
        """Launch, take the stage's loader(s), wrap the model and load ``ckpt_path``; returns the loader(s)."""
        self.site.launch()
        loaders = self.site.stage_loaders(stage, datamodule, loaders)
        self.site.setup(model, with_optimizer=False)
        self.site.load_weights(ckpt_path)
        return loaders


#: The validation metrics logged per round, for the site alone and pooled over the federation.
_ROUND_METRICS = ("loss", "mae", "r", "n", "baseline_mae")


