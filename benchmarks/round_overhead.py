"""How much of a federated round is federation overhead?

Three sites run as separate processes on this machine (loopback federation), each training a full-width
SFCN brain-age model (``BrainAgeModule``) on small random volumes for a few steps per round. Per round we
print the seconds in local training, aggregation (weighted all_reduce of the flat parameter vector + server
update + loading it back), validation, the share of aggregation in the round, and the bytes each site sent.

Aggregation time of a site includes waiting for slower sites to finish training; the *slowest* site's value
(the minimum over sites) is the pure communication cost, and that is what the share uses. Target: <= 1 %.

    python benchmarks/round_overhead.py               # CPU, 48^3, 3 sites
    python benchmarks/round_overhead.py --accelerator cuda --precision bf16-mixed --size 96 --steps 8
    python benchmarks/round_overhead.py --secure --secure-sites 3 16   # aggregation only: plain vs masked

``--secure`` times the aggregation alone (no training), at each site process, for a vector of the full-width
SFCN's size: plain FedAvg (one float32 all_reduce) against ``SecureAggregation(FedAvg())`` (fixed-point
encoding, one ChaCha20 mask per other site, one int64 all_reduce, decoding). The key exchange happens once
per run and is timed apart. Each row is the median over rounds of the slowest site. On a shared machine
the site processes compete for cores, which inflates the masked time (its cost is per-site CPU work); the
second table gives what one site computes on one core, the number to compare with a realistic round (one
local epoch of a few hundred full-size scans on a GPU: about a minute or more).
"""

from __future__ import annotations

import argparse
import math
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


def secure_site_process(rank: int, n_sites: int, port: int, n_params: int, rounds: int, queue) -> None:
    """One site timing ``rounds`` plain and ``rounds`` masked aggregations of an ``n_params`` vector."""
    from types import SimpleNamespace

    from neurofed.federated.collectives import Collectives
    from neurofed.federated.config import Federation
    from neurofed.federated.group import FederationGroup
    from neurofed.federated.site_link import SiteLink
    from neurofed.federated.strategies import Contribution, FedAvg, RoundContext, SecureAggregation

    torch.set_num_threads(1)
    group = FederationGroup("127.0.0.1", port, rank, n_sites, timeout_s=900)
    link = SiteLink(SimpleNamespace(global_rank=0, world_size=1, device=torch.device("cpu")),
                    Federation(site_rank=rank, num_sites=n_sites), group=group)
    link.open({"benchmark": "round overhead"})  # the handshake: the session and coin secure aggregation keys under
    g = torch.zeros(n_params)
    params = g + 0.01 * torch.randn(n_params, generator=torch.Generator().manual_seed(rank))
    times: dict[str, list[float]] = {"plain": [], "masked": [], "key_exchange": []}
    for name, strategy in (("plain", FedAvg()), ("masked", SecureAggregation(FedAvg()))):
        for r in range(rounds + 1):  # round 0 of the masked rule includes the key exchange
            ctx = RoundContext(round=r, seed=0, site_rank=rank, num_sites=n_sites)
            group.barrier()
            t0 = time.perf_counter()
            strategy.aggregate(Contribution(params, g, 10.0 + rank), Collectives(link, r), ctx)
            dt = time.perf_counter() - t0
            if r > 0:
                times[name].append(dt)
            elif name == "masked":
                times["key_exchange"].append(dt)  # includes one masked aggregation
    group.close()
    queue.put((rank, times))


def secure_benchmark(sites: list[int], rounds: int, channels: list[int]) -> None:
    """Print aggregation seconds per round, plain vs masked, for each federation size in ``sites``."""
    from neurofed.models import BrainAgeModule

    n_params = sum(v.numel() for v in BrainAgeModule(channels=channels).state_dict().values() if v.is_floating_point())
    print(f"aggregation of {n_params:,} floats (full-width SFCN brain-age model), {rounds} rounds, "
          f"{os.cpu_count()} CPU cores, one thread per site process")
    header = f"{'sites':>5} | {'plain s':>8} | {'masked s':>8} | {'ratio':>6} | {'key exchange s':>14}"
    print(header)
    print("-" * len(header))
    ctx = mp.get_context("spawn")
    for n in sites:
        queue, port = ctx.Queue(), free_port()
        procs = [ctx.Process(target=secure_site_process, args=(k, n, port, n_params, rounds, queue)) for k in range(n)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=3600) for _ in procs)
        for p in procs:
            p.join()
        per_round = {name: [max(results[k][name][i] for k in results) for i in range(len(results[0][name]))]
                     for name in ("plain", "masked", "key_exchange")}
        plain, masked = (sorted(v)[len(v) // 2] for v in (per_round["plain"], per_round["masked"]))
        print(f"{n:>5} | {plain:>8.3f} | {masked:>8.3f} | {masked / plain:>5.1f}x | {per_round['key_exchange'][0]:>14.3f}")
    sys.stdout.flush()
    masking_compute(sites, n_params)


def masking_compute(sites: list[int], n_params: int, repeats: int = 5) -> None:
    """What one site computes to mask and unmask, in this process on one core (no transport, no contention
    between site processes): encoding, the keystreams of its pairs, decoding — all pairs, and 4 random partners."""
    from neurofed.federated import secure_aggregation as sa

    torch.set_num_threads(1)
    x = 0.01 * torch.randn(n_params, dtype=torch.float64)
    print(f"\nper-site masking compute, one core, {n_params:,} values (best of {repeats})")
    print(f"{'sites':>5} | {'all pairs s':>11} | {'4 partners s':>12} | {'float32 sum s':>13}")
    for n in sites:
        keys = [sa.SiteKeys() for _ in range(n)]
        publics = [k.public for k in keys]
        row = []
        for neighbours in (None, 4):
            shared = sa.key_exchange(keys[0], publics, 0, peers=sa.mask_partners(0, n, neighbours, b"coin", 0))
            codec = sa.FixedPoint(16.0, n)
            best = math.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                codec.decode(sa.mask(codec.encode(x), shared, 0, 0, 0, codec.modulus_mask))
                best = min(best, time.perf_counter() - t0)
            row.append(best)
        v = x.float()
        t0 = time.perf_counter()
        for _ in range(n - 1):
            v = v + x.float()  # what summing n float32 vectors costs in memory traffic, for scale
        print(f"{n:>5} | {row[0]:>11.3f} | {row[1]:>12.3f} | {time.perf_counter() - t0:>13.3f}")


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
    parser.add_argument("--secure", action="store_true", help="time aggregation alone: plain vs secure (masked)")
    parser.add_argument("--secure-sites", type=int, nargs="+", default=[3, 16])
    args = parser.parse_args(argv)
    if args.secure:
        secure_benchmark(args.secure_sites, args.rounds, args.channels)
        return
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
