"""Replicate the reference study's table on synthetic data, with seeds and paired bootstrap intervals.

The reference study (three healthy centres IXI 586 / SALD 491 / CamCAN 653 scans; three MS centres Brussels 96 /
Greifswald 756 / Prague 2,424) reported brain-age MAE 6.08 y federated vs 7.02 y centralized, and SDMT MAE 9.19
(deep transfer) vs 11.05 (shallow). This script builds sites with those relative sizes and age ranges with
``neurofed synth`` (once) and then, for each seed, runs with the same code paths a user would:

1. brain age, centralized: one site holding the three healthy roots (``neurofed fit``);
2. brain age, federated: three site processes (``neurofed simulate ... fit``), for each strategy asked;
3. SDMT, federated over the three MS sites, deep and shallow transfer from that seed's federated brain-age
   model (the first strategy asked).

A seed changes the subject split (``--data.split_seed``) and the initialisation and shuffling
(``--seed_everything``); the synthetic cohorts stay the same.

**Uncertainty.** Each run writes its per-subject predictions at each site
(``<root>/derivatives/neurofed/runs/<run>/desc-<label>_predictions.tsv``); the benchmark reads the test rows
there (in a real deployment they never leave the site; here the benchmark plays the analyst at every site).
The intervals come from a paired, stratified cluster bootstrap (``neurofed.stats``): test subjects are
resampled with replacement within each (seed, site) stratum, all models of a task are evaluated on the same
resampled subjects, and the statistic is the MAE over all test scans of all seeds pooled. So an interval
covers the test-subject sampling of every seed's split; the spread between seeds (initialisation and which
subjects were used for training) is reported separately as mean ± SD of the per-seed pooled MAE.
Predict-the-mean predicts, for every test scan of a seed, the mean training label over all sites of that seed
(what the federation computes from label sums and counts). A difference "excludes zero" when its 95 %
interval does.

Outputs under ``--out``: ``results.tsv`` (one row per task, model, seed and site, plus pooled rows: n, MAE, RMSE,
r, predict-the-mean MAE), ``comparisons.tsv`` and ``table.md`` (MAE mean ± SD over seeds, pooled MAE with its
interval, every difference with its interval), the validation loss per round and timings.

The CPU default (``--scale 0.12``, 3 seeds, a 55/15/30 % train/validation/test split of each site's subjects): 207
healthy subjects (IXI 70, SALD 59, Cam-CAN 78), 62 test subjects (72-75 scans, some subjects have two sessions) per
seed, 138 distinct test subjects over the three seeds; MS cohorts a third of the study's, 134 patients (Brussels 6,
Greifswald 30, Prague 98), 40 test patients (46-50 scans) per seed, 88 distinct over the seeds; 4 mm input, a
quarter-width SFCN with four pooling blocks, up to 25 rounds (SDMT 15). Counts "over seeds" count a subject once per
seed in whose test split it falls. A 30 % test split gives as many test subjects as 15 % of a cohort twice the size,
at half the training cost: three seeds took 33.9 minutes on an idle 2-core machine (README, Results). ``--full``
runs the study's sizes (both cohorts) at 1 mm, 160x192x160, full width and bf16 on a GPU, with a 70/15/15 % split.

    python benchmarks/replication.py --out results/replication
    python benchmarks/replication.py --full --out results/replication_full
    python benchmarks/replication.py --out results/replication --report-only   # tables from finished runs
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from neurofed.predictions import DERIVATIVE_DIR, RUNS_DIR, run_folder
from neurofed.stats import BootstrapWeights

HEALTHY = ["ixi", "sald", "camcan"]
MS = ["brussels", "greifswald", "prague"]
HEALTHY_STUDY = 586 + 491 + 653
MS_STUDY = 96 + 756 + 2424
REFERENCE = {
    "brain age": {"federated": 6.08, "centralized": 7.02},
    "sdmt": {"deep": 9.19, "shallow": 11.05},
}
STRATEGIES = {
    "fedavg": "neurofed.federated.strategies.FedAvg",
    "fedbn": "neurofed.federated.strategies.FedBN",
    "fedprox": "neurofed.federated.strategies.FedProx",
    "fedadam": "neurofed.federated.strategies.FedAdam",
    "fedmedian": "neurofed.federated.strategies.FedMedian",
}
MEAN = "predict-the-mean"


def neurofed(*args: str) -> list[str]:
    return [sys.executable, "-m", "neurofed", *args]


#: CPU seconds (user + system) of every finished step's processes, by log name: on a shared machine the wall
#: time says little, while CPU seconds / cores bounds what an idle machine would take.
CPU_SECONDS: dict[str, float] = {}
#: ``--dry-run``: print each step's command instead of running it.
DRY_RUN = False


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str], log_path: Path) -> float:
    """Run one step, streaming its output to a log; stop the study with the log's tail if it fails."""
    start, cpu = time.perf_counter(), _children_cpu()
    print(f"$ {' '.join(cmd[2:])}", flush=True)
    if DRY_RUN:
        return 0.0
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        sys.exit(f"step failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    CPU_SECONDS[log_path.stem] = _children_cpu() - cpu
    print(f"  done in {seconds / 60:.1f} min, {CPU_SECONDS[log_path.stem] / 60:.1f} CPU min (log: {log_path})",
          flush=True)
    return seconds


def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """CPU default vs the study's size on a GPU, for every option left unset."""
    if args.full:
        defaults = {"scale": 1.0, "ms_fraction": 1.0, "split": [0.7, 0.15, 0.15], "resolution": 1.0, "spacing": 1.0,
                    "shape": [160, 192, 160], "channels": [32, 64, 128, 256, 256, 64], "dropout": 0.5, "loss": "kl",
                    "lr": 1e-3, "batch_size": 8, "num_workers": 8, "precision": "bf16-mixed", "accelerator": "cuda",
                    "channels_last": True, "compile": True, "resident": True, "rounds": 40, "patience": 8}
    else:
        # 4 mm input and four pooling blocks: the last feature map stays 3x3x3 (with five blocks it would
        # be 1x1x1 and BatchNorm would normalise across the subjects of a batch). A 30 % test split: the same
        # number of test subjects as 15 % of a cohort twice the size, at half the training cost.
        defaults = {"scale": 0.12, "ms_fraction": 1 / 3, "split": [0.55, 0.15, 0.30], "resolution": 2.0,
                    "spacing": 4.0, "shape": [48, 56, 48], "channels": [8, 16, 32, 64, 16], "dropout": 0.2,
                    "loss": "l1", "lr": 1e-3, "batch_size": 8, "num_workers": 0, "precision": "32-true",
                    "accelerator": "cpu", "channels_last": False, "compile": False, "resident": False, "rounds": 25,
                    "patience": 8}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.out = args.out.resolve()
    return args


def size_args(args: argparse.Namespace, seed: int) -> list[str]:
    """Overrides that make every run of the study use the same input size, width, precision and seed."""
    return [
        "--seed_everything", str(seed), "--data.split_seed", str(42 + seed), "--data.split", json.dumps(args.split),
        "--data.spacing", str(args.spacing), "--data.shape", json.dumps(args.shape),
        "--data.batch_size", str(args.batch_size), "--data.num_workers", str(args.num_workers),
        "--data.cache_dir", str(args.out / "cache"),
        "--trainer.default_root_dir", str(args.out / "runs"), "--trainer.enable_progress_bar", "false",
        "--trainer.precision", args.precision, "--trainer.accelerator", args.accelerator,
        "--trainer.compile", str(args.compile).lower(), "--data.resident", str(args.resident).lower(),
        "--trainer.rounds", str(args.rounds), "--trainer.patience", str(args.patience),
        "--trainer.lr_plateau_patience", str(max(2, args.patience // 2)),
    ]


def brain_age_model_args(args: argparse.Namespace, norm: str = "batch") -> list[str]:
    return [
        "--model.class_path", "neurofed.models.BrainAgeModule",
        "--model.init_args.channels", json.dumps(args.channels), "--model.init_args.norm", norm,
        "--model.init_args.dropout", str(args.dropout), "--model.init_args.loss", args.loss,
        "--model.init_args.lr", str(args.lr), "--model.init_args.channels_last", str(args.channels_last).lower(),
    ]


def synth(args: argparse.Namespace, folder: str, sites: list[str], subjects: int, seed: int, log: Path,
          cohort: str | None = None, site_effect: float = 1.0) -> float:
    extra = ["--cohort", cohort] if cohort else []
    return run(neurofed("synth", "--out", str(args.out / folder), "--sites", ",".join(sites), *extra,
                        "--subjects", str(subjects), "--resolution", str(args.resolution), "--seed", str(seed),
                        "--site-effect", str(site_effect), "--no-progress"), log)


# ---------------------------------------------------------------------------------------------------- analysis


def read_test_predictions(roots: list[str], run_name: str, label: str) -> tuple[list[dict], float]:
    """The test rows of one run at every site (site, subject, session, target, prediction) and the run's
    pooled training-label mean (the predict-the-mean constant)."""
    rows, train = [], []
    for root in roots:
        path = Path(root) / DERIVATIVE_DIR / RUNS_DIR / run_folder(run_name) / f"desc-{label}_predictions.tsv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: did run {run_name!r} finish at site {Path(root).name}?")
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                if row[label] in ("n/a", ""):
                    continue
                if row["split"] == "train":
                    train.append(float(row[label]))
                elif row["split"] == "test":
                    rows.append({"site": Path(root).name, "subject": row["participant_id"],
                                 "session": row.get("session_id", "n/a"), "target": float(row[label]),
                                 "prediction": float(row["prediction"])})
    if not train:
        raise ValueError(f"run {run_name!r}: no training rows in its prediction tables")
    return rows, float(np.mean(train))


def metrics(target: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    err = pred - target
    r = float(np.corrcoef(target, pred)[0, 1]) if target.size > 2 and np.std(pred) > 0 else math.nan
    ss = float(np.sum((target - target.mean()) ** 2))
    return {"n": float(target.size), "mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2))),
            "r": r, "r2": 1 - float(np.sum(err ** 2)) / ss if ss > 0 else math.nan}


def collect(task: str, models: dict[str, dict[int, str]], roots: list[str], label: str) -> dict:
    """Align every model's test predictions of one task on (seed, site, subject, session), add predict-the-mean.

    ``models``: model name -> seed -> run name. Returns keys, per-scan targets, predictions per model, strata and
    clusters for the bootstrap."""
    keys, target, strata, clusters = [], [], [], []
    preds: dict[str, list[float]] = {m: [] for m in [*models, MEAN]}
    seeds = sorted({s for runs in models.values() for s in runs})
    for seed in seeds:
        per_model, means = {}, {}
        for model, runs in models.items():
            if seed not in runs:
                raise ValueError(f"{task}: model {model!r} has no run for seed {seed}")
            rows, means[model] = read_test_predictions(roots, runs[seed], label)
            per_model[model] = {(r["site"], r["subject"], r["session"]): r for r in rows}
        first = next(iter(per_model.values()))
        for model, table in per_model.items():
            if set(table) != set(first):
                raise ValueError(f"{task}, seed {seed}: model {model!r} was tested on other scans than the others")
        mean = next(iter(means.values()))
        for key in sorted(first):
            keys.append((seed, *key))
            target.append(first[key]["target"])
            strata.append(f"{seed}/{key[0]}")
            clusters.append(f"{seed}/{key[0]}/{key[1]}")
            for model in models:
                preds[model].append(per_model[model][key]["prediction"])
            preds[MEAN].append(mean)
    return {"task": task, "keys": keys, "target": np.asarray(target), "strata": strata, "clusters": clusters,
            "preds": {m: np.asarray(p) for m, p in preds.items()}, "seeds": seeds}


def summarize(data: dict, comparisons: list[tuple[str, str]], n_boot: int) -> dict:
    """Per seed and site metrics, MAE mean ± SD over seeds, pooled MAE and differences with intervals."""
    seeds = np.asarray([k[0] for k in data["keys"]])
    sites = np.asarray([k[1] for k in data["keys"]])
    target = data["target"]
    rows = []
    for model, pred in data["preds"].items():
        for seed in data["seeds"]:
            in_seed = seeds == seed
            for site in [*dict.fromkeys(sites[in_seed]), "pooled"]:
                sel = in_seed if site == "pooled" else in_seed & (sites == site)
                rows.append({"task": data["task"], "model": model, "seed": seed, "site": site,
                             **metrics(target[sel], pred[sel]),
                             "baseline_mae": float(np.mean(np.abs(data["preds"][MEAN][sel] - target[sel])))})
    weights = BootstrapWeights(data["clusters"], data["strata"], n_boot=n_boot, seed=0)
    abs_err = {m: np.abs(p - target) for m, p in data["preds"].items()}
    models = {}
    for model in data["preds"]:
        per_seed = [r["mae"] for r in rows if r["model"] == model and r["site"] == "pooled"]
        models[model] = {"mae_seeds": per_seed, "mae_mean": float(np.mean(per_seed)),
                         "mae_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan,
                         "pooled": weights.mae(abs_err[model]),
                         "r": metrics(target, data["preds"][model])["r"]}
    diffs = [(a, b, weights.mae_difference(abs_err[a], abs_err[b])) for a, b in comparisons]
    return {"rows": rows, "models": models, "diffs": diffs, "n_scans": int(target.size),
            "n_per_seed": [int(np.sum(seeds == s)) for s in data["seeds"]],
            "n_subjects": len(set(data["clusters"])),
            "n_unique_subjects": len({(k[1], k[2]) for k in data["keys"]})}


def summary_markdown(title: str, summary: dict, reference: str | None = None) -> list[str]:
    seeds = len(next(iter(summary["models"].values()))["mae_seeds"])
    md = [f"### {title}", "",
          (f"{summary['n_scans']} test scans pooled over {seeds} seed(s) and the sites (per seed: "
          f"{', '.join(map(str, summary['n_per_seed']))}; {summary['n_unique_subjects']} distinct subjects)."), "",
          "| model | MAE per seed, mean ± SD | MAE, all seeds pooled [95 % CI] | r |", "|---|---|---|---|"]
    for model, m in summary["models"].items():
        sd = "" if math.isnan(m["mae_sd"]) else f" ± {m['mae_sd']:.2f}"
        r = "" if model == MEAN or math.isnan(m["r"]) else f"{m['r']:.2f}"
        md.append(f"| {model} | {m['mae_mean']:.2f}{sd} | {m['pooled'].format()} | {r} |")
    md += ["", "| comparison | ΔMAE (A − B) [95 % CI] | interval excludes zero |", "|---|---|---|"]
    for a, b, ci in summary["diffs"]:
        verdict = ("yes: A lower" if ci.high < 0 else "yes: A higher") if ci.excludes_zero else "no"
        md.append(f"| {a} − {b} | {ci.format()} | {verdict} |")
    if reference:
        md += ["", reference]
    return md + [""]


def write_tables(out: Path, summaries: dict[str, dict]) -> None:
    fields = ["task", "model", "seed", "site", "n", "mae", "rmse", "r", "r2", "baseline_mae"]
    lines = ["\t".join(fields)]
    for summary in summaries.values():
        for row in summary["rows"]:
            lines.append("\t".join(str(row[f]) if f in ("task", "model", "seed", "site") else
                                   f"{row[f]:.3f}" for f in fields))
    (out / "results.tsv").write_text("\n".join(lines) + "\n")
    lines = ["task\tmodel_a\tmodel_b\tdelta_mae\tlow\thigh\texcludes_zero"]
    for task, summary in summaries.items():
        for a, b, ci in summary["diffs"]:
            lines.append(f"{task}\t{a}\t{b}\t{ci.estimate:.3f}\t{ci.low:.3f}\t{ci.high:.3f}\t{ci.excludes_zero}")
        for model, m in summary["models"].items():
            ci = m["pooled"]
            lines.append(f"{task}\t{model}\t\t{ci.estimate:.3f}\t{ci.low:.3f}\t{ci.high:.3f}\t")
    (out / "comparisons.tsv").write_text("\n".join(lines) + "\n")


def scatter_first_seed(data: dict, names: dict[str, str], seed: int, out: Path) -> None:
    """True vs predicted age on the test split of one seed, one colour per site, for each brain-age model:
    a scanner offset shows as a whole site shifted off the identity line while its ranking stays right."""
    from neurofed.plots import scatter_true_vs_predicted

    keys = data["keys"]
    in_seed = np.asarray([k[0] == seed for k in keys])
    sites = np.asarray([k[1] for k in keys])
    for model, name in names.items():
        if model not in data["preds"]:
            continue
        per_site = {site: (data["target"][in_seed & (sites == site)], data["preds"][model][in_seed & (sites == site)])
                    for site in dict.fromkeys(sites[in_seed])}
        scatter_true_vs_predicted(per_site, out / f"brain_age_{name}_s{seed}_test_scatter.png", label="age",
                                  run=f"{name}_s{seed}", split="test")


# ---------------------------------------------------------------------------------------------------- study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "replication")
    parser.add_argument("--full", action="store_true", help="study sizes, 1 mm, full-width SFCN, bf16, GPU")
    parser.add_argument("--scale", type=float, default=None, help="fraction of the study's subject counts")
    parser.add_argument("--ms-fraction", type=float, default=None,
                        help="MS cohorts as a fraction of the scaled study (CPU default 1/3, --full 1)")
    parser.add_argument("--strategies", default="fedavg,fedbn,fedprox",
                        help=f"comma-separated, from {', '.join(STRATEGIES)}; the first gives SDMT its backbone")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--split", type=lambda t: [float(x) for x in t.split(",")], default=None,
                        help="train,val,test fractions of each site's subjects (CPU default 0.55,0.15,0.30)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (split + initialisation)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; also the synthetic cohorts' seed")
    parser.add_argument("--site-effect", type=float, default=1.0, help="scale of the scanner differences")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates")
    parser.add_argument("--skip-synth", action="store_true", help="reuse the sites already under --out")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the tables of finished runs")
    parser.add_argument("--dry-run", action="store_true", help="print the steps' commands, run nothing")
    args = apply_defaults(parser.parse_args())
    global DRY_RUN
    DRY_RUN = args.dry_run
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for s in strategies:
        if s not in STRATEGIES:
            sys.exit(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    seeds = list(range(args.seed, args.seed + args.seeds))

    healthy_mean = round(args.scale * HEALTHY_STUDY / 3)
    ms_mean = max(round(args.scale * args.ms_fraction * MS_STUDY / 3), 20)
    healthy_roots = [str(args.out / "sites" / s) for s in HEALTHY]
    ms_roots = [str(args.out / "sites_ms" / s) for s in MS]
    timings_path = args.out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    start = time.perf_counter()
    if not (args.skip_synth or args.report_only):
        timings = {}
        if not args.dry_run:
            for folder in ("sites", "sites_ms", "runs", "cache"):
                shutil.rmtree(args.out / folder, ignore_errors=True)
        timings["synth healthy"] = synth(args, "sites", HEALTHY, healthy_mean, args.seed, logs / "synth_healthy.log",
                                         site_effect=args.site_effect)
        timings["synth ms"] = synth(args, "sites_ms", MS, ms_mean, args.seed + 1, logs / "synth_ms.log", cohort="ms",
                                    site_effect=args.site_effect)

    names = {"centralized": "central", **{f"federated {s}": f"federated_{s}" for s in strategies}}
    if not args.report_only:
        for seed in seeds:
            base = ["--config", str(REPO / "configs" / "brain_age_cpu.yaml"), *size_args(args, seed),
                    *brain_age_model_args(args)]
            timings[f"seed {seed}: brain age centralized"] = run(
                neurofed("fit", *base, "--data.root", json.dumps(healthy_roots),
                         "--trainer.run_name", f"central_s{seed}"), logs / f"central_s{seed}.log")
            for s in strategies:
                timings[f"seed {seed}: brain age {s}"] = run(
                    neurofed("simulate", "--roots", ",".join(healthy_roots), "fit", *base,
                             "--trainer.strategy.class_path", STRATEGIES[s], "--trainer.run_name",
                             f"federated_{s}_s{seed}"), logs / f"federated_{s}_s{seed}.log")
            ckpt = args.out / "runs" / f"federated_{strategies[0]}_s{seed}" / "site-0" / "best.ckpt"
            for transfer, config in (("deep", "sdmt_deep_cpu.yaml"), ("shallow", "sdmt_shallow_cpu.yaml")):
                timings[f"seed {seed}: sdmt {transfer}"] = run(
                    neurofed("simulate", "--roots", ",".join(ms_roots), "fit", "--config",
                             str(REPO / "configs" / config), *size_args(args, seed),
                             "--model.init_args.brain_age_checkpoint", str(ckpt),
                             "--model.init_args.channels_last", str(args.channels_last).lower(),
                             "--trainer.run_name", f"sdmt_{transfer}_s{seed}"), logs / f"sdmt_{transfer}_s{seed}.log")
            timings_path.write_text(json.dumps(timings, indent=1))
        if args.dry_run:
            return
        timings["total (this invocation)"] = time.perf_counter() - start
        timings["CPU time of all steps (user + system)"] = sum(CPU_SECONDS.values())
        timings_path.write_text(json.dumps(timings, indent=1))

    # An interrupted study is reported from what finished: the seeds of which the centralized run finished,
    # and the models that finished on every one of those seeds (the table says which are missing).
    def finished(roots: list[str], name: str, label: str) -> bool:
        return all((Path(r) / DERIVATIVE_DIR / RUNS_DIR / run_folder(name) / f"desc-{label}_predictions.tsv").is_file()
                   for r in roots)

    done = [seed for seed in seeds if finished(healthy_roots, f"central_s{seed}", "age")]
    if not done:
        sys.exit("no seed has finished its centralized run yet")
    models = {m: n for m, n in names.items() if all(finished(healthy_roots, f"{n}_s{s}", "age") for s in done)}
    missing = [m for m in names if m not in models]
    brain = collect("brain age", {m: {s: f"{n}_s{s}" for s in done} for m, n in models.items()}, healthy_roots, "age")
    fed = [m for m in models if m != "centralized"]
    summaries = {"brain age": summarize(
        brain, [(f, "centralized") for f in fed] + [(m, MEAN) for m in models], args.n_boot)}
    sdmt_done = [s for s in done if all(finished(ms_roots, f"sdmt_{t}_s{s}", "sdmt") for t in ("deep", "shallow"))]
    if sdmt_done:
        sdmt = collect("sdmt", {t: {s: f"sdmt_{t}_s{s}" for s in sdmt_done} for t in ("deep", "shallow")},
                       ms_roots, "sdmt")
        summaries["sdmt"] = summarize(sdmt, [("deep", "shallow"), ("deep", MEAN), ("shallow", MEAN)], args.n_boot)
    else:
        missing.append("sdmt deep and shallow")
    write_tables(args.out, summaries)

    md = [(f"## Replication (seeds {', '.join(map(str, done))} of {', '.join(map(str, seeds))}; site effect "
           f"{args.site_effect}; {'--full' if args.full else 'CPU default'})"), "",
          ("Intervals: paired, stratified (seed × site) cluster bootstrap over test subjects, "
           f"{args.n_boot} replicates, MAE over all seeds' test scans pooled. Predict-the-mean: each seed's "
           "pooled training-label mean."), ""]
    if missing or len(done) < len(seeds):
        md += [f"**Incomplete study:** not finished on every reported seed: {', '.join(missing) or 'none'}; "
               f"seeds not reported: {', '.join(str(s) for s in seeds if s not in done) or 'none'}"
               + (f"; SDMT from seeds {', '.join(map(str, sdmt_done))} only" if sdmt_done and sdmt_done != done
                  else "") + ".", ""]
    md += summary_markdown("Brain age (years)", summaries["brain age"],
                           "Reference study: federated 6.08 vs centralized 7.02.")
    if "sdmt" in summaries:
        md += summary_markdown(f"SDMT, transfer from the federated {strategies[0]} brain-age model (points)",
                               summaries["sdmt"], "Reference study: deep 9.19 vs shallow 11.05.")
    md += ["### Per site (MAE pooled over seeds; predict-the-mean in brackets)", "",
           "| task | model | " + " | ".join(HEALTHY) + " | " + " | ".join(MS) + " |",
           "|---|---|" + "---|" * 6]
    for task, summary in summaries.items():
        data = brain if task == "brain age" else sdmt
        sites = np.asarray([k[1] for k in data["keys"]])
        for model in summary["models"]:
            if model == MEAN:
                continue
            cells = []
            for site in HEALTHY + MS:
                sel = sites == site
                if not sel.any():
                    cells.append("")
                    continue
                mae = np.mean(np.abs(data["preds"][model][sel] - data["target"][sel]))
                base = np.mean(np.abs(data["preds"][MEAN][sel] - data["target"][sel]))
                cells.append(f"{mae:.2f} ({base:.2f}), n={int(sel.sum())}")
            md.append(f"| {task} | {model} | " + " | ".join(cells) + " |")
    md += ["", "| step | minutes |", "|---|---|"] + [f"| {k} | {v / 60:.1f} |" for k, v in timings.items()]
    (args.out / "table.md").write_text("\n".join(md) + "\n")

    from neurofed.plots import loss_per_round

    curves = {}
    for run_dir in sorted((args.out / "runs").iterdir()):
        history = run_dir / "history.json"
        if history.is_file() and not run_dir.name.startswith("sdmt") and run_dir.name.endswith(f"_s{done[0]}"):
            curves[run_dir.name] = [row["val/pooled/loss"] for row in json.loads(history.read_text())]
    if curves:
        loss_per_round(curves, args.out / "brain_age_val_loss.png", ylabel="pooled validation loss (L1, years)")
    scatter_first_seed(brain, names, done[0], args.out)
    print("\n".join(md))
    print(f"\nwrote {args.out / 'results.tsv'}, {args.out / 'comparisons.tsv'}, {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
