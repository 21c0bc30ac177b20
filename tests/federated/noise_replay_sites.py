"""Child processes of the noise-replay attack: a victim site and a curious site that tries to strip its noise.

Both sites train one DP-SGD step (SGD, lr 1) with plain FedAvg. The curious site knows what every site knows —
the run's seed, the victim's rank, the global model and its example count — and recovers the victim's update
from the aggregate. It then reruns the victim's step on its own data of the same size, posing as the victim's
seat, to obtain the victim's noise and subtract it. The victim records its true noise-free update (what the
DP optimizer summed before adding noise) so the test can score the attack.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from federated_toys import ToyRegressor, quiet_process, site_data
from timeouts import scaled

from neurofed.federated import DPSGD, FederatedTrainer, Federation

SEED, N_TRAIN, BATCH, LR = 3, 16, 4, 1.0
PRIVACY = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3)


def _model() -> ToyRegressor:
    return ToyRegressor(optimizer="sgd", lr=LR, bn=False, dropout=0.0, log_steps=False)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


class CleanUpdate:
    """Round hook: wraps the DP optimizer's ``add_noise`` to keep ``−lr · Σ clipped gradients / B`` (no noise),
    and keeps the global model at the round's start and this site's model after local training."""

    def __init__(self) -> None:
        self.clean: torch.Tensor | None = None
        self.start: torch.Tensor | None = None
        self.trained: torch.Tensor | None = None

    def on_fit_start(self, trainer) -> None:
        dp = trainer.site.optimizer.optimizer
        add_noise = dp.add_noise

        def recording_add_noise():
            self.clean = -LR * _flat(p.summed_grad for p in dp.params) / dp.expected_batch_size
            add_noise()

        dp.add_noise = recording_add_noise

    def on_round_start(self, trainer, round) -> None:
        self.start = _flat(trainer.site.model.parameters())

    def on_local_train_end(self, trainer, round, result) -> None:
        self.trained = _flat(trainer.site.model.parameters())


def _trainer(federation: Federation, out: str, name: str, hook: CleanUpdate) -> FederatedTrainer:
    return FederatedTrainer(rounds=1, local_steps=1, privacy=PRIVACY, seed=SEED, federation=federation,
                            accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=out,
                            run_name=name, callbacks=[hook])


def site(rank: int, port: int, out: str) -> None:
    quiet_process()
    L.seed_everything(SEED)
    hook = CleanUpdate()
    trainer = _trainer(Federation(port=port, site_rank=rank, num_sites=2, timeout_s=scaled(60)), out, f"site{rank}", hook)
    model = _model()
    trainer.fit(model, site_data(rank, n_train=N_TRAIN, batch_size=BATCH))
    trainer.close()
    if rank == 0:  # the victim: only its ground truth, for scoring
        torch.save({"clean": hook.clean, "start": hook.start, "trained": hook.trained}, Path(out) / "victim.pt")
        return

    # The curious site. 1. The victim's model after its step, from the weighted mean it received.
    n0, n1 = trainer._declared
    aggregate = _flat(model.parameters())
    victim_trained = (aggregate * (n0 + n1) - hook.trained * n1) / n0
    # 2. Rerun the victim's step on its own data of the same size, in the victim's seat (site 0, same seed).
    replica_hook = CleanUpdate()
    replica = _model()
    with torch.no_grad():
        for p, v in zip(replica.parameters(), torch.split(hook.start, [p.numel() for p in replica.parameters()])):
            p.copy_(v.view_as(p))
    _trainer(Federation(), out, "replica", replica_hook).fit(replica, site_data(rank, n_train=N_TRAIN, batch_size=BATCH))
    replica_noisy_update = replica_hook.trained - hook.start
    # 3. Same noise in both steps would cancel: the victim's noise-free update is its noisy update minus
    # the replica's noisy update plus the replica's own noise-free update.
    estimate = (victim_trained - hook.start) - replica_noisy_update + replica_hook.clean
    torch.save({"estimate": estimate, "victim_trained": victim_trained}, Path(out) / "attacker.pt")
