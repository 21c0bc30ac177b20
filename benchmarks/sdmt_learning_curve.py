"""Learning curve of deep vs shallow SDMT transfer over the number of MS patients, with its floors and ceiling.

The reference study found deep transfer (fine-tune everything) better than shallow (a new last layer on frozen
brain-age features) at 3,276 MS scans; the CPU replication, at 134 patients, cannot tell them apart. Does the gap
open with more patients? This script answers with the same code paths as the replication
(``benchmarks/replication.py``: its CPU sizes, 4 mm input, quarter-width SFCN, the shipped SDMT configs):

1. ``neurofed synth --cohort ms`` writes the three MS sites once, at the largest size, with the study's
   proportions (Brussels 96 : Greifswald 756 : Prague 2,424). A smaller size is the first patients of each site
   of that cohort (a subject is the same draw whatever the cohort size), so the sizes are nested: the curve
   shows the effect of adding patients, not of drawing a new cohort. Each size is a BIDS folder per site whose
   subject folders link to the generated ones, so the preprocessed-scan cache is shared.
2. Per seed, a brain-age backbone: federated FedAvg over the replication's healthy sites (``brain_age_cpu.yaml``),
   as the replication's SDMT arm uses; or one given checkpoint for every seed (``--brain-age-checkpoint``).
3. Per size and seed: federated deep and shallow transfer (``configs/sdmt_{deep,shallow}_cpu.yaml``) over the
   three sites, and beside them the references of ``benchmarks/sdmt_references.py`` on the same split:
   predict-the-mean, the image-feature baseline, the linear probe of the frozen backbone, "perfect brain
   age" and the oracle of the true variables.

A seed changes the subject split and the initialisation; larger sizes may get fewer seeds (``--seeds``).
Intervals resample seeds, then test subjects within each seed and site (``BootstrapWeights(..., groups=seed)``),
all models on the same draw, so "deep − shallow excludes zero" is a property of the recipe, not of one run.

Outputs: runs, sites, cache and logs under ``--out`` (git-ignored); under ``--results``
``learning_curve.tsv`` (per size and model: MAE with its interval, per-seed MAEs, R²),
``learning_curve_comparisons.tsv`` (differences with intervals), ``learning_curve.json`` (command, commit,
seeds, settings, minutes per step), ``learning_curve.md`` and ``learning_curve.png``.

    python benchmarks/sdmt_learning_curve.py                          # the whole curve (hours on 2 cores)
    python benchmarks/sdmt_learning_curve.py --subjects 44 --seeds 1  # one size, one seed
    python benchmarks/sdmt_learning_curve.py --report-only            # tables and plot from finished runs
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import replication as rep  # noqa: E402  (benchmarks/ is not a package)

REPO = rep.REPO
TRANSFERS = ("deep", "shallow")
MEAN = rep.MEAN
#: Models drawn and tabled, in this order: the trained arms, then the references (floors, then ceilings).
REFERENCE_ORDER = ("image features", "linear probe", "perfect brain age", "oracle")
COMPARISONS = [("deep", "shallow"), ("deep", MEAN), ("shallow", MEAN), ("linear probe", "shallow"),
               ("deep", "image features")]


def parse_counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def settings_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """The replication's CPU defaults (input size, width, split, device) for the runs of this study."""
    ns = argparse.Namespace(full=False, scale=None, ms_fraction=None, split=None, rounds=None, out=args.out,
                            channels_last=None, batch_size=None)
    return rep.apply_defaults(ns)


def site_counts(subjects: int) -> dict[str, int]:
    """Patients per MS site for ``neurofed synth --subjects`` (mean per site, study proportions)."""
    from neurofed.data.synth.command import site_sizes

    return site_sizes(rep.MS, subjects, "reference")


def nested_cohort(full_root: Path, target: Path, counts: dict[str, int]) -> list[str]:
    """BIDS folders holding the first ``counts[site]`` patients of each generated site (linked, not copied).

    ``participants.tsv`` and ``sourcedata/latents.tsv`` keep those patients' rows; the dataset files are
    copied, so each folder is a valid BIDS dataset with its own ``derivatives/`` for the runs' predictions.
    """
    roots = []
    for site, n in counts.items():
        source, dest = full_root / site, target / site
        lines = (source / "participants.tsv").read_text().splitlines()
        keep = sorted(line.split("\t")[0] for line in lines[1:])[:n]
        if len(keep) < n:
            raise ValueError(f"{source} holds {len(keep)} patients, fewer than the {n} asked; generate more")
        dest.mkdir(parents=True, exist_ok=True)
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, dest / item.name)
        wanted = set(keep)
        (dest / "participants.tsv").write_text(
            "\n".join([lines[0]] + [line for line in lines[1:] if line.split("\t")[0] in wanted]) + "\n")
        (dest / "sourcedata").mkdir(exist_ok=True)
        latents = (source / "sourcedata" / "latents.tsv").read_text().splitlines()
        (dest / "sourcedata" / "latents.tsv").write_text(
            "\n".join([latents[0]] + [line for line in latents[1:] if line.split("\t")[0] in wanted]) + "\n")
        for pid in keep:
            link = dest / pid
            if not link.exists():
                link.symlink_to((source / pid).resolve(), target_is_directory=True)
        roots.append(str(dest))
    return roots


