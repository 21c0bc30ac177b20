"""DP-SGD at each site, end to end on CPU: SFCN-GroupNorm on tiny 3-D volumes, ε equal to Opacus' own answer."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from federated_toys import ToyRegressor, site_data
from timeouts import STARTUP_S, scaled
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from neurofed.federated import FederatedTrainer
from neurofed.federated.dp_sgd import DPSGD, PrivateSite, is_empty_batch, poisson_loader
from neurofed.federated.dp_sgd_callback import DPSGDCallback
from neurofed.models import BrainAgeModule

N_TRAIN, BATCH = 16, 4  # sample rate q = 0.25, 4 Poisson batches per epoch


def _model() -> BrainAgeModule:
    return BrainAgeModule(channels=(4, 4, 4), norm="group", loss="l1", dropout=0.0, channels_last=False, lr=1e-2)


def _fit(tmp_path, privacy: DPSGD | None, rounds: int = 2, seed: int = 0):
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


def test_same_seed_different_private_models_the_noise_is_not_the_seeds(tmp_path) -> None:
    """Sampling and noise come from the operating system's entropy: two private runs with one seed differ,
    while the same two runs without privacy are bit-identical (the seed still fixes everything else)."""
    settings = DPSGD(noise_multiplier=1.0, max_grad_norm=0.5, delta=1e-3)
    _, a = _fit(tmp_path / "a", settings, rounds=1)
    _, b = _fit(tmp_path / "b", settings, rounds=1)
    sa, sb = a.state_dict(), b.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)
    _, c = _fit(tmp_path / "c", None, rounds=1)
    _, d = _fit(tmp_path / "d", None, rounds=1)
    assert all(torch.equal(c.state_dict()[k], d.state_dict()[k]) for k in c.state_dict())


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


class _CrashAtRound:
    """Round hook: the process dies (a BaseException nothing catches) when round ``at`` (0-based) starts."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_round_start(self, trainer, round):
        if round == self.at:
            raise KeyboardInterrupt


def _resumable_fit(tmp_path, privacy: DPSGD, rounds: int, crash_at: int | None = None, ckpt_path=None):
    L.seed_everything(0)
    trainer = FederatedTrainer(rounds=rounds, privacy=privacy, accelerator="cpu", logger=False,
                               enable_progress_bar=False, default_root_dir=str(tmp_path),
                               callbacks=[_CrashAtRound(crash_at)] if crash_at is not None else [])
    try:
        trainer.fit(_model(), site_data(0, n_train=N_TRAIN, batch_size=BATCH), ckpt_path=ckpt_path)
    except KeyboardInterrupt:
        pass
    return trainer


def _recorded_history(tmp_path) -> list[tuple]:
    from neurofed.federated.checkpoint_io import load
    from neurofed.federated.commit import committed_rounds, round_dir

    newest = committed_rounds(tmp_path / "run", 0)[0]
    return [tuple(h) for h in load(round_dir(tmp_path / "run", 0, newest) / "local.pt")["privacy"]["history"]]


def test_a_crashed_run_resumed_at_another_sigma_reports_the_independently_recomputed_epsilon(tmp_path) -> None:
    q = BATCH / N_TRAIN
    crashed = _resumable_fit(tmp_path, DPSGD(noise_multiplier=0.8, delta=1e-3), rounds=4, crash_at=2)
    assert len(crashed.history) == 2 and _recorded_history(tmp_path) == [(0.8, q, 8)]
    resumed = _resumable_fit(tmp_path, DPSGD(noise_multiplier=4.0, delta=1e-3), rounds=4, ckpt_path="last")
    assert [h["round"] for h in resumed.history] == [3.0, 4.0]
    # past steps keep their σ; the resumed ones use the new one
    assert _recorded_history(tmp_path) == [(0.8, q, 8), (4.0, q, 8)]
    independent = RDPAccountant()
    independent.history = [(0.8, q, 8), (4.0, q, 8)]
    reported = resumed.history[-1]["privacy/epsilon"]
    assert reported == pytest.approx(independent.get_epsilon(delta=1e-3), rel=1e-12)
    replayed_at_new_sigma = _reference(RDPAccountant(), 4.0, 16, 1e-3)  # the accounting a resume must not do
    assert reported > 5 * replayed_at_new_sigma


