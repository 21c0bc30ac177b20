"""FederatedTrainer: FedAvg over real site processes, centralized = one site, stopping rules, FedBN,
test/predict outputs, Lightning-format best checkpoint, and a clear timeout when the federation is absent."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import pytest
import torch
from timeouts import STARTUP_S, scaled
from federated_toys import (
    LocalSnapshots,
    ToyRegressor,
    assert_identical,
    free_port,
    quiet_process,
    run_processes,
    site_data,
    state_of,
)

from neurofed.federated import FedAvg, FedBN, FederatedTrainer, Federation
from neurofed.federated.group import FederationTimeoutError


def _site_process(rank: int, n: int, port: int, root: str, strategy: str, rounds: int,
                  sites_per_round: int | None = None) -> None:
    quiet_process()
    L.seed_everything(100 + rank)  # different initialisations: the trainer must start all from site 0's
    model = ToyRegressor()
    data = site_data(rank)
    snapshots = LocalSnapshots()
    trainer = FederatedTrainer(
        rounds=rounds, callbacks=[snapshots], accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=root,
        strategy=FedBN() if strategy == "fedbn" else FedAvg(), sites_per_round=sites_per_round,
        federation=Federation(port=port, site_rank=rank, num_sites=n, timeout_s=scaled(60)),
    )
    trainer.fit(model, data)
    fitted = state_of(model)  # the last round's global model; test() loads the best round's
    results = trainer.test(model, data)
    trainer.close()
    torch.save(
        {"local": snapshots.states[-1] if snapshots.states else None, "final": state_of(model), "fitted": fitted,
         "n_train": data.n_train, "test": results, "keys": trainer.strategy.aggregated_keys(model.state_dict(), model),
         "trained_rounds": len(snapshots.states), "sampled": [h["sampled"] for h in trainer.history],
         "draws": [trainer.sampled_sites(r) for r in range(rounds)]},
        Path(root) / f"result-{rank}.pt",
    )


def _run_federation(tmp_path: Path, n: int, strategy: str, rounds: int, sites_per_round: int | None = None) -> list[dict]:
    port = free_port()
    run_processes(_site_process, [(k, n, port, str(tmp_path), strategy, rounds, sites_per_round) for k in range(n)])
    return [torch.load(tmp_path / f"result-{k}.pt", weights_only=False) for k in range(n)]


@pytest.mark.slow
def test_fedavg_sites_end_with_the_weighted_mean_of_their_local_models(tmp_path):
    sites = _run_federation(tmp_path, 3, "fedavg", rounds=1)
    keys = sites[0]["keys"]
    weights = torch.tensor([float(s["n_train"]) for s in sites], dtype=torch.float64)
    assert len(set(weights.tolist())) == 3  # unequal sizes, so weighting matters
    for k in keys:
        # every site holds exactly the same global weights ...
        for s in sites[1:]:
            assert torch.equal(s["final"][k], sites[0]["final"][k]), k
        # ... equal to the example-weighted mean of what each site trained
        stacked = torch.stack([s["local"][k].double() for s in sites])
        expected = (stacked * weights.view(-1, *[1] * (stacked.dim() - 1))).sum(0) / weights.sum()
        torch.testing.assert_close(sites[0]["final"][k].double(), expected, rtol=1e-5, atol=1e-6)
    # local models differed (otherwise the check above proves nothing)
    conv = "conv.weight"
    assert not torch.equal(sites[0]["local"][conv], sites[1]["local"][conv])
    # the test table: one row per site and a pooled row whose n is the sum, identical at every site
    table = sites[0]["test"]
    # every site names every other site's row after its dataset, and all sites print the same table
    assert set(table) == {"toy0", "toy1", "toy2", "pooled"}
    assert table["pooled"]["n"] == sum(table[s]["n"] for s in ("toy0", "toy1", "toy2"))
    assert sites[2]["test"] == table


@pytest.mark.slow
def test_sites_left_out_of_a_round_do_not_train_and_do_not_count_in_its_mean(tmp_path):
    sites = _run_federation(tmp_path, 3, "fedavg", rounds=2, sites_per_round=2)
    draws = sites[0]["draws"]
    assert all(s["draws"] == draws for s in sites) and all(len(d) == 2 for d in draws)
    for k, s in enumerate(sites):
        assert s["sampled"] == [float(k in d) for d in draws]
        assert s["trained_rounds"] == sum(k in d for d in draws)
    last = sorted(draws[-1])
    weights = torch.tensor([float(sites[k]["n_train"]) for k in last], dtype=torch.float64)
    for key in sites[0]["keys"]:
        for s in sites[1:]:
            assert torch.equal(s["fitted"][key], sites[0]["fitted"][key]), key
        stacked = torch.stack([sites[k]["local"][key].double() for k in last])
        expected = (stacked * weights.view(-1, *[1] * (stacked.dim() - 1))).sum(0) / weights.sum()
        torch.testing.assert_close(sites[0]["fitted"][key].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fedbn_keeps_batch_norm_local_and_shares_the_rest(tmp_path):
    sites = _run_federation(tmp_path, 2, "fedbn", rounds=2)
    a, b = sites[0]["final"], sites[1]["final"]
    for k in ("conv.weight", "conv.bias", "head.weight", "head.bias", "target_mean"):
        assert torch.equal(a[k], b[k]), k
    for k in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        assert not torch.equal(a[k], b[k]), k
        assert k not in sites[0]["keys"]
    # site 1's intensities are shifted by +0.5, so its local running mean moved away from site 0's
    assert (b["bn.running_mean"] - a["bn.running_mean"]).abs().max() > 0.05


def _fit_one_site(tmp_path: Path, name: str, **kw) -> tuple[ToyRegressor, FederatedTrainer]:
    L.seed_everything(0)
    model = ToyRegressor()
    trainer = FederatedTrainer(accelerator="cpu", enable_progress_bar=False, default_root_dir=str(tmp_path),
                               run_name=name, **kw)
    trainer.fit(model, site_data(0))
    return model, trainer


def test_one_site_federation_equals_centralized_training(tmp_path):
    # Aggregating one site is the identity and the optimizer (Adam state included) persists across
    # rounds, so R rounds of one epoch are exactly one round of R epochs.
    fed, fed_trainer = _fit_one_site(tmp_path, "rounds", rounds=3, local_epochs=1)
    central, central_trainer = _fit_one_site(tmp_path, "epochs", rounds=1, local_epochs=3)
    assert_identical(state_of(fed), state_of(central))
    opt_a = fed_trainer.site.optimizer.state_dict()["state"]
    opt_b = central_trainer.site.optimizer.state_dict()["state"]
    for i in opt_a:
        assert_identical(opt_a[i], opt_b[i])
    assert fed_trainer.global_step == central_trainer.global_step == 3 * 3  # 12 examples, batches of 4


def test_local_steps_counts_optimizer_steps(tmp_path):
    _, trainer = _fit_one_site(tmp_path, "steps", rounds=2, local_steps=5)  # 3 batches per epoch: wraps around
    assert trainer.global_step == 10


def test_early_stopping_fires_when_validation_loss_cannot_improve(tmp_path):
    L.seed_everything(0)
    model = ToyRegressor(optimizer="sgd", bn=False, loss_scale=0.0, lr=0.1)
    trainer = FederatedTrainer(rounds=10, patience=1, accelerator="cpu", enable_progress_bar=False,
                               default_root_dir=str(tmp_path))
    trainer.fit(model, site_data(0))
    assert len(trainer.history) == 2 and trainer.state.stopped
    assert trainer.history[0]["val/pooled/loss"] == trainer.history[1]["val/pooled/loss"]
    assert trainer.state.best_round == 0


def test_lr_plateau_halves_learning_rate_down_to_min_lr(tmp_path):
    L.seed_everything(0)
    model = ToyRegressor(optimizer="sgd", bn=False, loss_scale=0.0, lr=0.1)
    trainer = FederatedTrainer(rounds=4, lr_plateau_patience=1, lr_plateau_factor=0.5, min_lr=0.03,
                               accelerator="cpu", enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.fit(model, site_data(0))
    assert [h["lr"] for h in trainer.history] == [0.1, 0.05, 0.03, 0.03]
    assert not trainer.state.stopped


def test_test_predict_logging_and_lightning_best_checkpoint(tmp_path):
    data = site_data(0, test_roots=2)
    L.seed_everything(0)
    model = ToyRegressor()
    trainer = FederatedTrainer(rounds=2, accelerator="cpu", enable_progress_bar=False, default_root_dir=str(tmp_path),
                               run_name="demo")
    trainer.fit(model, data)
    assert data.prepared

    # best.ckpt is a Lightning checkpoint of the lowest-validation-loss round
    best = tmp_path / "demo" / "best.ckpt"
    loaded = ToyRegressor.load_from_checkpoint(best)
    expected_round = min(range(2), key=lambda r: trainer.history[r]["val/pooled/loss"])
    assert torch.load(best, weights_only=False)["epoch"] == expected_round
    results = trainer.test(model, data)  # evaluates the best model, one row per pooled root
    assert set(results) == {"toy00", "toy01", "pooled"}
    assert results["pooled"]["n"] == 16
    again = trainer.test(loaded, data, ckpt_path=str(best))
    assert again["pooled"]["mae"] == pytest.approx(results["pooled"]["mae"], rel=1e-6)
    assert trainer.validate(model, data)["pooled"]["n"] == 8

    preds = trainer.predict(model, data)
    assert sum(len(p["pred"]) for p in preds) == 8 and preds[0]["participant_id"][0] == "sub-000"

    # round metrics and the module's own self.log calls reach the CSV logger
    csv = next((tmp_path / "demo" / "site-0").glob("version_*/metrics.csv")).read_text()
    for column in ("val/site/loss", "val/pooled/loss", "val/pooled/mae", "time/aggregate_s", "bytes_sent",
                   "train/site/loss", "train/loss", "test/pooled/mae"):
        assert column in csv.splitlines()[0], column
    # the pooled target mean was shared before the first round
    assert float(model.target_mean) == pytest.approx(float(data.train.targets.mean()), rel=1e-6)


@pytest.mark.parametrize("site_rank", [0, 1])
def test_unreachable_federation_fails_within_the_timeout(tmp_path, site_rank):
    L.seed_everything(0)
    trainer = FederatedTrainer(
        rounds=1, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
        federation=Federation(port=free_port(), site_rank=site_rank, num_sites=2, timeout_s=2.0),
    )
    start = time.monotonic()
    with pytest.raises(FederationTimeoutError, match="timeout_s=2"):
        trainer.fit(ToyRegressor(), site_data(0))
    assert time.monotonic() - start < 2.0 + scaled(28)


def test_site_sampling_is_the_same_everywhere_and_changes_per_round():
    def draws(site_rank):
        trainer = FederatedTrainer(sites_per_round=2, logger=False,
                                   federation=Federation(site_rank=site_rank, num_sites=5))
        return [trainer.sampled_sites(r) for r in range(6)]

    a, b = draws(0), draws(4)
    assert a == b  # no message needed: every site draws the same sites from (seed, round)
    assert all(len(s) == 2 and s <= set(range(5)) for s in a)
    assert len({frozenset(s) for s in a}) > 1