def run_name(transfer: str, patients: int, seed: int) -> str:
    return f"sdmt_{transfer}_n{patients}_s{seed}"


def checkpoint_for(args: argparse.Namespace, seed: int) -> Path:
    if args.brain_age_checkpoint:
        return args.brain_age_checkpoint
    if args.brain_age_runs:  # the replication's FedAvg backbones: the same command on the same healthy sites
        return Path(args.brain_age_runs.format(seed=seed)) / "site-0" / "best.ckpt"
    return args.out / "runs" / f"brain_age_s{seed}" / "site-0" / "best.ckpt"


def train(args: argparse.Namespace, settings: argparse.Namespace, sizes: list[tuple[int, list[str], int]],
          timings: dict[str, float]) -> None:
    """Every brain-age and SDMT run not finished yet: seeds outermost, so an interrupted curve has every size."""
    logs = args.out / "logs"
    healthy = [str(args.out / "sites" / s) for s in rep.HEALTHY]
    for seed in range(args.seed, args.seed + max(n for _, _, n in sizes)):
        ckpt = checkpoint_for(args, seed)
        if not ckpt.is_file():
            if args.brain_age_runs:
                sys.exit(f"{ckpt}: no brain-age backbone for seed {seed}; run the replication first")
            if not args.brain_age_checkpoint and not (args.out / "sites").is_dir():
                timings["synth healthy"] = rep.synth(settings, "sites", rep.HEALTHY,
                                                     round(settings.scale * rep.HEALTHY_STUDY / 3), args.seed,
                                                     logs / "synth_healthy.log", site_effect=args.site_effect)
            timings[f"seed {seed}: brain age"] = rep.run(rep.neurofed(
                "simulate", "--roots", ",".join(healthy), "fit", "--config", str(REPO / "configs" / "brain_age_cpu.yaml"),
                *run_args(settings, seed), *rep.brain_age_model_args(settings),
                "--trainer.strategy.class_path", rep.STRATEGIES["fedavg"], "--trainer.run_name", f"brain_age_s{seed}"),
                logs / f"brain_age_s{seed}.log")
        for patients, roots, n_seeds in sizes:
            if seed >= args.seed + n_seeds or args.brain_age_only:
                continue
            for transfer in TRANSFERS:
                name = run_name(transfer, patients, seed)
                if finished(roots, name):
                    continue
                timings[f"{patients} patients, seed {seed}: {transfer}"] = rep.run(rep.neurofed(
                    "simulate", "--roots", ",".join(roots), "fit", "--config",
                    str(REPO / "configs" / f"sdmt_{transfer}_cpu.yaml"), *run_args(settings, seed),
                    "--model.init_args.brain_age_checkpoint", str(ckpt),
                    "--model.init_args.channels_last", str(settings.channels_last).lower(),
                    "--trainer.run_name", name), logs / f"{name}.log")
            timings_file = "timings_brain_age.json" if args.brain_age_only else "timings.json"
            (args.out / timings_file).write_text(json.dumps(timings, indent=1))


def run_args(settings: argparse.Namespace, seed: int) -> list[str]:
    """The replication's per-run overrides, allowed to reuse a run folder an interrupted run left behind."""
    extra = rep.size_args(settings, seed)
    return extra if "--trainer.overwrite" in extra else [*extra, "--trainer.overwrite", "true"]


