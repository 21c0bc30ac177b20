"""Replicate the reference study's table on synthetic data, with seeds and intervals that resample them.

The reference study (three healthy centres IXI 586 / SALD 491 / CamCAN 653 scans; three MS centres Brussels 96 /
Greifswald 756 / Prague 2,424) reported brain-age MAE 6.08 y federated vs 7.02 y centralized, and SDMT MAE 9.19
(deep transfer) vs 11.05 (shallow). This script builds sites with those relative sizes and age ranges with
``neurofed synth`` (once) and then, for each seed, runs with the same code paths a user would and the training
recipe of the shipped configs (``configs/brain_age_cpu.yaml``, ``configs/sdmt_*_cpu.yaml``):

1. brain age, centralized: one site holding the three healthy roots (``neurofed fit``);
2. brain age, federated: three site processes (``neurofed simulate ... fit``), for each strategy asked;
3. the control "centralized + per-site BatchNorm": the centralized model with its BatchNorm statistics
   re-estimated on each site's own training scans, no training (how much of a federated rule's gain is
   normalisation alone);
4. SDMT, federated over the three MS sites, deep and shallow transfer from that seed's federated brain-age
   model (the first strategy asked).

A seed changes the subject split (``--data.split_seed``) and the initialisation and shuffling
(``--seed_everything``); the synthetic cohorts stay the same.

**Uncertainty.** Each run writes its per-subject predictions at each site
(``<root>/derivatives/neurofed/runs/<run>/desc-<label>_predictions.tsv``); the benchmark reads the test rows
there (in a real deployment they never leave the site; here the benchmark plays the analyst at every site).
Intervals come from a paired, hierarchical bootstrap (``neurofed.stats``): each replicate draws the seeds with
replacement, then, for every drawn seed, the test subjects with replacement within each site, and evaluates
every model on the same draw. So an interval covers training randomness (initialisation, data order, which
subjects trained) as well as the choice of test subjects, and a difference is called significant only when its
interval excludes zero. Per-seed values are reported beside it. Predict-the-mean predicts, for every test scan
of a seed, the mean training label over all sites of that seed (what the federation computes from label sums
and counts).

**Stability.** For every run, the largest rise of the pooled validation loss over the best so far after the
warm-up (``stability.tsv``): a smooth recipe keeps it small, so the best round is not a lucky one.

Outputs: the runs, logs and synthetic sites under ``--out``; the results files under ``--results`` (default
``docs/results/replication/``): ``results.tsv`` (task, model, seed, site: n, MAE, RMSE, r, predict-the-mean
MAE), ``comparisons.tsv`` (every model's pooled MAE and every difference, with intervals),
``stability.tsv``, ``meta.json`` (command, commit, seeds, settings, minutes per step), the validation loss per
round and scatter plots of seed 0. ``docs/results/replication.md`` and README are rendered from them
(``benchmarks/report.py``).

The CPU default (``--scale 0.12``, 5 seeds, a 55/15/30 % train/validation/test split of each site's subjects):
207 healthy subjects (IXI 70, SALD 59, Cam-CAN 78), about 62 test subjects per seed; MS cohorts a third of the
study's, 134 patients (Brussels 6, Greifswald 30, Prague 98), about 40 test patients per seed; 4 mm input, a
quarter-width SFCN with four pooling blocks. ``--full`` runs the study's sizes (both cohorts) at 1 mm,
160x192x160, full width and bf16 on a GPU, with a 70/15/15 % split.

    python benchmarks/replication.py --out results/replication
    python benchmarks/replication.py --full --out results/replication_full --results results/replication_full
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import write_meta

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
CENTRAL_SITE_BN = "centralized + per-site BN"


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
    """CPU default vs the study's size on a GPU, for every option left unset.

    Only sizes and the device are set here; the training recipe (learning rate, schedule, BatchNorm handling,
    stopping) is that of the shipped configs, so the replication measures what a user gets.
    """
    if args.full:
        defaults = {"scale": 1.0, "ms_fraction": 1.0, "split": [0.7, 0.15, 0.15], "resolution": 1.0, "spacing": 1.0,
                    "shape": [160, 192, 160], "channels": [32, 64, 128, 256, 256, 64], "dropout": 0.5,
                    "batch_size": 8, "num_workers": 8, "precision": "bf16-mixed", "accelerator": "cuda",
                    "channels_last": True, "compile": True, "resident": True, "rounds": 40}
    else:
        # 4 mm input and four pooling blocks: the last feature map stays 3x3x3 (with five blocks it would
        # be 1x1x1 and BatchNorm would normalise across the subjects of a batch). A 30 % test split: the same
        # number of test subjects as 15 % of a cohort twice the size, at half the training cost.
        defaults = {"scale": 0.12, "ms_fraction": 1 / 3, "split": [0.55, 0.15, 0.30], "resolution": 2.0,
                    "spacing": 4.0, "shape": [48, 56, 48], "channels": [8, 16, 32, 64, 16], "dropout": 0.2,
                    "batch_size": None, "num_workers": 0, "precision": "32-true", "accelerator": "cpu",
                    "channels_last": False, "compile": False, "resident": False, "rounds": None}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.out = args.out.resolve()
    return args


def size_args(args: argparse.Namespace, seed: int) -> list[str]:
    """Overrides that make every run of the study use the same input size, width, precision and seed."""
    extra = []
    if args.rounds is not None:
        extra += ["--trainer.rounds", str(args.rounds)]
    if args.batch_size is not None:
        extra += ["--data.batch_size", str(args.batch_size)]
    return [
        "--seed_everything", str(seed), "--data.split_seed", str(42 + seed), "--data.split", json.dumps(args.split),
        "--data.spacing", str(args.spacing), "--data.shape", json.dumps(args.shape),
        "--data.num_workers", str(args.num_workers), "--data.cache_dir", str(args.out / "cache"),
        "--trainer.default_root_dir", str(args.out / "runs"), "--trainer.enable_progress_bar", "false",
        "--trainer.precision", args.precision, "--trainer.accelerator", args.accelerator,
        "--trainer.compile", str(args.compile).lower(), "--data.resident", str(args.resident).lower(),
        "--trainer.overwrite", "true", *extra,
    ]


def brain_age_model_args(args: argparse.Namespace, norm: str = "batch") -> list[str]:
    return [
        "--model.class_path", "neurofed.models.BrainAgeModule",
        "--model.init_args.channels", json.dumps(args.channels), "--model.init_args.norm", norm,
        "--model.init_args.dropout", str(args.dropout),
        "--model.init_args.channels_last", str(args.channels_last).lower(),
    ]


def synth(args: argparse.Namespace, folder: str, sites: list[str], subjects: int, seed: int, log: Path,
          cohort: str | None = None, site_effect: float = 1.0, age_ranges: str | None = None) -> float:
    extra = ["--cohort", cohort] if cohort else []
    if age_ranges:
        extra += ["--age-ranges", age_ranges]
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


def site_bn_predictions(checkpoint: Path, roots: list[str], args: argparse.Namespace, seed: int,
                        label: str = "age") -> list[dict]:
    """Test predictions of a checkpoint at each root with BatchNorm statistics of that root's training scans.

    The control "centralized + per-site BN": the same weights, only the normalisation statistics change, so
    the gap between it and the centralized model is what per-site normalisation alone is worth.
    """
    import torch

    from neurofed.data import BrainMRIDataModule
    from neurofed.federated.precise_bn import recompute_batchnorm, statistics_loader
    from neurofed.models import BrainAgeModule

    rows = []
    for root in roots:
        model = BrainAgeModule.load_from_checkpoint(str(checkpoint), map_location="cpu")
        data = BrainMRIDataModule(root=root, label=label, spacing=args.spacing, shape=args.shape,
                                  split=args.split, split_seed=42 + seed, cache_dir=str(args.out / "cache"),
                                  batch_size=args.batch_size or 8, num_workers=0, augment=False)
        data.setup("fit")
        recompute_batchnorm(model, statistics_loader(data.train_dataloader()), data)
        model.eval()
        with torch.no_grad():
            for batch in data.test_dataloader():
                pred = model(model._image(batch)).float()
                for i, target in enumerate(batch["target"].tolist()):
                    rows.append({"site": Path(root).name, "subject": batch["participant_id"][i],
                                 # as the prediction tables name it (BIDS session_id)
                                 "session": f"ses-{batch['session'][i]}" if batch["session"][i] else "n/a",
                                 "target": float(target),
                                 "prediction": float(pred[i])})
    return rows


def metrics(target: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    err = pred - target
    r = float(np.corrcoef(target, pred)[0, 1]) if target.size > 2 and np.std(pred) > 0 else math.nan
    ss = float(np.sum((target - target.mean()) ** 2))
    return {"n": float(target.size), "mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2))),
            "r": r, "r2": 1 - float(np.sum(err ** 2)) / ss if ss > 0 else math.nan}


def collect(task: str, models: dict[str, dict[int, str]], roots: list[str], label: str,
            extra: dict[str, dict[int, list[dict]]] | None = None) -> dict:
    """Align every model's test predictions of one task on (seed, site, subject, session), add predict-the-mean.

    ``models``: model name -> seed -> run name; ``extra``: model name -> seed -> prediction rows computed by
    the benchmark itself (controls and references). Returns keys, per-scan targets, predictions per model,
    strata, clusters and seeds for the bootstrap."""
    extra = extra or {}
    keys, target, strata, clusters, groups = [], [], [], [], []
    preds: dict[str, list[float]] = {m: [] for m in [*models, *extra, MEAN]}
    seeds = sorted({s for runs in models.values() for s in runs})
    for seed in seeds:
        per_model, means = {}, {}
        for model, runs in models.items():
            if seed not in runs:
                raise ValueError(f"{task}: model {model!r} has no run for seed {seed}")
            rows, means[model] = read_test_predictions(roots, runs[seed], label)
            per_model[model] = {(r["site"], r["subject"], r["session"]): r for r in rows}
        for model, by_seed in extra.items():
            per_model[model] = {(r["site"], r["subject"], r["session"]): r for r in by_seed[seed]}
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
            groups.append(seed)
            for model in per_model:
                preds[model].append(per_model[model][key]["prediction"])
            preds[MEAN].append(mean)
    return {"task": task, "keys": keys, "target": np.asarray(target), "strata": strata, "clusters": clusters,
            "groups": groups, "preds": {m: np.asarray(p) for m, p in preds.items()}, "seeds": seeds}


def summarize(data: dict, comparisons: list[tuple[str, str]], n_boot: int) -> dict:
    """Per seed and site metrics, MAE mean ± SD over seeds, pooled MAE and differences with intervals that
    resample seeds and subjects."""
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
    weights = BootstrapWeights(data["clusters"], data["strata"], n_boot=n_boot, seed=0, groups=data["groups"])
    abs_err = {m: np.abs(p - target) for m, p in data["preds"].items()}
    models = {}
    for model in data["preds"]:
        per_seed = [r["mae"] for r in rows if r["model"] == model and r["site"] == "pooled"]
        models[model] = {"mae_seeds": per_seed, "mae_mean": float(np.mean(per_seed)),
                         "mae_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan,
                         "pooled": weights.mae(abs_err[model]),
                         "r": metrics(target, data["preds"][model])["r"]}
    diffs = [(a, b, weights.mae_difference(abs_err[a], abs_err[b])) for a, b in comparisons]
    ratios = [(a, b, weights.mae_ratio(abs_err[a], abs_err[b])) for a, b in comparisons if b != MEAN]
    return {"rows": rows, "models": models, "diffs": diffs, "ratios": ratios, "n_scans": int(target.size),
            "n_per_seed": [int(np.sum(seeds == s)) for s in data["seeds"]],
            "n_subjects": len(set(data["clusters"])),
            "n_unique_subjects": len({(k[1], k[2]) for k in data["keys"]})}


def stability(history_path: Path, warmup: int) -> dict[str, float]:
    """Rounds run, best round, and the largest rise of the pooled validation loss over the best of the rounds
    before it, counted after the warm-up (``max_rise``, a fraction: 0.15 = 15 % above the best so far)."""
    losses = [row["val/pooled/loss"] for row in json.loads(history_path.read_text())]
    rises = [losses[r] / min(losses[:r]) - 1 for r in range(max(warmup, 1), len(losses))]
    return {"rounds": len(losses), "best_round": int(np.argmin(losses)) + 1, "best": float(min(losses)),
            "last": float(losses[-1]), "max_rise": float(max(rises)) if rises else 0.0}


def write_tables(results: Path, summaries: dict[str, dict]) -> None:
    fields = ["task", "model", "seed", "site", "n", "mae", "rmse", "r", "r2", "baseline_mae"]
    lines = ["\t".join(fields)]
    for summary in summaries.values():
        for row in summary["rows"]:
            lines.append("\t".join(str(row[f]) if f in ("task", "model", "seed", "site") else
                                   f"{row[f]:.3f}" for f in fields))
    (results / "results.tsv").write_text("\n".join(lines) + "\n")
    lines = ["task\tkind\tmodel_a\tmodel_b\testimate\tlow\thigh\texcludes_zero\tseed_values\tr"]
    for task, summary in summaries.items():
        for model, m in summary["models"].items():
            ci = m["pooled"]
            seeds = ",".join(f"{v:.3f}" for v in m["mae_seeds"])
            lines.append(f"{task}\tmae\t{model}\t\t{ci.estimate:.3f}\t{ci.low:.3f}\t{ci.high:.3f}\t\t{seeds}\t"
                         f"{m['r']:.3f}")
        for kind, entries in (("difference", summary["diffs"]), ("ratio", summary["ratios"])):
            for a, b, ci in entries:
                lines.append(f"{task}\t{kind}\t{a}\t{b}\t{ci.estimate:.3f}\t{ci.low:.3f}\t{ci.high:.3f}\t"
                             f"{ci.excludes_zero if kind == 'difference' else ci.low > 1 or ci.high < 1}\t\t")
    (results / "comparisons.tsv").write_text("\n".join(lines) + "\n")


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


def finished(roots: list[str], name: str, label: str) -> bool:
    """Whether run ``name`` wrote its predictions at every root."""
    return all((Path(r) / DERIVATIVE_DIR / RUNS_DIR / run_folder(name) / f"desc-{label}_predictions.tsv").is_file()
               for r in roots)


def warmup_rounds(config: Path) -> int:
    """The warm-up of the config's learning-rate schedule (0 without one): stability is counted after it."""
    import yaml

    schedule = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("lr_schedule") or {}
    return int(schedule.get("warmup_rounds", 0))


