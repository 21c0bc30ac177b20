"""Replicate the reference study's table on synthetic data.

The reference study (three healthy centres IXI 586 / SALD 491 / CamCAN 653 scans; three MS centres Brussels 96 /
Greifswald 756 / Prague 2,424) reported brain-age MAE 6.08 y federated vs 7.02 y centralized, and SDMT MAE 9.19
(deep transfer) vs 11.05 (shallow). This script builds sites with those relative sizes and age ranges with
``neurofed synth`` and runs, with the same code paths a user would:

1. brain age, centralized: one site holding the three healthy roots (``neurofed fit``);
2. brain age, federated: three site processes (``neurofed simulate ... fit``), for each strategy asked;
3. SDMT, federated over the three MS sites, deep and shallow transfer from the federated FedAvg brain-age model;

then writes ``results.tsv`` (one row per run and site: MAE, RMSE, r, R², n, and the predict-the-training-mean
MAE), ``table.md``, a validation-loss-per-round plot and the true-vs-predicted scatter plots per site.

The CPU default (``--scale 0.18``: about 310 healthy and 150 MS subjects; 4 mm input, a quarter-width SFCN with four
pooling blocks)
finishes in under 30 minutes on 2 cores. ``--full`` runs the study's sizes at 1 mm, 160x192x160, full width and
bf16 on a GPU.

    python benchmarks/replication.py --out results/replication
    python benchmarks/replication.py --full --out results/replication_full
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HEALTHY = ["ixi", "sald", "camcan"]
MS = ["brussels", "greifswald", "prague"]
REFERENCE = {
    "brain age": {"federated": 6.08, "centralized": 7.02},
    "sdmt": {"deep": 9.19, "shallow": 11.05},
}
STRATEGIES = {
    "fedavg": "neurofed.federated.strategies.FedAvg",
    "fedbn": "neurofed.federated.strategies.FedBN",
    "fedprox": "neurofed.federated.strategies.FedProx",
    "fedadam": "neurofed.federated.strategies.FedAdam",
}
REPO = Path(__file__).resolve().parents[1]


def neurofed(*args: str) -> list[str]:
    return [sys.executable, "-m", "neurofed", *args]


def run(cmd: list[str], log_path: Path) -> float:
    """Run one step, streaming its output to a log; stop the study with the log's tail if it fails."""
    start = time.perf_counter()
    print(f"$ {' '.join(cmd[2:])}", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(open(log_path).readlines()[-30:])
        sys.exit(f"step failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    print(f"  done in {seconds / 60:.1f} min (log: {log_path})", flush=True)
    return seconds


def size_args(args: argparse.Namespace) -> list[str]:
    """Overrides that make every run of the study use the same input size, width and precision."""
    common = [
        "--data.spacing", str(args.spacing), "--data.shape", json.dumps(args.shape),
        "--data.batch_size", str(args.batch_size), "--data.num_workers", str(args.num_workers),
        "--data.cache_dir", str(args.out / "cache"),
        "--trainer.default_root_dir", str(args.out / "runs"), "--trainer.enable_progress_bar", "false",
        "--trainer.precision", args.precision, "--trainer.accelerator", args.accelerator,
        "--trainer.compile", str(args.compile).lower(), "--data.resident", str(args.resident).lower(),
        "--trainer.rounds", str(args.rounds), "--trainer.patience", str(args.patience),
        "--trainer.lr_plateau_patience", str(max(2, args.patience // 2)),
    ]
    return common


def brain_age_model_args(args: argparse.Namespace) -> list[str]:
    return [
        "--model.class_path", "neurofed.models.BrainAgeModule",
        "--model.init_args.channels", json.dumps(args.channels),
        "--model.init_args.dropout", str(args.dropout), "--model.init_args.loss", args.loss,
        "--model.init_args.lr", str(args.lr), "--model.init_args.channels_last", str(args.channels_last).lower(),
    ]


def read_results(run_dir: Path, roots: list[str]) -> dict:
    """The run's per-site test table; its prediction tables and scatter plots are copied beside it, since the
    next run writes the same derivatives folders."""
    path = run_dir / "test_metrics.json"
    if not path.is_file():
        sys.exit(f"{path} is missing: the run did not test its best model")
    for root in roots:
        derivatives = Path(root) / "derivatives" / "neurofed"
        if derivatives.is_dir():
            shutil.copytree(derivatives, run_dir / "predictions" / Path(root).name, dirs_exist_ok=True)
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "replication")
    parser.add_argument("--full", action="store_true", help="study sizes, 1 mm, full-width SFCN, bf16, GPU")
    parser.add_argument("--scale", type=float, default=None, help="fraction of the study's subject counts")
    parser.add_argument("--strategies", default="fedavg,fedbn,fedprox")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-synth", action="store_true", help="reuse the sites already under --out")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table and plots of finished runs")
    args = parser.parse_args()

    # CPU default vs the study's size on a GPU.
    if args.full:
        defaults = dict(scale=1.0, resolution=1.0, spacing=1.0, shape=[160, 192, 160], channels=[32, 64, 128, 256, 256, 64],
                        dropout=0.5, loss="kl", lr=1e-3, batch_size=8, num_workers=8, precision="bf16-mixed",
                        accelerator="cuda", channels_last=True, compile=True, resident=True, rounds=40, patience=8)
    else:
        # 4 mm input and four pooling blocks: the last feature map stays 3x3x3 (with five blocks it would
        # be 1x1x1 and BatchNorm would normalise across the subjects of a batch).
        defaults = dict(scale=0.18, resolution=2.0, spacing=4.0, shape=[48, 56, 48], channels=[8, 16, 32, 64, 16],
                        dropout=0.2, loss="l1", lr=1e-3, batch_size=8, num_workers=0, precision="32-true",
                        accelerator="cpu", channels_last=False, compile=False, resident=False, rounds=25, patience=8)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.out = args.out.resolve()
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for s in strategies:
        if s not in STRATEGIES:
            sys.exit(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")

    healthy_mean = round(args.scale * (586 + 491 + 653) / 3)
    ms_mean = round(args.scale * (96 + 756 + 2424) / 3 / 4)  # MS cohorts a quarter of the study, Prague dominates
    healthy_roots = [str(args.out / "sites" / s) for s in HEALTHY]
    ms_roots = [str(args.out / "sites_ms" / s) for s in MS]
    timings: dict[str, float] = {}
    if not (args.skip_synth or args.report_only):
        for folder in ("sites", "sites_ms", "runs", "cache"):
            shutil.rmtree(args.out / folder, ignore_errors=True)
        timings["synth healthy"] = run(neurofed("synth", "--out", str(args.out / "sites"), "--sites", ",".join(HEALTHY),
                                                "--subjects", str(healthy_mean), "--resolution", str(args.resolution),
                                                "--seed", str(args.seed), "--no-progress"), logs / "synth_healthy.log")
        timings["synth ms"] = run(neurofed("synth", "--out", str(args.out / "sites_ms"), "--cohort", "ms",
                                           "--sites", ",".join(MS), "--subjects", str(max(ms_mean, 20)),
                                           "--resolution", str(args.resolution), "--seed", str(args.seed + 1),
                                           "--no-progress"), logs / "synth_ms.log")

    runs: dict[str, dict] = {}
    if args.report_only:
        for name, run_dir in [("brain age / centralized", "central")] + [
            (f"brain age / federated {s}", f"federated_{s}") for s in strategies
        ] + [("sdmt / deep", "sdmt_deep"), ("sdmt / shallow", "sdmt_shallow")]:
            runs[name] = json.loads((args.out / "runs" / run_dir / "test_metrics.json").read_text())
        write_outputs(args, runs, timings, strategies)
        return
    base = ["--config", str(REPO / "configs" / "brain_age_cpu.yaml"), *size_args(args), *brain_age_model_args(args)]
    timings["brain age centralized"] = run(
        neurofed("fit", *base, "--data.root", json.dumps(healthy_roots), "--trainer.run_name", "central"),
        logs / "central.log")
    runs["brain age / centralized"] = read_results(args.out / "runs" / "central", healthy_roots)
    for s in strategies:
        timings[f"brain age {s}"] = run(
            neurofed("simulate", "--roots", ",".join(healthy_roots), "fit", *base,
                     "--trainer.strategy.class_path", STRATEGIES[s], "--trainer.run_name", f"federated_{s}"),
            logs / f"federated_{s}.log")
        runs[f"brain age / federated {s}"] = read_results(args.out / "runs" / f"federated_{s}", healthy_roots)

    brain_age_ckpt = args.out / "runs" / f"federated_{strategies[0]}" / "site-0" / "best.ckpt"
    for transfer, config in (("deep", "sdmt_deep_cpu.yaml"), ("shallow", "sdmt_shallow_cpu.yaml")):
        timings[f"sdmt {transfer}"] = run(
            neurofed("simulate", "--roots", ",".join(ms_roots), "fit", "--config", str(REPO / "configs" / config),
                     *size_args(args), "--model.init_args.brain_age_checkpoint", str(brain_age_ckpt),
                     "--model.init_args.channels_last", str(args.channels_last).lower(),
                     "--trainer.run_name", f"sdmt_{transfer}"),
            logs / f"sdmt_{transfer}.log")
        runs[f"sdmt / {transfer}"] = read_results(args.out / "runs" / f"sdmt_{transfer}", ms_roots)

    write_outputs(args, runs, timings, strategies)


def _num(row: dict, key: str) -> float:
    """A metric of a results row; NaN where it is missing or was stored as null (e.g. r of one subject)."""
    value = row.get(key)
    return float("nan") if value is None else float(value)


def write_outputs(args: argparse.Namespace, runs: dict[str, dict], timings: dict[str, float], strategies: list[str]) -> None:
    lines = ["run\tsite\tn\tmae\trmse\tr\tr2\tbaseline_mae"]
    for name, rows in runs.items():
        for site, row in rows.items():
            lines.append("\t".join([name, site] + [f"{_num(row, k):.3f}" for k in
                                                   ("n", "mae", "rmse", "r", "r2", "baseline_mae")]))
    (args.out / "results.tsv").write_text("\n".join(lines) + "\n")

    md = ["| task / run | site | n | MAE | r | predict-the-mean MAE |", "|---|---|---|---|---|---|"]
    for name, rows in runs.items():
        for site, row in rows.items():
            md.append(f"| {name} | {site} | {_num(row, 'n'):.0f} | {_num(row, 'mae'):.2f} | "
                      f"{_num(row, 'r'):.2f} | {_num(row, 'baseline_mae'):.2f} |")
    fed = runs.get(f"brain age / federated {strategies[0]}", {}).get("pooled", {})
    cen = runs.get("brain age / centralized", {}).get("pooled", {})
    deep = runs.get("sdmt / deep", {}).get("pooled", {})
    shallow = runs.get("sdmt / shallow", {}).get("pooled", {})
    md += ["", "| comparison | reference study | this run (pooled test MAE) |", "|---|---|---|",
           f"| brain age federated vs centralized | 6.08 vs 7.02 | {_num(fed, 'mae'):.2f} vs {_num(cen, 'mae'):.2f} |",
           f"| SDMT deep vs shallow (predict-the-mean) | 9.19 vs 11.05 | {_num(deep, 'mae'):.2f} vs "
           f"{_num(shallow, 'mae'):.2f} ({_num(deep, 'baseline_mae'):.2f}) |",
           "", "| step | minutes |", "|---|---|"] + [f"| {k} | {v / 60:.1f} |" for k, v in timings.items()]
    (args.out / "table.md").write_text("\n".join(md) + "\n")

    # Validation loss per round for every run, from each run's history.
    sys.path.insert(0, str(REPO / "src"))
    from neurofed.plots import loss_per_round

    curves = {}
    for run_dir in sorted((args.out / "runs").iterdir()):
        history = run_dir / "history.json"
        if history.is_file() and not run_dir.name.startswith("sdmt"):
            curves[run_dir.name] = [row["val/pooled/loss"] for row in json.loads(history.read_text())]
    if curves:
        loss_per_round(curves, args.out / "brain_age_val_loss.png", ylabel="pooled validation loss (L1, years)")
    print("\n".join(md))
    print(f"\nwrote {args.out / 'results.tsv'}, {args.out / 'table.md'} and plots under {args.out}")


if __name__ == "__main__":
    main()