def git_commit() -> str:
    """The checked-out commit, with ``+changes`` when tracked files under src/, benchmarks/ or configs/ differ."""
    import subprocess

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks", "configs")
        return git("rev-parse", "--short=10", "HEAD") + ("+changes" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line() -> str:
    """The command as typed, the script relative to the repository."""
    import shlex

    script = Path(sys.argv[0]).resolve()
    shown = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else sys.argv[0]
    return "python " + " ".join(shlex.quote(a) for a in [shown, *sys.argv[1:]])


def finished(roots: list[str], name: str) -> bool:
    from neurofed.predictions import DERIVATIVE_DIR, RUNS_DIR, run_folder

    return all((Path(r) / DERIVATIVE_DIR / RUNS_DIR / run_folder(name) / "desc-sdmt_predictions.tsv").is_file()
               for r in roots)


# ---------------------------------------------------------------------------------------------------- report


def reference_rows(args: argparse.Namespace, settings: argparse.Namespace, roots: list[str], patients: int,
                   seed: int) -> dict[str, list[dict]]:
    """The references' test predictions of one size and seed, computed once and kept under ``--out``."""
    import sdmt_references as refs

    path = args.out / "references" / f"n{patients}_s{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    split = refs.SplitSettings(split=tuple(settings.split), split_seed=42 + seed, spacing=settings.spacing,
                               shape=tuple(settings.shape), cache_dir=str(args.out / "cache"))
    ckpt = checkpoint_for(args, seed)
    rows = refs.reference_predictions(roots, split, ckpt if ckpt.is_file() else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return rows


def collect_size(args, settings, patients: int, roots: list[str], seeds: list[int]) -> dict:
    """Aligned test predictions of every model at one size, over the seeds whose deep and shallow runs finished."""
    extra = {}
    for seed in seeds:
        for model, rows in reference_rows(args, settings, roots, patients, seed).items():
            extra.setdefault(model, {})[seed] = rows
    runs = {t: {s: run_name(t, patients, s) for s in seeds} for t in TRANSFERS}
    return collect(runs, roots, extra)


def collect(runs: dict[str, dict[int, str]], roots: list[str], extra: dict[str, dict[int, list[dict]]]) -> dict:
    """Per test scan of every seed: target, each model's prediction (the runs', the references', the mean)."""
    keys, target, preds = [], [], {m: [] for m in [*runs, *extra, MEAN]}
    for seed in sorted(next(iter(runs.values()))):
        tables, train_mean = {}, None
        for model, by_seed in runs.items():
            rows, train_mean = rep.read_test_predictions(roots, by_seed[seed], "sdmt")
            tables[model] = {(r["site"], r["subject"], r["session"]): r for r in rows}
        for model, by_seed in extra.items():
            tables[model] = {(r["site"], r["subject"], r["session"]): r for r in by_seed[seed]}
        first = tables[TRANSFERS[0]]
        for model, table in tables.items():
            if set(table) != set(first):
                raise ValueError(f"seed {seed}: {model!r} was tested on other scans than {TRANSFERS[0]!r} "
                                 f"({len(table)} vs {len(first)})")
        for key in sorted(first):
            keys.append((seed, *key))
            target.append(first[key]["target"])
            for model, table in tables.items():
                preds[model].append(table[key]["prediction"])
            preds[MEAN].append(train_mean)
    return {"keys": keys, "target": np.asarray(target), "preds": {m: np.asarray(p) for m, p in preds.items()}}


def summarize(data: dict, n_boot: int) -> dict:
    """MAE per model with intervals over seeds and subjects, per-seed MAEs, R², and the differences."""
    from neurofed.stats import BootstrapWeights

    seeds = np.asarray([k[0] for k in data["keys"]])
    strata = [f"{k[0]}/{k[1]}" for k in data["keys"]]
    clusters = [f"{k[0]}/{k[1]}/{k[2]}" for k in data["keys"]]
    weights = BootstrapWeights(clusters, strata, n_boot=n_boot, seed=0, groups=seeds.tolist())
    target = data["target"]
    abs_err = {m: np.abs(p - target) for m, p in data["preds"].items()}
    models = {}
    for model, pred in data["preds"].items():
        per_seed = [float(abs_err[model][seeds == s].mean()) for s in sorted(set(seeds.tolist()))]
        models[model] = {"mae": weights.mae(abs_err[model]), "mae_seeds": per_seed,
                         "r2": 1 - float(np.sum((pred - target) ** 2) / np.sum((target - target.mean()) ** 2)),
                         "r": float(np.corrcoef(pred, target)[0, 1]) if np.std(pred) > 0 else math.nan}
    diffs = [(a, b, weights.mae_difference(abs_err[a], abs_err[b])) for a, b in COMPARISONS
             if a in abs_err and b in abs_err]
    return {"models": models, "diffs": diffs, "n_scans": int(target.size),
            "n_subjects": len({(k[1], k[2]) for k in data["keys"]}), "seeds": sorted(set(seeds.tolist()))}


def write_results(results: Path, summaries: dict[int, dict], meta: dict) -> None:
    results.mkdir(parents=True, exist_ok=True)
    lines = ["patients\tmodel\tseeds\ttest_scans\tmae\tlow\thigh\tmae_per_seed\tr2\tr"]
    for patients, s in summaries.items():
        for model, m in s["models"].items():
            ci = m["mae"]
            lines.append(f"{patients}\t{model}\t{len(s['seeds'])}\t{s['n_scans']}\t{ci.estimate:.3f}\t{ci.low:.3f}\t"
                         f"{ci.high:.3f}\t{','.join(f'{v:.3f}' for v in m['mae_seeds'])}\t{m['r2']:.3f}\t{m['r']:.3f}")
    (results / "learning_curve.tsv").write_text("\n".join(lines) + "\n")
    lines = ["patients\tmodel_a\tmodel_b\tdelta_mae\tlow\thigh\texcludes_zero"]
    for patients, s in summaries.items():
        for a, b, ci in s["diffs"]:
            lines.append(f"{patients}\t{a}\t{b}\t{ci.estimate:.3f}\t{ci.low:.3f}\t{ci.high:.3f}\t{ci.excludes_zero}")
    (results / "learning_curve_comparisons.tsv").write_text("\n".join(lines) + "\n")
    (results / "learning_curve.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    (results / "learning_curve.md").write_text("\n".join(markdown(summaries, meta)) + "\n")
    plot(summaries, results / "learning_curve.png")


def markdown(summaries: dict[int, dict], meta: dict) -> list[str]:
    models = list(next(iter(summaries.values()))["models"])
    md = ["## SDMT learning curve: deep vs shallow transfer over the number of MS patients", "",
          f"Command: `{meta['command']}` (commit {meta['commit']}; runs trained at commit {meta['train_commit']}).",
          "MAE (points) on the test subjects of every seed pooled, [95 % interval: seeds, then test subjects "
          "within seed and site, resampled]; per-seed MAEs in the TSV.", "",
          "| patients | seeds | test scans | " + " | ".join(models) + " |", "|---|---|---|" + "---|" * len(models)]
    for patients, s in summaries.items():
        md.append(f"| {patients} | {len(s['seeds'])} | {s['n_scans']} | "
                  + " | ".join(s["models"][m]["mae"].format() for m in models) + " |")
    md += ["", "| patients | comparison | ΔMAE (A − B) [95 % CI] | excludes zero |", "|---|---|---|---|"]
    for patients, s in summaries.items():
        for a, b, ci in s["diffs"]:
            verdict = ("yes: A lower" if ci.high < 0 else "yes: A higher") if ci.excludes_zero else "no"
            md.append(f"| {patients} | {a} − {b} | {ci.format()} | {verdict} |")
    return md


def plot(summaries: dict[int, dict], path: Path) -> None:
    from neurofed.plots import COLUMN_WIDTH, _pyplot, _save

    plt = _pyplot()
    patients = list(summaries)
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH * 2, COLUMN_WIDTH))
    models = list(next(iter(summaries.values()))["models"])
    for i, model in enumerate(models):
        est = [summaries[p]["models"][model]["mae"] for p in patients]
        x = np.asarray(patients, dtype=float) * (1 + 0.015 * (i - (len(models) - 1) / 2))  # side by side
        style = "--" if model in (MEAN, "oracle", "perfect brain age") else "-"
        ax.errorbar(x, [e.estimate for e in est], yerr=[[e.estimate - e.low for e in est], [e.high - e.estimate
                    for e in est]], label=model, linestyle=style, marker="o", markersize=3, capsize=2, linewidth=1)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(patients, [str(p) for p in patients])
    ax.set_xlim(min(patients) * 0.85, max(patients) * 1.15)
    ax.set_xlabel("MS patients, three sites (log scale)")
    ax.set_ylabel("SDMT test MAE (points)")
    ax.set_title("SDMT, federated transfer vs references\n95 % intervals resample seeds and test subjects")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


