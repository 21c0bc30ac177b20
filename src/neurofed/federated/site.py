"""One site of a federation: its Fabric, its link to the other sites, its loggers, its model and optimizer.

The :class:`~neurofed.federated.trainer.FederatedTrainer` *has* a site; everything a stage (``fit``,
``validate``, ``test``, ``predict``) needs before anything federated happens lives here: launching Fabric
(one process, DDP over the site's GPUs, or several nodes under ``torchrun``/SLURM), wrapping the model
and building its optimizer once, sharding evaluation loaders, loading weights, and reseeding before each
local pass. Names used the same way everywhere: ``model`` is the user's LightningModule, ``wrapped`` is
Fabric's wrapper of it (what runs the steps), ``optimizer`` is Fabric's wrapper of its optimizer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.loggers import CSVLogger, Logger
from torch.utils.data import DataLoader

from neurofed.federated import state as ckpt
from neurofed.federated.batches import datamodule_loader
from neurofed.federated.config import Federation
from neurofed.federated.site_link import SiteLink
from neurofed.lightning_compat import replace_sampler

__all__ = ["LOCAL_PASS_STREAM", "Site", "build_loggers", "single_optimizer"]

log = logging.getLogger(__name__)

#: Seed stream of local training passes (data order, dropout, augmentation). A new use of randomness gets
#: its own stream number, so adding it never shifts the draws of an existing one.
LOCAL_PASS_STREAM = 0


def build_loggers(logger: bool | Logger | Sequence[Logger] | None, run_dir: Path, site_rank: int) -> list[Logger]:
    """``True``: a CSV logger under ``run_dir/site-<rank>``; ``False``/``None``: none; else the loggers given."""
    if logger is True:
        return [CSVLogger(save_dir=str(run_dir), name=f"site-{site_rank}")]
    if logger is False or logger is None:
        return []
    return list(logger) if isinstance(logger, (list, tuple)) else [logger]


class Site:
    """A site's runtime. Arguments are those of :class:`~neurofed.federated.trainer.FederatedTrainer`.

    Args:
        federation: Where this site sits in the federation.
        run_dir: Folder of the run's checkpoints and logs.
        seed: Seed of weight initialisation, data order and augmentation.
        precision, accelerator, devices, num_nodes: Fabric's settings for this site's processes.
        loggers: Lightning loggers of this site.
        callbacks: Objects whose round hooks the trainer calls (see :mod:`~neurofed.federated.callbacks`).
        compile: ``torch.compile`` the model's forward before training.
        deterministic: Deterministic algorithms on CPU (bit-reproducible results).
    """

    def __init__(
        self, federation: Federation, run_dir: Path, seed: int = 0, precision: str = "32-true",
        accelerator: str = "auto", devices: int | str = 1, num_nodes: int = 1, loggers: Sequence[Logger] = (),
        callbacks: Sequence[Any] = (), compile: bool = False, deterministic: bool = True,
    ) -> None:
        self.federation = federation
        self.run_dir = Path(run_dir)
        self.seed = int(seed)
        self.precision, self.accelerator, self.devices, self.num_nodes = precision, accelerator, devices, num_nodes
        self.loggers = list(loggers)
        self.callbacks = list(callbacks)
        self.compile = compile
        self.deterministic = deterministic
        self.name = f"site{federation.site_rank}"
        self.fabric: Fabric | None = None
        self.model: Any = None
        self.wrapped: Any = None
        self.optimizer: Any = None
        self._link: SiteLink | None = None
        self._group_given: Any = None

    # ------------------------------------------------------------------------------------------------
    # Who leads, and the link to the other sites
    # ------------------------------------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        """Global rank 0 of this site's processes (over all its nodes): the one that talks to the other sites
        and writes files."""
        if self.fabric is not None:
            return self.fabric.global_rank == 0
        return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0

    @property
    def is_global_leader(self) -> bool:
        """Leader of site 0: prints the federation's tables and writes run-wide files."""
        return self.is_leader and self.federation.site_rank == 0

    @property
    def link(self) -> SiteLink:
        """Both levels of communication of this site (available once launched)."""
        if self._link is None:
            self._link = SiteLink(self.launched(), self.federation, group=self._group_given)
        return self._link

    @property
    def group(self) -> Any:
        """The cross-site group; created on first use by the leader, ``None`` at the other ranks.

        Assign one before ``fit`` to use another transport or to audit the wire (``RecordingGroup``).
        """
        return self._link.group if self._link is not None else self._group_given

    @group.setter
    def group(self, value: Any) -> None:
        self._group_given = value
        if self._link is not None:
            self._link.group = value

    def close(self) -> None:
        """Leave the federation (the group is kept across fit/validate/test until then)."""
        if self._link is not None:
            self._link.close()
        self._group_given = None

    # ------------------------------------------------------------------------------------------------
    # Fabric
    # ------------------------------------------------------------------------------------------------
    def launch(self) -> Fabric:
        """Start Fabric once: DDP when the site has several devices or nodes, else one process."""
        if self.fabric is None:
            single = str(self.devices) in ("1", "auto") and self.num_nodes == 1
            fabric = Fabric(
                accelerator=self.accelerator, devices=self.devices, num_nodes=self.num_nodes,
                precision=self.precision, strategy="auto" if single else "ddp", loggers=self.loggers,
                callbacks=self.callbacks,
            )
            fabric.launch()
            fabric.seed_everything(self.seed)
            if self.deterministic and fabric.device.type == "cpu":
                torch.use_deterministic_algorithms(True, warn_only=True)
            if fabric.device.type == "cuda":
                # Fixed input sizes: let cuDNN pick the fastest 3-D convolution kernels once, as
                # Lightning's Trainer does unless asked for determinism.
                torch.backends.cudnn.benchmark = True
            self.fabric = fabric
        return self.fabric

    def launched(self) -> Fabric:
        """The launched Fabric; a clear error before the first stage."""
        if self.fabric is None:
            raise RuntimeError("FederatedTrainer: call fit/validate/test/predict first")
        return self.fabric

    def call(self, hook: str, *args: Any, **kwargs: Any) -> None:
        """Call ``hook`` on every callback that has it."""
        self.launched().call(hook, *args, **kwargs)

    # ------------------------------------------------------------------------------------------------
    # Data, model, weights
    # ------------------------------------------------------------------------------------------------
    def prepare(self, datamodule: Any, stage: str) -> None:
        """``prepare_data`` once per node (rank 0 first), then ``setup(stage)`` at every rank; names the site."""
        fabric = self.launched()
        with fabric.rank_zero_first(local=True):
            if fabric.local_rank == 0 and hasattr(datamodule, "prepare_data"):
                datamodule.prepare_data()
        if hasattr(datamodule, "setup"):
            datamodule.setup(stage)
        names = getattr(datamodule, "site_names", None)
        # A site pooling several roots (centralized training) joins their names.
        self.name = "+".join(str(n) for n in names) if names else f"site{self.federation.site_rank}"

    def stage_loaders(self, stage: str, datamodule: Any, loaders: Any) -> Any:
        """The loader(s) of ``stage``: those given, else the datamodule's."""
        if datamodule is not None:
            self.prepare(datamodule, stage)
            if loaders is None:
                name = {"fit": "train_dataloader", "test": "test_dataloader",
                        "predict": "predict_dataloader"}.get(stage, "val_dataloader")
                loaders = datamodule_loader(datamodule, name)
        if loaders is None:
            raise ValueError(f"FederatedTrainer.{stage}: pass a datamodule or dataloaders")
        return loaders

    def setup(self, model: Any, with_optimizer: bool, privacy: Any = None) -> None:
        """Fabric-wrap ``model`` (once per model) and build its optimizer once.

        Keeping the optimizer across rounds and stages is what makes a one-site federation equal to
        centralized training; passing another model object starts over with it. With ``privacy`` (a
        :class:`~neurofed.federated.dp_sgd.PrivateSite`), DP-SGD's hooks go on the raw module before Fabric
        wraps it, and its DP optimizer wraps the module's optimizer.
        """
        fabric = self.launched()
        if model is not self.model:
            if privacy is not None:
                if fabric.world_size > 1:
                    raise ValueError("DP-SGD runs on one device per site for now; use devices=1, num_nodes=1")
                privacy.attach_hooks(model)
            if self.compile:
                # In place and forward only: state_dict keys stay the same (no ``_orig_mod.`` prefix), so
                # aggregation and checkpoints are unchanged.
                model.compile()
            self.model, self.wrapped, self.optimizer = model, fabric.setup_module(model), None
        if with_optimizer and self.optimizer is None:
            optimizer = single_optimizer(model.configure_optimizers())
            if privacy is not None:
                optimizer = privacy.wrap_optimizer(optimizer)
            self.optimizer = fabric.setup_optimizers(optimizer)

    def setup_eval_loader(self, loader: Any) -> Any:
        """Shard an evaluation loader over the site's ranks without padding (sums must count each scan once)."""
        if loader is None:
            return None
        fabric = self.launched()
        if fabric.world_size > 1 and isinstance(loader, DataLoader):
            from lightning.pytorch.overrides.distributed import (
                UnrepeatedDistributedSampler,
            )

            sampler = UnrepeatedDistributedSampler(
                loader.dataset, num_replicas=fabric.world_size, rank=fabric.global_rank, shuffle=False
            )
            loader = replace_sampler(loader, sampler)
        return fabric.setup_dataloaders(loader, use_distributed_sampler=False)

    def load_weights(self, ckpt_path: str | None) -> None:
        """Load ``"best"``, ``"last"`` or a checkpoint path into the model (nothing for ``None``)."""
        if ckpt_path is None:
            return
        path = ckpt.resolve_weights_path(ckpt_path, self.run_dir, self.federation.site_rank)
        weights, strict = ckpt.weights_from_checkpoint(path, self.federation.site_rank)
        if strict:
            self.model.load_state_dict(weights)
        else:
            entries = self.model.state_dict()
            with torch.no_grad():
                for k, v in weights.items():
                    entries[k].copy_(v)
        log.info("%s: loaded weights from %s", self.name, path)

    def reseed(self, stream: int, key: int) -> None:
        """Seed every generator from (seed, stream, key, site, rank) alone, so draws never depend on history.

        A resumed run therefore repeats an uninterrupted one, and every rank and site draws differently.
        """
        entropy = [self.seed, stream, key, self.federation.site_rank, self.launched().global_rank]
        seed_everything(int(np.random.SeedSequence(entropy).generate_state(1)[0]), workers=True, verbose=False)


def single_optimizer(configured: Any) -> torch.optim.Optimizer:
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