def test_target_epsilon_holds_across_a_crash_and_a_resume(tmp_path) -> None:
    target = 3.0
    _resumable_fit(tmp_path, DPSGD(target_epsilon=target, delta=1e-3), rounds=4, crash_at=2)
    first_sigma = _recorded_history(tmp_path)[0][0]
    resumed = _resumable_fit(tmp_path, DPSGD(target_epsilon=target, delta=1e-3), rounds=4, ckpt_path="last")
    history = _recorded_history(tmp_path)
    assert [h[2] for h in history] == [8, 8] and history[0][0] == first_sigma
    independent = RDPAccountant()
    independent.history = history
    true_epsilon = independent.get_epsilon(delta=1e-3)
    assert resumed.history[-1]["privacy/epsilon"] == pytest.approx(true_epsilon, rel=1e-12)
    assert true_epsilon <= target


def test_a_resume_finding_the_budget_spent_trains_no_further_round(tmp_path) -> None:
    eps8 = _reference(RDPAccountant(), 1.0, 8, 1e-3)
    _resumable_fit(tmp_path, DPSGD(noise_multiplier=1.0, delta=1e-3), rounds=2)
    resumed = _resumable_fit(tmp_path, DPSGD(noise_multiplier=1.0, target_epsilon=eps8 * 1.01, delta=1e-3), rounds=4,
                             ckpt_path="last")
    assert resumed.history == [] and resumed.state.stopped
    assert _recorded_history(tmp_path) == [(1.0, BATCH / N_TRAIN, 8)]


def test_the_lightning_callback_keeps_its_budget_across_a_checkpoint_resume(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(epochs, callback):
        return L.Trainer(max_epochs=epochs, callbacks=[callback, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
                         accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))

    L.seed_everything(0)
    first = DPSGDCallback(DPSGD(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-3))
    trainer(1, first).fit(_model(), datamodule=_PoissonData())
    L.seed_everything(0)
    second = DPSGDCallback(DPSGD(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-3))
    trainer(2, second).fit(_model(), datamodule=_PoissonData(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert second.private.steps == 8
    assert second.epsilon() == pytest.approx(_reference(RDPAccountant(), 1.1, steps=8, delta=1e-3), rel=1e-12)


@pytest.mark.slow
def test_a_site_that_replays_the_victims_step_cannot_remove_its_noise(tmp_path) -> None:
    """The attack on seeded noise: a second site reruns the victim's DP-SGD step on its own data of the same
    size, in the victim's seat and with the run's seed, and subtracts the noise it obtains. With noise drawn
    from each site's own entropy the estimate is as far from the truth as the noisy update itself."""
    from federated_toys import free_port, run_processes
    from noise_replay_sites import site

    port = free_port()
    run_processes(site, [(k, port, str(tmp_path)) for k in range(2)], timeout=scaled(STARTUP_S + 180))
    victim = torch.load(tmp_path / "victim.pt", weights_only=True)
    attacker = torch.load(tmp_path / "attacker.pt", weights_only=True)
    truth = victim["clean"]
    # the curious site did read the victim's noisy model exactly from the aggregate
    torch.testing.assert_close(attacker["victim_trained"], victim["trained"], rtol=0, atol=1e-5)
    noisy = victim["trained"] - victim["start"]
    noise_to_signal = float((noisy - truth).norm() / truth.norm())
    attack_error = float((attacker["estimate"] - truth).norm() / truth.norm())
    assert noise_to_signal > 1.0  # the noise dominates the update, so stripping it would matter
    # seeded noise let this estimate reach ~1e-6; now it is no closer than the noisy update (√2 × on average)
    assert attack_error > 0.5 * noise_to_signal, (attack_error, noise_to_signal)


def test_the_privacy_unit_is_a_scan_and_a_patient_with_k_scans_gets_k_epsilon() -> None:
    from types import SimpleNamespace

    from neurofed.federated.dp_sgd import scans_per_patient

    records = [SimpleNamespace(participant_id=p) for p in ("sub-01", "sub-01", "sub-02", "sub-03", "sub-03", "sub-03")]
    dataset = SimpleNamespace(records=records, __len__=lambda: 6)
    assert scans_per_patient(dataset) == 3 and scans_per_patient(torch.utils.data.TensorDataset(torch.zeros(2))) is None
    data = torch.utils.data.TensorDataset(torch.zeros(8, 3))
    loader = poisson_loader(torch.utils.data.DataLoader(data, batch_size=2))
    private = PrivateSite(DPSGD(noise_multiplier=1.0, delta=1e-5), loader, planned_steps=4, history=[(1.0, 0.25, 4)],
                          scans_per_patient=3)
    m = private.metrics()
    assert m["privacy/patient_epsilon"] == pytest.approx(3 * m["privacy/epsilon"], rel=1e-12)
    assert m["privacy/patient_delta"] == pytest.approx(3 * math.exp(2 * m["privacy/epsilon"]) * 1e-5, rel=1e-12)
    assert "privacy/patient_epsilon" not in PrivateSite(DPSGD(noise_multiplier=1.0), loader, 4).metrics()