def report(args: argparse.Namespace, settings: argparse.Namespace, sizes, timings: dict[str, float]) -> None:
    summaries, missing = {}, []
    for patients, roots, n_seeds in sizes:
        seeds = [s for s in range(args.seed, args.seed + n_seeds)
                 if all(finished(roots, run_name(t, patients, s)) for t in TRANSFERS)]
        missing += [f"{patients} patients seed {s}" for s in range(args.seed, args.seed + n_seeds) if s not in seeds]
        if seeds:
            summaries[patients] = summarize(collect_size(args, settings, patients, roots, seeds), args.n_boot)
    if not summaries:
        sys.exit("no size has a finished seed yet")
    train_meta = args.out / "train_meta.json"
    meta = {"command": command_line(), "commit": git_commit(),
            "train_commit": json.loads(train_meta.read_text())["commit"] if train_meta.is_file() else "unknown",
            "seeds": {p: s["seeds"] for p, s in summaries.items()}, "not_finished": missing,
            "sites": {p: site_counts_by_patients(args, p) for p in summaries},
            "settings": {k: getattr(settings, k) for k in ("split", "spacing", "shape", "channels", "resolution")},
            "site_effect": args.site_effect, "n_boot": args.n_boot,
            "brain_age_checkpoint": str(args.brain_age_checkpoint or args.brain_age_runs
                                         or "trained per seed (federated FedAvg)"),
            "minutes": {k: round(v / 60, 1) for k, v in timings.items()}}
    write_results(args.results, summaries, meta)
    print("\n".join(markdown(summaries, meta)))
    if missing:
        print(f"\nnot finished: {', '.join(missing)}")


