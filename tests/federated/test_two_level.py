"""Two-level topology: 2 sites x 2 processes (CPU DDP inside each site, a federation group between leaders)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from timeouts import STARTUP_S, scaled
from federated_toys import LocalSnapshots, ToyRegressor, free_port, quiet_process, run_processes, site_data, state_of

from neurofed.federated import FederatedTrainer, Federation


def _rank_process(site: int, local_rank: int, site_port: int, fed_port: int, root: str) -> None:
    # What a launcher (torchrun, SLURM, or `neurofed simulate` + Fabric) sets for each process of a site;
    # with LOCAL_RANK present Fabric joins this group instead of launching processes itself.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(site_port), WORLD_SIZE="2",
                      LOCAL_RANK=str(local_rank), RANK=str(local_rank), NODE_RANK="0")
    quiet_process()
    L.seed_everything(site)
    model = ToyRegressor()
    data = site_data(site, n_test=7)  # odd: each test example must be counted once across the 2 ranks
    snapshots = LocalSnapshots()
    trainer = FederatedTrainer(
        rounds=1, callbacks=[snapshots], accelerator="cpu", devices=2, logger=False, enable_progress_bar=False, default_root_dir=root,
        federation=Federation(port=fed_port, site_rank=site, num_sites=2, timeout_s=scaled(60)),
    )
    trainer.fit(model, data)
    results = trainer.test(model, data)
    torch.save(
        {"local": snapshots.states[-1], "final": state_of(model), "n_train": data.n_train, "test": results,
         "world_size": trainer.fabric.world_size, "leader": trainer.site.is_leader,
         "has_group": trainer.group is not None},
        Path(root) / f"result-{site}-{local_rank}.pt",
    )
    trainer.close()


@pytest.mark.slow
def test_two_sites_of_two_ranks_end_identical_and_equal_to_the_site_mean(tmp_path):
    ports = [free_port(), free_port(), free_port()]
    run_processes(_rank_process, [(s, r, ports[s], ports[2], str(tmp_path)) for s in (0, 1) for r in (0, 1)],
                  timeout=scaled(STARTUP_S + 120))
    res = {(s, r): torch.load(tmp_path / f"result-{s}-{r}.pt", weights_only=False) for s in (0, 1) for r in (0, 1)}
    assert all(x["world_size"] == 2 for x in res.values())
    # only the site leaders joined the federation
    assert [res[s, r]["has_group"] for s in (0, 1) for r in (0, 1)] == [True, False, True, False]

    ref = res[0, 0]["final"]
    # aggregated entries: identical everywhere; BatchNorm statistics are each site's own (precise_bn), the same
    # at both ranks of a site
    float_keys = [k for k, v in ref.items() if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))]
    for key in res:
        for k in float_keys:
            assert torch.equal(res[key]["final"][k], ref[k]), (key, k)
    for s in (0, 1):
        for k in ref:
            assert torch.equal(res[s, 1]["final"][k], res[s, 0]["final"][k]), (s, k)

    # DDP kept each site's trainable weights in sync during local training
    for s in (0, 1):
        assert torch.equal(res[s, 0]["local"]["conv.weight"], res[s, 1]["local"]["conv.weight"])
    w = [float(res[s, 0]["n_train"]) for s in (0, 1)]
    assert w[0] != w[1]
    for k in float_keys:
        expected = (w[0] * res[0, 0]["local"][k].double() + w[1] * res[1, 0]["local"][k].double()) / sum(w)
        torch.testing.assert_close(ref[k].double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(res[0, 0]["local"]["conv.weight"], res[1, 0]["local"]["conv.weight"])

    # test statistics: summed over a site's ranks without padding, pooled across sites, same everywhere
    table = res[0, 0]["test"]
    assert table["pooled"]["n"] == 14 and table["toy0"]["n"] == 7 and table["toy1"]["n"] == 7
    assert all(res[key]["test"]["pooled"] == table["pooled"] for key in res)


def _resident_rank_process(local_rank: int, site_port: int, fed_port: int, bids: str, root: str) -> None:
    """One site of two DDP ranks on resident scans: each rank holds the store, the sampler splits the indices."""
    from neurofed.data import BrainMRIDataModule
    from neurofed.models import BrainAgeModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(site_port), WORLD_SIZE="2",
                      LOCAL_RANK=str(local_rank), RANK=str(local_rank), NODE_RANK="0")
    quiet_process()
    L.seed_everything(0)
    data = BrainMRIDataModule(bids, spacing=4.0, shape=(24, 28, 24), batch_size=2, resident=True,
                              cache_dir=str(Path(root) / "cache"))
    model = BrainAgeModule(channels=[2, 2, 2, 2, 2], dropout=0.0, loss="l1")
    trainer = FederatedTrainer(
        rounds=1, accelerator="cpu", devices=2, logger=False, enable_progress_bar=False, default_root_dir=root,
        federation=Federation(port=fed_port, site_rank=0, num_sites=1, timeout_s=scaled(60)),
    )
    trainer.fit(model, data)
    results = trainer.test(model, data)
    torch.save({"final": state_of(model), "test": results, "n_test": len(data.test_records[0]),
                "store": len(data.volumes), "trained": trainer.history[0]["train/site/volumes"]},
               Path(root) / f"resident-{local_rank}.pt")
    trainer.close()


@pytest.mark.slow
def test_resident_scans_under_ddp_inside_a_site(tmp_path, tiny_bids):
    from neurofed.data import BrainMRIDataModule

    BrainMRIDataModule(str(tiny_bids), spacing=4.0, shape=(24, 28, 24), cache_dir=str(tmp_path / "cache")).prepare_data()
    ports = [free_port(), free_port()]
    run_processes(_resident_rank_process, [(r, ports[0], ports[1], str(tiny_bids), str(tmp_path)) for r in (0, 1)],
                  timeout=scaled(STARTUP_S + 120))
    res = [torch.load(tmp_path / f"resident-{r}.pt", weights_only=False) for r in (0, 1)]
    for k, v in res[0]["final"].items():
        if v.is_floating_point():
            assert torch.equal(res[1]["final"][k], v), k
    assert res[0]["store"] == res[1]["store"] == 15  # every rank holds the whole site
    assert res[0]["trained"] + res[1]["trained"] >= 8  # the ranks shared the epoch (9 training scans, batches of 2)
    assert res[0]["test"]["pooled"]["n"] == res[0]["n_test"]  # each test scan counted once across the ranks
    assert repr(res[1]["test"]) == repr(res[0]["test"])  # repr: NaN (r of a constant prediction) equals itself
