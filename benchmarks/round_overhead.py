"""How much of a federated round is federation overhead?

Three sites run as separate processes on this machine (loopback federation), each training a full-width
SFCN brain-age model (``BrainAgeModule``) on small random volumes for a few steps per round. Per round we
print the seconds in local training, aggregation (weighted all_reduce of the flat parameter vector + server
update + loading it back), validation, the share of aggregation in the round, and the bytes each site sent.

Aggregation time of a site includes waiting for slower sites to finish training; the *slowest* site's value
(the minimum over sites) is the pure communication cost, and that is what the share uses. Target: <= 1 %.

    python benchmarks/round_overhead.py               # CPU, 48^3, 3 sites
    python benchmarks/round_overhead.py --accelerator cuda --precision bf16-mixed --size 96 --steps 8
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from neurofed.federated.simulate import free_port


class RandomVolumes(Dataset):
    """Random float16 volumes with a random age: enough to time the loop, not to learn anything."""

    def __init__(self, n: int, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, size, size, size, generator=g).half()
        self.targets = (20 + 60 * torch.rand(n, generator=g)).float()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "target": self.targets[i], "participant_id": f"sub-{i}", "session": "",
                "site": "bench"}


class RandomSite(L.LightningDataModule):
    def __init__(self, n_train: int, n_val: int, size: int, batch_size: int, seed: int) -> None:
        super().__init__()
        self.train = RandomVolumes(n_train, size, seed)
        self.val = RandomVolumes(n_val, size, seed + 10_000)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)


def site_process(rank: int, n_sites: int, port: int, cfg: dict, queue) -> None:
    """One site: build the model and data, fit, and report per-round timings and peak memory."""
    from neurofed.federated import FederatedTrainer, Federation
    from neurofed.models import BrainAgeModule

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_sites) if cfg["accelerator"] == "cpu" else 4)
    L.seed_everything(rank)
    model = BrainAgeModule(channels=cfg["channels"], loss="l1", channels_last=cfg["accelerator"] != "cpu")
    data = RandomSite(cfg["steps"] * cfg["batch"], cfg["val"], cfg["size"], cfg["batch"], seed=rank)
    trainer = FederatedTrainer(
        rounds=cfg["rounds"], local_steps=cfg["steps"], accelerator=cfg["accelerator"], precision=cfg["precision"],
        logger=False, enable_progress_bar=False, default_root_dir=cfg["root"], run_name="bench",
        federation=Federation(port=port, site_rank=rank, num_sites=n_sites, timeout_s=900),
    )
    trainer.fit(model, data)
    trainer.close()
    n_params = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((rank, trainer.history, n_params, peak_mb))


def run_federation(n_sites: int, cfg: dict) -> tuple[dict[int, list[dict]], int, list[float], float]:
    """Run ``n_sites`` site processes; returns histories by rank, parameter count, peak RSS (MB), wall s."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    start = time.perf_counter()
    procs = [ctx.Process(target=site_process, args=(k, n_sites, port, cfg, queue)) for k in range(n_sites)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - start
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"a site failed: exit codes {[p.exitcode for p in procs]}")
    histories = {rank: hist for rank, hist, _, _ in results}
    return histories, results[0][2], [mb for *_, mb in sorted(results)], wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="local optimizer steps per round")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--val", type=int, default=2, help="validation volumes per site")
    parser.add_argument("--size", type=int, default=48, help="volume edge length (voxels)")
    parser.add_argument("--channels", type=int, nargs=6, default=[32, 64, 128, 256, 256, 64])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        cfg = dict(vars(args), root=root)
        histories, n_params, _, _ = run_federation(args.sites, cfg)

    print(f"{args.sites} sites, SFCN channels {args.channels}, {args.size}^3, {args.steps} steps x batch "
          f"{args.batch} per round, {args.accelerator} {args.precision}; {n_params:,} aggregated floats "
          f"= {n_params * 4 / 2**20:.1f} MiB per site per round")
    header = f"{'round':>5} | {'train s':>8} | {'aggregate s (min..max)':>22} | {'validate s':>10} | {'agg share':>9} | {'sent/site':>10}"
    print(header)
    print("-" * len(header))
    for r in range(args.rounds):
        rows = [histories[k][r] for k in sorted(histories)]
        train = max(h["time/train_s"] for h in rows)
        aggs = [h["time/aggregate_s"] for h in rows]
        val = max(h["time/validate_s"] for h in rows)
        share = min(aggs) / (train + min(aggs) + val)
        sent = max(h["bytes_sent"] for h in rows)
        print(f"{r:>5} | {train:>8.2f} | {min(aggs):>9.3f} .. {max(aggs):>9.3f} | {val:>10.2f} | "
              f"{100 * share:>8.2f}% | {sent / 2**20:>6.2f} MiB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
