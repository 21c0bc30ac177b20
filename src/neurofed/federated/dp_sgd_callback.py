"""DP-SGD under Lightning's ``Trainer``: the same :class:`~neurofed.federated.dp_sgd.PrivateSite`, as a Callback.

Recipe (one device; BatchNorm-free model)::

    class PrivateData(MyDataModule):
        def train_dataloader(self):
            return poisson_loader(super().train_dataloader())     # Poisson sampling at q = batch_size / N

    dp = DPSGDCallback(DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5))
    L.Trainer(max_epochs=5, callbacks=[dp]).fit(BrainAgeModule(norm="group"), PrivateData())
    dp.epsilon()                                                    # also logged as privacy/epsilon

At ``on_train_start`` (after Lightning has built the optimizer and loaded the training loader) the callback
puts the per-example-gradient hooks on the module and replaces the optimizer by the DP optimizer; ε is
logged at the end of every epoch and, with ``target_epsilon``, training stops before an epoch would exceed
it. The accountant's history is part of the callback's state in every Lightning checkpoint, so
``Trainer.fit(ckpt_path=...)`` goes on from the budget already spent (past steps keep their σ and q). A
Poisson draw of no example reaches ``training_step`` as a marker batch
(:func:`~neurofed.federated.dp_sgd.is_empty_batch`): the module returns ``None`` for it (neurofed's modules
do) and the optimizer still takes the noise-only step.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from neurofed.federated.dp_sgd import DPSGD, PrivateSite, scans_per_patient

__all__ = ["DPSGDCallback"]


class DPSGDCallback(Callback):
    """Sample-level DP-SGD for a LightningModule trained by Lightning's ``Trainer``.

    Args:
        settings: The DP-SGD settings.
    """

    def __init__(self, settings: DPSGD) -> None:
        self.settings = settings
        self.private: PrivateSite | None = None
        self._restored: list[tuple[float, float, int]] = []  # a checkpoint's history, applied at on_train_start

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        loader = trainer.train_dataloader
        if getattr(getattr(loader, "batch_sampler", None), "sample_rate", None) is None:
            raise ValueError("DPSGDCallback: the training DataLoader must use Poisson sampling; return "
                             "neurofed.federated.dp_sgd.poisson_loader(loader) from train_dataloader()")
        if trainer.world_size > 1 or len(trainer.optimizers) != 1:
            raise ValueError("DPSGDCallback: one device and one optimizer only (got world_size "
                             f"{trainer.world_size}, {len(trainer.optimizers)} optimizers)")
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else epochs * len(loader)
        self.private = PrivateSite(self.settings, loader, steps, scans_per_patient=scans_per_patient(loader.dataset))
        self.private.attach_hooks(pl_module)
        trainer.strategy.optimizers = [self.private.wrap_optimizer(trainer.optimizers[0])]
        if self._restored:
            self.private.resume_from(self._restored)

    def state_dict(self) -> dict[str, Any]:
        """What a Lightning checkpoint keeps: the accountant's history (never the generators' seeds)."""
        return {"history": self.private.history if self.private is not None else list(self._restored)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = [tuple(h) for h in state_dict.get("history", [])]

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.private is not None:  # sampling and noise: fresh entropy every epoch, never the seed
            self.private.fresh_randomness()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        assert self.private is not None
        pl_module.log_dict(self.private.metrics())
        if self.private.would_exceed(len(trainer.train_dataloader)):
            trainer.should_stop = True

    def epsilon(self) -> float:
        """ε spent so far at the settings' δ."""
        return 0.0 if self.private is None else self.private.epsilon()