# ---------------------------------------------------------------------------------------------------- study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "replication")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results" / "replication",
                        help="where the results files go (small text files and figures)")
    parser.add_argument("--full", action="store_true", help="study sizes, 1 mm, full-width SFCN, bf16, GPU")
    parser.add_argument("--scale", type=float, default=None, help="fraction of the study's subject counts")
    parser.add_argument("--ms-fraction", type=float, default=None,
                        help="MS cohorts as a fraction of the scaled study (CPU default 1/3, --full 1)")
    parser.add_argument("--strategies", default="fedavg,fedbn",
                        help=f"comma-separated, from {', '.join(STRATEGIES)}; the first gives SDMT its backbone")
    parser.add_argument("--rounds", type=int, default=None, help="default: the config's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--split", type=lambda t: [float(x) for x in t.split(",")], default=None,
                        help="train,val,test fractions of each site's subjects (CPU default 0.55,0.15,0.30)")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (split + initialisation)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; also the synthetic cohorts' seed")
    parser.add_argument("--site-effect", type=float, default=1.0, help="scale of the scanner differences")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates")
    parser.add_argument("--no-sdmt", action="store_true", help="brain age only")
    parser.add_argument("--skip-synth", action="store_true", help="reuse the sites already under --out")
    parser.add_argument("--resume", action="store_true", help="skip runs that already finished")
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
    brain_config = REPO / "configs" / "brain_age_cpu.yaml"

    healthy_mean = round(args.scale * HEALTHY_STUDY / 3)
    ms_mean = max(round(args.scale * args.ms_fraction * MS_STUDY / 3), 20)
    healthy_roots = [str(args.out / "sites" / s) for s in HEALTHY]
    ms_roots = [str(args.out / "sites_ms" / s) for s in MS]
    timings_path = args.out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    start = time.perf_counter()
    have_sites = all(Path(r, "participants.tsv").is_file() for r in healthy_roots + ([] if args.no_sdmt else ms_roots))
    if not (args.skip_synth or args.report_only or (args.resume and have_sites)):
        timings = {}
        if not args.dry_run:
            for folder in ("sites", "sites_ms", "runs", "cache"):
                shutil.rmtree(args.out / folder, ignore_errors=True)
        timings["synth healthy"] = synth(args, "sites", HEALTHY, healthy_mean, args.seed, logs / "synth_healthy.log",
                                         site_effect=args.site_effect)
        if not args.no_sdmt:
            timings["synth ms"] = synth(args, "sites_ms", MS, ms_mean, args.seed + 1, logs / "synth_ms.log",
                                        cohort="ms", site_effect=args.site_effect)

    names = {"centralized": "central", **{f"federated {s}": f"federated_{s}" for s in strategies}}
    if not args.report_only:
        for seed in seeds:
            base = ["--config", str(brain_config), *size_args(args, seed), *brain_age_model_args(args)]
            steps = [("brain age centralized", "central", neurofed("fit", *base, "--data.root", json.dumps(healthy_roots),
                                                                    "--trainer.run_name", f"central_s{seed}"),
                      healthy_roots)]
            for s in strategies:
                steps.append((f"brain age {s}", f"federated_{s}", neurofed(
                    "simulate", "--roots", ",".join(healthy_roots), "fit", *base,
                    "--trainer.strategy.class_path", STRATEGIES[s], "--trainer.run_name", f"federated_{s}_s{seed}"),
                    healthy_roots))
            ckpt = args.out / "runs" / f"federated_{strategies[0]}_s{seed}" / "site-0" / "best.ckpt"
            for transfer, config in (() if args.no_sdmt else (("deep", "sdmt_deep_cpu.yaml"),
                                                              ("shallow", "sdmt_shallow_cpu.yaml"))):
                steps.append((f"sdmt {transfer}", f"sdmt_{transfer}", neurofed(
                    "simulate", "--roots", ",".join(ms_roots), "fit", "--config", str(REPO / "configs" / config),
                    *size_args(args, seed), "--model.init_args.brain_age_checkpoint", str(ckpt),
                    "--model.init_args.channels_last", str(args.channels_last).lower(),
                    "--trainer.run_name", f"sdmt_{transfer}_s{seed}"), ms_roots))
            for title, name, cmd, roots in steps:
                label = "sdmt" if name.startswith("sdmt") else "age"
                if args.resume and finished(roots, f"{name}_s{seed}", label):
                    continue
                timings[f"seed {seed}: {title}"] = run(cmd, logs / f"{name}_s{seed}.log")
            timings_path.write_text(json.dumps(timings, indent=1))
        if args.dry_run:
            return
        timings["total (this invocation)"] = time.perf_counter() - start
        timings["CPU time of all steps (user + system)"] = sum(CPU_SECONDS.values())
        timings_path.write_text(json.dumps(timings, indent=1))
    report(args, seeds, strategies, names, healthy_roots, ms_roots, timings, brain_config)


