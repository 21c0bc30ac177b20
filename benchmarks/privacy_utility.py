"""What privacy costs: pooled test MAE of the synthetic brain-age federation, private and not.

Three healthy synthetic sites (``neurofed synth``'s ixi, sald and camcan profiles) are generated at 4 mm,
their T1w scans resampled to a small cube and held in memory; each configuration then runs as three site
processes over loopback with a small SFCN-GroupNorm (BatchNorm is not DP-compatible) and FedAvg:

- sample-level DP-SGD at every site for ε ∈ {∞, 8, 3, 1} (``DPSGD(target_epsilon=ε)``: Opacus picks σ for
  the planned steps, δ = 1e-3 ≈ 1/N at these sizes);
- site-level DP-FedAvg at one noise setting (σ, C given), without DP-SGD.

It prints a table (pooled test MAE, the predict-the-mean MAE, ε at the end, local training seconds per
round and the slowdown of DP-SGD over the non-private run) and writes ``privacy_utility.png`` and
``privacy_utility.json`` to ``--out``. CPU sizes are tiny so the run fits minutes on 2 cores: the numbers
say how the pieces behave, not how a real study would come out.

    python benchmarks/privacy_utility.py --out results/privacy
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing as mp
import queue as queue_module
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from neurofed.federated.simulate import free_port

SITES = ("ixi", "sald", "camcan")
EPSILONS = (math.inf, 8.0, 3.0, 1.0)


def load_site(site_dir: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every T1w scan of a synthetic site as a ``[N, 1, size, size, size]`` float16 tensor, and the ages."""
    import nibabel as nib

    ages = {row["participant_id"]: float(row["age"]) for row in csv.DictReader(open(site_dir / "participants.tsv"),
                                                                                 delimiter="\t")}
    images, targets = [], []
    for pid, age in sorted(ages.items()):
        path = next((site_dir / pid).rglob("*_T1w.nii*"))
        x = torch.from_numpy(np.asarray(nib.load(path).dataobj, dtype=np.float32))
        x = x / torch.quantile(x.flatten()[::7], 0.995).clamp_min(1e-6)
        images.append(F.interpolate(x[None, None], size=(size,) * 3, mode="trilinear", align_corners=False)[0].half())
        targets.append(age)
    return torch.stack(images), torch.tensor(targets)


