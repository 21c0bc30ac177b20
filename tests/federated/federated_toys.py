"""A toy brain-age setting for trainer tests: tiny 3-D volumes, a conv + batch-norm regressor, per-site data.

The module and data module follow the batch format and step contracts of docs/architecture.md, so the trainer is
exercised exactly as with the real models, in well under a second per round.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from timeouts import STARTUP_S, scaled
from torch import nn
from torch.utils.data import DataLoader, Dataset

from neurofed.federated.simulate import free_port  # noqa: F401 - one free_port for every test


class LocalSnapshots:
    """A round hook keeping a copy of the site's model right after local training (before aggregation)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_local_train_end(self, trainer, round, result) -> None:
        if result.steps:
            self.states.append(state_of(trainer.site.model))


class ToyRegressor(L.LightningModule):
    """Conv3d -> (BatchNorm3d) -> ReLU -> pool -> dropout -> Linear, output centred on ``target_mean``.

    ``loss_scale=0`` with SGD and ``bn=False`` gives a model that cannot change: its validation loss stays
    exactly constant (for early-stopping and LR-plateau tests).
    """

    def __init__(self, lr: float = 0.05, optimizer: str = "adam", bn: bool = True, dropout: float = 0.2,
                 loss_scale: float = 1.0, log_steps: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4) if bn else nn.Identity()
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(4, 1)
        self.register_buffer("target_mean", torch.zeros(()))

    def set_target_mean(self, value: float) -> None:
        self.target_mean.fill_(float(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.bn(self.conv(x.float())))).flatten(1)
        return self.target_mean + self.head(self.drop(h)).squeeze(1)

    def _step(self, batch: dict) -> dict:
        pred = self(batch["image"])
        loss = nn.functional.l1_loss(pred, batch["target"])
        return {"loss": loss, "pred": pred.detach().float(), "target": batch["target"]}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch)["loss"]
        if self.hparams.log_steps:  # a user's own self.log calls reach the trainer's loggers
            self.log("train/loss", loss)
        return loss * self.hparams.loss_scale

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        out = self._step(batch)
        if self.hparams.log_steps:
            self.log("val/loss_step", out["loss"])
        return out

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._step(batch)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"pred": self(batch["image"]), "target": batch["target"], "participant_id": batch["participant_id"],
                "session": batch["session"], "site": batch["site"]}

    def configure_optimizers(self):
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": torch.optim.Adam(self.parameters(), lr=self.hparams.lr)}


class ToyVolumes(Dataset):
    """Random 8^3 volumes; the target is a linear function of the mean intensity (learnable)."""

    def __init__(self, n: int, seed: int, shift: float = 0.0, site: str = "toy") -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = (torch.randn(n, 1, 8, 8, 8, generator=g) + shift).half()
        self.targets = (40.0 + 20.0 * self.images.float().mean(dim=(1, 2, 3, 4)) * 4).float()
        self.site = site

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "target": self.targets[i], "participant_id": f"sub-{i:03d}",
                "session": "", "site": self.site}


class ToyDataModule(L.LightningDataModule):
    """One site's splits; ``test_roots > 1`` mimics a site that pools several roots (a list of test loaders)."""

    def __init__(self, n_train: int = 16, n_val: int = 8, n_test: int = 8, seed: int = 0, shift: float = 0.0,
                 batch_size: int = 4, name: str = "toy", test_roots: int = 1, generator_seed: int | None = None) -> None:
        super().__init__()
        self.n_train, self.n_val, self.n_test, self.seed = n_train, n_val, n_test, seed
        self.shift, self.batch_size, self.name, self.test_roots = shift, batch_size, name, test_roots
        self.prepared = False
        self.generator_seed = generator_seed  # shuffle with the loader's own generator, like BrainMRIDataModule

    @property
    def site_names(self) -> list[str]:
        return [self.name] if self.test_roots == 1 else [f"{self.name}{j}" for j in range(self.test_roots)]

    def prepare_data(self) -> None:
        self.prepared = True

    def setup(self, stage: str) -> None:
        self.train = ToyVolumes(self.n_train, 1000 + self.seed, self.shift, self.name)
        self.val = ToyVolumes(self.n_val, 2000 + self.seed, self.shift, self.name)
        self.tests = [ToyVolumes(self.n_test, 3000 + self.seed + j, self.shift, self.name) for j in range(self.test_roots)]

    def train_target_stats(self) -> tuple[float, int]:
        return float(self.train.targets.sum()), len(self.train)

    def _add_augment(self, items: list[dict]) -> dict:
        batch = torch.utils.data.default_collate(items)
        batch["augment"] = torch.ones(len(items), dtype=torch.bool)
        return batch

    def train_dataloader(self) -> DataLoader:
        generator = None if self.generator_seed is None else torch.Generator().manual_seed(self.generator_seed)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, collate_fn=self._add_augment,
                          generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)

    def test_dataloader(self):
        loaders = [DataLoader(t, batch_size=self.batch_size) for t in self.tests]
        return loaders[0] if self.test_roots == 1 else loaders

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Random intensity jitter on training batches: uses the global RNG like GPU augmentation does."""
        if "augment" in batch:
            batch.pop("augment")
            batch["image"] = batch["image"] + 0.05 * torch.randn_like(batch["image"].float()).half()
        return batch


class CrashAfter:
    """A round hook that stops the process's fit after round ``n`` is committed, as a crash would."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_round_end(self, trainer, round, metrics) -> None:
        if round + 1 == self.n:
            raise RuntimeError("crash")


def site_data(rank: int, **kw) -> ToyDataModule:
    """Site ``rank``'s data: different subjects, sizes and intensity shifts per site."""
    defaults = dict(n_train=12 + 4 * rank, seed=rank, shift=0.5 * rank, name=f"toy{rank}")
    defaults.update(kw)
    return ToyDataModule(**defaults)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k].float() - b[k].float()).abs().max()})"


def run_processes(target, args_list: list[tuple], timeout: float | None = None) -> None:
    """Run ``target(*args)`` for each args tuple in its own spawned process; fail if any fails or hangs."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    timeout = timeout if timeout is not None else scaled(STARTUP_S + 60)
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, f"{len(alive)} site process(es) did not finish within {timeout} s"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * len(procs), f"site processes exited with {codes}"


def quiet_process() -> None:
    """Settings for a site process in a test: one thread, deterministic kernels."""
    torch.set_num_threads(1)
