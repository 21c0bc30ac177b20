"""One site's runtime under Fabric: launching it, wrapping models once, loaders, loggers, who leads.

This is the plumbing every stage (``fit``, ``validate``, ``test``, ``predict``) of the federated trainer
needs before anything federated happens. It is a base class of
:class:`~neurofed.federated.trainer.FederatedTrainer` so that the trainer module holds the federated round
and the stages, and reads top to bottom.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader

from neurofed.federated import state as ckpt
from neurofed.federated.batches import datamodule_loader
from neurofed.federated.config import Federation
from neurofed.federated.site_link import SiteLink

__all__ = ["SiteRuntime", "single_optimizer"]

log = logging.getLogger(__name__)


class SiteRuntime:
    """Fabric, loggers, Fabric-wrapped models and optimizers, and the communication link of one site.

    Arguments are those of :class:`~neurofed.federated.trainer.FederatedTrainer` of the same names.
    """

    def __init__(
        self, precision: str, accelerator: str, devices: int | str, federation: Federation | None,
        logger: bool | Logger | list[Logger], default_root_dir: str, run_name: str | None, seed: int,
        compile: bool, deterministic: bool,
    ) -> None:
        self.precision = precision
        self.accelerator = accelerator
        self.devices = devices
        self.federation = federation if federation is not None else Federation()
        self.default_root_dir = default_root_dir
        self.run_name = run_name or "run"
        self.seed = int(seed)
        self.compile = compile
        self.deterministic = deterministic
        self.loggers: list[Logger] = self._build_loggers(logger)
        self.fabric: Fabric | None = None
        self.site_name = f"site{self.federation.site_rank}"
        self._link: SiteLink | None = None
        self._group_given: Any = None
        self._modules: dict[int, tuple[Any, Any]] = {}  # id(model) -> (Fabric module, Fabric optimizer)

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

    @property
    def group(self) -> Any:
        """The cross-site group; created on first use by the site leader, ``None`` at the other ranks.

        Assign one before ``fit`` to use another transport or to audit the wire (``RecordingGroup``).
        """
        return self._link.group if self._link is not None else self._group_given

    @group.setter
    def group(self, value: Any) -> None:
        self._group_given = value
        if self._link is not None:
            self._link.group = value

    @property
    def link(self) -> SiteLink:
        """Both levels of communication of this site (available once Fabric is launched)."""
        if self._link is None:
            self._link = SiteLink(self._fabric(), self.federation, group=self._group_given)
        return self._link

    def _build_loggers(self, logger: bool | Logger | list[Logger]) -> list[Logger]:
        if logger is True:
            return [CSVLogger(save_dir=str(self.run_dir), name=f"site-{self.federation.site_rank}")]
        if logger is False or logger is None:
            return []
        return list(logger) if isinstance(logger, (list, tuple)) else [logger]

    def close(self) -> None:
        """Leave the federation (the group is kept across fit/validate/test until then)."""
        if self._link is not None:
            self._link.close()
        self._group_given = None

    @staticmethod
    def _load_state(model: nn.Module, weights: dict[str, Tensor]) -> None:
        sd = model.state_dict()
        with torch.no_grad():
            for k, v in weights.items():
                sd[k].copy_(v)

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
            if fabric.device.type == "cuda":
                # Fixed input sizes: let cuDNN pick the fastest 3-D convolution kernels once, as
                # Lightning's Trainer does unless asked for determinism.
                torch.backends.cudnn.benchmark = True
            self.fabric = fabric
        return self.fabric

    def _fabric(self) -> Fabric:
        if self.fabric is None:
            raise RuntimeError("FederatedTrainer: call fit/validate/test/predict first")
        return self.fabric

    def _setup_stage(
        self, stage: str, model: Any, datamodule: Any, ckpt_path: str | None, dataloaders: Any
    ) -> tuple[Any, Any]:
        """Launch, prepare the datamodule, wrap the model and load ``ckpt_path`` for an evaluation stage.

        Returns the Fabric module and the stage's loader(s), taken from the datamodule unless given.
        """
        self._launch()
        if datamodule is not None:
            self._prepare(datamodule, stage)
            if dataloaders is None:
                name = {"test": "test_dataloader", "predict": "predict_dataloader"}.get(stage, "val_dataloader")
                dataloaders = datamodule_loader(datamodule, name)
        if dataloaders is None:
            raise ValueError(f"FederatedTrainer.{stage}: pass a datamodule or dataloaders")
        module, _ = self._setup_model(model, with_optimizer=False)
        self._load_weights(model, ckpt_path)
        return module, dataloaders

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
            if self.compile:
                # In place and forward only: state_dict keys stay the same (no ``_orig_mod.`` prefix), so
                # aggregation and checkpoints are unchanged, and the step's logging stays out of the graph.
                model.compile()
            module = fabric.setup_module(model)
        if with_optimizer and optimizer is None:
            optimizer = fabric.setup_optimizers(single_optimizer(model.configure_optimizers()))
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
        """The site's dataset name; a site pooling several roots (centralized training) joins their names."""
        names = getattr(datamodule, "site_names", None)
        return "+".join(str(n) for n in names) if names else f"site{self.federation.site_rank}"


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