class SiteData(L.LightningDataModule):
    """One site's scans split 60/20/20 (fixed by seed) into train, validation and test."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, name: str, batch_size: int) -> None:
        super().__init__()
        order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
        a, b = int(0.6 * len(order)), int(0.8 * len(order))
        self.parts = {k: order[s] for k, s in (("train", slice(0, a)), ("val", slice(a, b)), ("test", slice(b, None)))}
        self.images, self.targets, self.name, self.batch_size = images, targets, name, batch_size

    @property
    def site_names(self) -> list[str]:
        return [self.name]

    def _dataset(self, part: str):
        idx = self.parts[part]
        return _Dict(self.images[idx], self.targets[idx], self.name)

    def train_target_stats(self) -> tuple[float, int, float]:
        t = self.targets[self.parts["train"]].double()
        return float(t.sum()), len(t), float((t * t).sum())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("train"), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("val"), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("test"), batch_size=self.batch_size)


class _Dict(TensorDataset):
    def __init__(self, images, targets, site) -> None:
        super().__init__(images, targets)
        self.site = site

    def __getitem__(self, i: int) -> dict:
        image, target = super().__getitem__(i)
        return {"image": image, "target": target, "participant_id": f"sub-{i}", "session": "", "site": self.site}


def site_process(rank: int, port: int, data_dir: str, cfg: dict, queue) -> None:
    from neurofed.federated import DPFedAvg, FedAvg, FederatedTrainer, Federation
    from neurofed.federated.dp_sgd import DPSGD
    from neurofed.models import BrainAgeModule

    torch.set_num_threads(1)
    L.seed_everything(rank)
    images, targets = torch.load(f"{data_dir}/{SITES[rank]}.pt")
    data = SiteData(images, targets, SITES[rank], cfg["batch"])
    privacy = None if math.isinf(cfg["epsilon"]) else DPSGD(target_epsilon=cfg["epsilon"], max_grad_norm=1.0, delta=1e-3)
    strategy = FedAvg()
    if cfg.get("site_sigma") is not None:
        strategy = DPFedAvg(FedAvg(), noise_multiplier=cfg["site_sigma"], clip_norm=cfg["site_clip"], delta=1e-3)
    model = BrainAgeModule(channels=cfg["channels"], norm="group", loss="l1", dropout=0.0, channels_last=False,
                           lr=cfg["lr"])
    trainer = FederatedTrainer(rounds=cfg["rounds"], local_epochs=1, accelerator="cpu", logger=False,
                               enable_progress_bar=False, default_root_dir=cfg["root"], run_name=cfg["name"],
                               federation=Federation(port=port, site_rank=rank, num_sites=len(SITES), timeout_s=900),
                               privacy=privacy, strategy=strategy)
    trainer.fit(model, data)
    table = trainer.test(model, data)
    trainer.close()
    queue.put((rank, trainer.history, table))


def run_config(cfg: dict, data_dir: str) -> dict:
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=site_process, args=(k, port, data_dir, cfg, queue)) for k in range(len(SITES))]
    for p in procs:
        p.start()
    results: dict[int, tuple] = {}
    while len(results) < len(procs):
        try:
            k, h, t = queue.get(timeout=5)
            results[k] = (h, t)
        except queue_module.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise SystemExit(f"{cfg['name']}: a site failed, exit codes {[p.exitcode for p in procs]}")
    for p in procs:
        p.join()
    hist = [results[k][0] for k in sorted(results)]
    table = results[0][1]
    last = [h[-1] for h in hist]
    return {
        "name": cfg["name"], "test_mae": table["pooled"]["mae"], "baseline_mae": table["pooled"]["baseline_mae"],
        "epsilon": max(r.get("privacy/epsilon", math.inf) for r in last),
        "site_epsilon": last[0].get("privacy/site_epsilon", math.inf),
        "train_s": float(np.mean([r["time/train_s"] for h in hist for r in h])), "rounds": len(hist[0]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/privacy")
    parser.add_argument("--subjects", type=int, default=60, help="subjects per site")
    parser.add_argument("--size", type=int, default=24, help="edge of the resampled cube (voxels)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--channels", type=int, nargs="+", default=[8, 16, 16, 8])
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS))
    parser.add_argument("--site-sigma", type=float, default=0.5, help="DP-FedAvg noise multiplier (0 to skip)")
    parser.add_argument("--site-clip", type=float, default=1.0, help="DP-FedAvg update clipping norm")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from neurofed.data.synth import generate_site

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for site in SITES:
            site_dir = generate_site(tmp, site, args.subjects, resolution=4.0, seed=0, session_fraction=0.0,
                                     progress=False)
            torch.save(load_site(site_dir, args.size), f"{tmp}/{site}.pt")
        base = dict(rounds=args.rounds, batch=args.batch, lr=args.lr, channels=args.channels, root=f"{tmp}/runs")
        configs = [dict(base, name=f"DP-SGD eps={e:g}" if math.isfinite(e) else "non-private", epsilon=e)
                   for e in args.epsilons]
        if args.site_sigma > 0:
            configs.append(dict(base, name=f"DP-FedAvg sigma={args.site_sigma:g} C={args.site_clip:g}",
                                epsilon=math.inf, site_sigma=args.site_sigma, site_clip=args.site_clip))
        for cfg in configs:
            start = time.perf_counter()
            rows.append(run_config(cfg, tmp) | {"wall_s": time.perf_counter() - start})
            print(f"done: {rows[-1]}", flush=True)

    plain = next((r["train_s"] for r in rows if r["name"] == "non-private"), math.nan)
    header = (f"{'configuration':<28} | {'sample ε':>8} | {'site ε':>7} | {'test MAE':>8} | {'mean-pred MAE':>13} | "
              f"{'train s/round':>13} | {'slowdown':>8}")
    print(f"\n3 synthetic sites x {args.subjects} subjects, {args.size}^3, SFCN-GroupNorm {args.channels}, "
          f"{args.rounds} rounds x 1 local epoch, δ = 1e-3\n{header}\n{'-' * len(header)}")
    for r in rows:
        print(f"{r['name']:<28} | {r['epsilon']:>8.3g} | {r['site_epsilon']:>7.3g} | {r['test_mae']:>8.2f} | "
              f"{r['baseline_mae']:>13.2f} | {r['train_s']:>13.2f} | {r['train_s'] / plain:>7.2f}x")
    (out / "privacy_utility.json").write_text(json.dumps(rows, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["name"] for r in rows]
    ax.bar(names, [r["test_mae"] for r in rows], color="tab:blue")
    ax.axhline(rows[0]["baseline_mae"], color="grey", ls="--", label="predict the training mean")
    ax.set_ylabel("pooled test MAE (years)")
    ax.set_title("Privacy vs utility, synthetic brain-age federation")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "privacy_utility.png", dpi=120)
    print(f"wrote {out / 'privacy_utility.png'}")


if __name__ == "__main__":
    main()