def report(args: argparse.Namespace, seeds: list[int], strategies: list[str], names: dict[str, str],
           healthy_roots: list[str], ms_roots: list[str], timings: dict[str, float], brain_config: Path) -> None:
    """Tables, stability and figures of the finished runs, into ``args.results``; an interrupted study is
    reported from what finished (the seeds of which the centralized run finished, and the models that finished
    on every one of those seeds), and ``meta.json`` says what is missing."""
    done = [seed for seed in seeds if finished(healthy_roots, f"central_s{seed}", "age")]
    if not done:
        sys.exit("no seed has finished its centralized run yet")
    models = {m: n for m, n in names.items() if all(finished(healthy_roots, f"{n}_s{s}", "age") for s in done)}
    missing = [m for m in names if m not in models]
    t0 = time.perf_counter()
    control = {CENTRAL_SITE_BN: {s: site_bn_predictions(args.out / "runs" / f"central_s{s}" / "site-0" / "best.ckpt",
                                                         healthy_roots, args, s) for s in done}}
    timings["control: centralized + per-site BN, all seeds"] = time.perf_counter() - t0
    brain = collect("brain age", {m: {s: f"{n}_s{s}" for s in done} for m, n in models.items()}, healthy_roots,
                    "age", extra=control)
    fed = [m for m in models if m != "centralized"]
    comparisons = [(f, "centralized") for f in fed] + [(CENTRAL_SITE_BN, "centralized")]
    comparisons += [(f, CENTRAL_SITE_BN) for f in fed] + [(m, MEAN) for m in [*models, CENTRAL_SITE_BN]]
    summaries = {"brain age": summarize(brain, comparisons, args.n_boot)}
    sdmt_done = [s for s in done if all(finished(ms_roots, f"sdmt_{t}_s{s}", "sdmt") for t in ("deep", "shallow"))]
    if sdmt_done:
        sdmt = collect("sdmt", {t: {s: f"sdmt_{t}_s{s}" for s in sdmt_done} for t in ("deep", "shallow")},
                       ms_roots, "sdmt")
        summaries["sdmt"] = summarize(sdmt, [("deep", "shallow"), ("deep", MEAN), ("shallow", MEAN)], args.n_boot)
    elif not args.no_sdmt:
        missing.append("sdmt deep and shallow")
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    write_tables(results, summaries)

    warmup = warmup_rounds(brain_config)
    lines = ["task\trun\tseed\trounds\tbest_round\tbest\tlast\tmax_rise"]
    curves = {}
    for name in [*models.values(), *(["sdmt_deep", "sdmt_shallow"] if sdmt_done else [])]:
        for seed in (sdmt_done if name.startswith("sdmt") else done):
            history = args.out / "runs" / f"{name}_s{seed}" / "history.json"
            st = stability(history, warmup)
            lines.append(f"{'sdmt' if name.startswith('sdmt') else 'brain age'}\t{name}\t{seed}\t{st['rounds']}\t"
                         f"{st['best_round']}\t{st['best']:.3f}\t{st['last']:.3f}\t{st['max_rise']:.4f}")
            if seed == done[0] and not name.startswith("sdmt"):
                curves[name] = [row["val/pooled/loss"] for row in json.loads(history.read_text())]
    (results / "stability.tsv").write_text("\n".join(lines) + "\n")

    from neurofed.plots import loss_per_round

    loss_per_round(curves, results / "brain_age_val_loss.png", ylabel="pooled validation loss (L1, years)",
                   run=f"seed {done[0]}")
    scatter_first_seed(brain, {m: n for m, n in names.items() if m in models}, done[0], results)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "results", "dry_run", "report_only")}
    write_meta(results, done, settings=settings, strategies=strategies, missing=missing,
               sdmt_seeds=sdmt_done, warmup_rounds=warmup,
               minutes={k: round(v / 60, 2) for k, v in timings.items()},
               test_scans={task: s["n_per_seed"] for task, s in summaries.items()},
               distinct_test_subjects={task: s["n_unique_subjects"] for task, s in summaries.items()})
    print(f"wrote {results}/: results.tsv, comparisons.tsv, stability.tsv, meta.json, figures")
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py")], cwd=REPO, check=False)


if __name__ == "__main__":
    main()