def site_counts_by_patients(args: argparse.Namespace, patients: int) -> dict[str, int]:
    for subjects in parse_counts(args.subjects):
        counts = site_counts(subjects)
        if sum(counts.values()) == patients:
            return counts
    return {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "sdmt_learning_curve")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results" / "sdmt")
    parser.add_argument("--subjects", default="44,100,200,333",
                        help="cohort sizes as mean patients per site (neurofed synth --subjects): 44 = the "
                             "replication's 134 patients; 333 = 999")
    parser.add_argument("--seeds", default="5,5,3,3",
                        help="seeds per size (one number: every size)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--cohort-seed", type=int, default=1, help="seed of the MS cohort (the replication's: 1)")
    parser.add_argument("--site-effect", type=float, default=1.0)
    parser.add_argument("--brain-age-checkpoint", type=Path, default=None,
                        help="one BrainAgeModule checkpoint for every seed instead of training one per seed")
    parser.add_argument("--brain-age-runs", default=None,
                        help="run folder of each seed's brain-age backbone, with {seed}; e.g. "
                             "results/replication/runs/federated_fedavg_s{seed} (trained by the replication with the "
                             "same command on the same healthy sites, so it is not trained twice)")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--brain-age-only", action="store_true",
                        help="only train the brain-age backbone of every seed (e.g. beside a running curve)")
    parser.add_argument("--report-only", action="store_true", help="rebuild table and plot from finished runs")
    parser.add_argument("--dry-run", action="store_true", help="print the steps' commands, run nothing")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    subjects = parse_counts(args.subjects)
    seeds = parse_counts(args.seeds)
    if len(seeds) == 1:
        seeds = seeds * len(subjects)
    if len(seeds) != len(subjects) or subjects != sorted(subjects) or min(seeds) < 1:
        parser.error(f"--seeds ({args.seeds}) needs one count >= 1 per size of --subjects ({args.subjects}), "
                     "sizes ascending")
    if args.brain_age_checkpoint and not args.brain_age_checkpoint.is_file():
        parser.error(f"--brain-age-checkpoint {args.brain_age_checkpoint} does not exist")
    rep.DRY_RUN = args.dry_run
    settings = settings_namespace(args)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    timings_path = args.out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    full = args.out / "sites_ms" / "all"
    if not args.report_only and not (full / rep.MS[-1] / "participants.tsv").is_file():
        timings["synth ms"] = rep.run(rep.neurofed(
            "synth", "--out", str(full), "--sites", ",".join(rep.MS), "--cohort", "ms", "--subjects", str(subjects[-1]),
            "--resolution", str(settings.resolution), "--seed", str(args.cohort_seed),
            "--site-effect", str(args.site_effect), "--no-progress"), args.out / "logs" / "synth_ms.log")
    sizes = []
    for n, k in zip(subjects, seeds):
        counts = site_counts(n)
        patients = sum(counts.values())
        target = args.out / "sites_ms" / f"n{patients}"
        roots = ([str(target / s) for s in rep.MS] if args.dry_run or args.report_only or args.brain_age_only
                 else nested_cohort(full, target, counts))
        sizes.append((patients, roots, k))
    if not args.report_only:
        if not args.brain_age_only:  # a side process training backbones leaves the curve's records alone
            (args.out / "train_meta.json").write_text(json.dumps({"commit": git_commit()}))
        else:
            timings = {}
        start = time.perf_counter()
        train(args, settings, sizes, timings)
        timings["total (this invocation)"] = time.perf_counter() - start
        if args.dry_run or args.brain_age_only:
            return
        timings_path.write_text(json.dumps(timings, indent=1))
    report(args, settings, sizes, timings)


if __name__ == "__main__":
    main()
