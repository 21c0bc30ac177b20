"""DP-SGD at each site, end to end on CPU: SFCN-GroupNorm on tiny 3-D volumes, ε equal to Opacus' own answer."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from federated_toys import ToyRegressor, site_data
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from neurofed.federated import FederatedTrainer
from neurofed.federated.dp_sgd import DPSGD, PrivateSite, is_empty_batch, poisson_loader
from neurofed.federated.dp_sgd_callback import DPSGDCallback
from neurofed.models import BrainAgeModule

N_TRAIN, BATCH = 16, 4  # sample rate q = 0.25, 4 Poisson batches per epoch


def _model() -> BrainAgeModule:
    return BrainAgeModule(channels=(4, 4, 4), norm="group", loss="l1", dropout=0.0, channels_last=False, lr=1e-2)


def _fit(tmp_path, privacy: DPSGD, rounds: int = 2, seed: int = 0):
    L.seed_everything(seed)
    model = _model()
    trainer = FederatedTrainer(rounds=rounds, privacy=privacy, accelerator="cpu", logger=False, seed=seed,
                               enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.fit(model, site_data(0, n_train=N_TRAIN, batch_size=BATCH))
    return trainer, model


def _reference(accountant, sigma: float, steps: int, delta: float) -> float:
    accountant.history = [(sigma, BATCH / N_TRAIN, steps)]
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize(("mechanism", "accountant"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_per_round_is_the_accountants_own_answer(tmp_path, mechanism, accountant) -> None:
    settings = DPSGD(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-3, accountant=mechanism)
    trainer, _ = _fit(tmp_path, settings)
    assert len(trainer.history) == 2
    for r, row in enumerate(trainer.history, start=1):
        expected = _reference(accountant(), 1.1, steps=4 * r, delta=1e-3)
        assert row["privacy/epsilon"] == pytest.approx(expected, rel=1e-9)
        assert row["privacy/delta"] == 1e-3 and row["privacy/sample_rate"] == 0.25
    assert trainer.history[1]["privacy/epsilon"] > trainer.history[0]["privacy/epsilon"] > 0
    assert trainer._private.steps == 8


def test_target_epsilon_chooses_sigma_and_is_not_exceeded(tmp_path) -> None:
    trainer, _ = _fit(tmp_path, DPSGD(target_epsilon=3.0, max_grad_norm=1.0, delta=1e-3), rounds=2)
    sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-3, sample_rate=0.25, steps=8)
    assert trainer._private.noise_multiplier == pytest.approx(sigma)
    final = trainer.history[-1]["privacy/epsilon"]
    assert len(trainer.history) == 2 and 2.9 <= final <= 3.0


def test_training_stops_before_a_round_would_exceed_target_epsilon(tmp_path) -> None:
    eps1, eps2 = (_reference(RDPAccountant(), 1.0, steps, 1e-3) for steps in (4, 8))
    trainer, _ = _fit(tmp_path, DPSGD(noise_multiplier=1.0, target_epsilon=(eps1 + eps2) / 2, delta=1e-3), rounds=5)
    assert len(trainer.history) == 1 and trainer.state.stopped
    assert trainer.history[0]["privacy/epsilon"] == pytest.approx(eps1)


def test_same_seed_same_private_model_and_noise_changes_it(tmp_path) -> None:
    settings = DPSGD(noise_multiplier=1.0, max_grad_norm=0.5, delta=1e-3)
    _, a = _fit(tmp_path / "a", settings, rounds=1)
    _, b = _fit(tmp_path / "b", settings, rounds=1)
    _, c = _fit(tmp_path / "c", settings, rounds=1, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_batchnorm_is_refused_with_the_fix(tmp_path) -> None:
    trainer = FederatedTrainer(rounds=1, privacy=DPSGD(noise_multiplier=1.0), accelerator="cpu", logger=False,
                               enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"BatchNorm3d.*norm='group'"):
        trainer.fit(ToyRegressor(bn=True), site_data(0))
    with pytest.raises(ValueError, match="noise_multiplier.*target_epsilon"):
        DPSGD()


class _PoissonData(L.LightningDataModule):
    """A site's data for Lightning's Trainer, with the recipe's Poisson training loader."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = site_data(0, n_train=N_TRAIN, batch_size=BATCH)

    def setup(self, stage: str) -> None:
        self.inner.setup(stage)

    def train_dataloader(self):
        return poisson_loader(self.inner.train_dataloader())

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return batch if is_empty_batch(batch) else self.inner.on_after_batch_transfer(batch, dataloader_idx)


def test_lightning_trainer_callback_reports_the_accountants_epsilon(tmp_path) -> None:
    L.seed_everything(0)
    dp = DPSGDCallback(DPSGD(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-3))
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(max_epochs=2, callbacks=[dp], accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=_PoissonData())
    assert dp.private.steps == 8
    assert dp.epsilon() == pytest.approx(_reference(RDPAccountant(), 1.1, steps=8, delta=1e-3), rel=1e-9)
    assert trainer.callback_metrics["privacy/epsilon"].item() == pytest.approx(dp.epsilon(), rel=1e-6)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="poisson_loader"):
        L.Trainer(max_epochs=1, callbacks=[DPSGDCallback(DPSGD(noise_multiplier=1.0))], accelerator="cpu",
                  logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(_model(), datamodule=site_data(0))


def test_an_empty_poisson_draw_is_a_noise_only_step_that_is_accounted() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    data = torch.utils.data.TensorDataset(torch.zeros(8, 3))
    loader = poisson_loader(torch.utils.data.DataLoader(data, batch_size=2))
    private = PrivateSite(DPSGD(noise_multiplier=1.0, max_grad_norm=1.0), loader, planned_steps=4)
    private.attach_hooks(model)
    optimizer = private.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1.0))
    before = model[0].weight.detach().clone()
    private.empty_step(optimizer)
    assert private.steps == 1 and not torch.equal(before, model[0].weight)  # moved by the noise alone
    assert is_empty_batch(loader.collate_fn([])) and not is_empty_batch({"image": 1})


def test_a_resumed_run_keeps_the_budget_already_spent(tmp_path) -> None:
    settings = DPSGD(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-3)
    _fit(tmp_path, settings, rounds=1)
    L.seed_everything(0)
    trainer = FederatedTrainer(rounds=2, privacy=settings, accelerator="cpu", logger=False, enable_progress_bar=False,
                               default_root_dir=str(tmp_path))
    trainer.fit(_model(), site_data(0, n_train=N_TRAIN, batch_size=BATCH), ckpt_path="last")
    assert trainer.history[-1]["privacy/epsilon"] == pytest.approx(_reference(RDPAccountant(), 1.1, 8, 1e-3), rel=1e-9)
