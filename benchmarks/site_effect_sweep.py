"""Where FedAvg breaks: brain-age test MAE against the scale of the scanner differences between sites.

For each ``--site-effect`` scale (default 0, 0.5, 1, 2: 0 = every site the same scanner, 1 = the published
between-scanner differences of ``docs/synthetic_data.md``, 2 = twice them) the three healthy sites are generated
again (same subjects, same seed; only the scanners change) and four models are trained with the replication's
CPU settings (``benchmarks/replication.py``: 4 mm input, quarter-width SFCN, L1, up to 25 rounds, patience 8)
on cohorts of the demo's size (``--subjects 40`` per site on average: IXI 41, SALD 34, Cam-CAN 45), so that a
user can rerun it for their own question in about 20 minutes on an idle 2-core machine:

- centralized (one site holding the three roots);
- FedAvg with the BatchNorm SFCN;
- FedBN (BatchNorm layers stay local: each site keeps its own normalisation statistics and affine parameters);
- FedAvg with a GroupNorm SFCN (``--model.init_args.norm group``: no batch statistics to disagree about).

Each point is the pooled test MAE (all sites, all seeds); error bars are the 95 % paired cluster bootstrap
interval over test subjects (``neurofed.stats``). Outputs: ``sweep.tsv`` under ``--out`` and the plot (and a copy
of the table) under ``--plot-dir`` (default ``docs/results/``).

    python benchmarks/site_effect_sweep.py --out results/site_effect_sweep
    python benchmarks/site_effect_sweep.py --out results/site_effect_sweep --report-only
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import replication as rep

METHODS = {  # name -> (strategy or None for centralized, norm)
    "centralized": (None, "batch"),
    "FedAvg": ("fedavg", "batch"),
    "FedBN": ("fedbn", "batch"),
    "FedAvg + GroupNorm": ("fedavg", "group"),
}


def run_name(method: str, seed: int, replication: bool = False) -> str:
    """The run's name; ``replication``: the name ``benchmarks/replication.py`` gives the same run."""
    names = {"centralized": "central", "FedAvg": "fedavg", "FedBN": "fedbn", "FedAvg + GroupNorm": "fedavg_gn"}
    if replication and method in ("FedAvg", "FedBN"):
        return f"federated_{names[method]}_s{seed}"
    return f"{names[method]}_s{seed}"


def rounds_run(runs_dir: Path, runs: dict[int, str]) -> str:
    """``rounds/best round`` of each seed's run (early stopping shows as rounds below the maximum)."""
    out = []
    for name in runs.values():
        path = runs_dir / name / "history.json"
        if path.is_file():
            losses = [row["val/pooled/loss"] for row in json.loads(path.read_text())]
            out.append(f"{len(losses)}/{int(np.argmin(losses)) + 1}")
    return ",".join(out)


def finished(roots: list[str], name: str) -> bool:
    """Whether run ``name`` wrote its predictions at every site."""
    return all((Path(r) / rep.DERIVATIVE_DIR / rep.RUNS_DIR / rep.run_folder(name) / "desc-age_predictions.tsv")
               .is_file() for r in roots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=rep.REPO / "results" / "site_effect_sweep")
    parser.add_argument("--plot-dir", type=Path, default=rep.REPO / "docs" / "results")
    parser.add_argument("--effects", default="0,0.5,1,2", help="comma-separated --site-effect scales")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--subjects", type=int, default=40,
                        help="mean subjects per site (reference proportions); default 40, the demo's size")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--replication", type=Path, default=None,
                        help="a replication.py --out folder whose healthy sites have this --subjects and --seed (site effect 1): "
                             "at scale 1 its sites and its centralized, FedAvg and FedBN runs are used instead of "
                             "new ones, and only the missing methods are trained there")
    parser.add_argument("--resume", action="store_true",
                        help="keep sites already generated for a scale and skip runs that already finished")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table and plot")
    args = parser.parse_args()
    args.scale, args.split = None, None
    args.full, args.ms_fraction = False, None
    args = rep.apply_defaults(args)
    effects = [float(e) for e in args.effects.split(",") if e.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            sys.exit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    seeds = list(range(args.seed, args.seed + args.seeds))
    subjects = args.subjects
    timings: dict[str, float] = {}
    rows = []
    for effect in effects:
        sub = copy.copy(args)
        reuse = args.replication is not None and effect == 1.0
        sub.out = args.replication.resolve() if reuse else args.out / f"effect-{effect:g}"
        roots = [str(sub.out / "sites" / s) for s in rep.HEALTHY]
        logs = sub.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        names = {m: {s: run_name(m, s, replication=reuse) for s in seeds} for m in methods}
        if not args.report_only:
            have_sites = all((Path(r) / "participants.tsv").is_file() for r in roots)
            if not reuse and not (args.resume and have_sites):
                for folder in ("sites", "runs", "cache"):
                    shutil.rmtree(sub.out / folder, ignore_errors=True)
                timings[f"{effect:g}: synth"] = rep.synth(sub, "sites", rep.HEALTHY, subjects, args.seed,
                                                          logs / "synth.log", site_effect=effect)
            for seed in seeds:
                for method in methods:
                    if reuse and method != "FedAvg + GroupNorm":
                        continue  # the replication's own run (it may still be running)
                    if args.resume and finished(roots, names[method][seed]):
                        continue
                    strategy, norm = METHODS[method]
                    base = ["--config", str(rep.REPO / "configs" / "brain_age_cpu.yaml"), *rep.size_args(sub, seed),
                            *rep.brain_age_model_args(sub, norm), "--trainer.run_name", names[method][seed]]
                    if strategy is None:
                        cmd = rep.neurofed("fit", *base, "--data.root", json.dumps(roots))
                    else:
                        cmd = rep.neurofed("simulate", "--roots", ",".join(roots), "fit", *base,
                                           "--trainer.strategy.class_path", rep.STRATEGIES[strategy])
                    timings[f"{effect:g}: {method} seed {seed}"] = rep.run(cmd, logs / f"{names[method][seed]}.log")
            (sub.out / "sweep_timings.json").write_text(json.dumps(timings, indent=1))
        # Report the methods that finished on every seed (an interrupted sweep still plots what it has).
        ready = {m: runs for m, runs in names.items() if all(finished(roots, n) for n in runs.values())}
        if not ready:
            print(f"site effect {effect:g}: no finished run yet")
            continue
        if len(ready) < len(names):
            print(f"site effect {effect:g}: not finished: {', '.join(m for m in names if m not in ready)}")
        data = rep.collect("brain age", ready, roots, "age")
        summary = rep.summarize(data, [(m, "centralized") for m in ready if m != "centralized"
                                       and "centralized" in ready], args.n_boot)
        for model, m in summary["models"].items():
            diff = next((ci for a, _, ci in summary["diffs"] if a == model), None)
            rows.append({"site_effect": effect, "model": model, "n": summary["n_scans"],
                         "rounds_best": rounds_run(sub.out / "runs", ready.get(model, {})),
                         "mae": m["pooled"].estimate, "low": m["pooled"].low, "high": m["pooled"].high,
                         "mae_seed_sd": m["mae_sd"], "r": m["r"],
                         "delta_vs_centralized": diff.format() if diff else "",
                         "delta_excludes_zero": diff.excludes_zero if diff else ""})
    if not rows:
        sys.exit("no finished site-effect scale to report")
    fields = list(rows[0])
    lines = ["\t".join(fields)] + ["\t".join(f"{r[f]:.3f}" if isinstance(r[f], float) else str(r[f])
                                             for f in fields) for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.tsv").write_text("\n".join(lines) + "\n")
    args.plot_dir.mkdir(parents=True, exist_ok=True)
    (args.plot_dir / "site_effect_sweep.tsv").write_text("\n".join(lines) + "\n")
    plot(rows, args.plot_dir / "site_effect_sweep.png", len(seeds), args.rounds)
    for line in lines:
        print(line)
    print(f"\nwrote {args.out / 'sweep.tsv'} and {args.plot_dir / 'site_effect_sweep.png'}")
    if timings:
        print(json.dumps({k: round(v / 60, 1) for k, v in timings.items()}, indent=1))


def stopped_early(row: dict, max_rounds: int) -> bool:
    return any(int(part.split("/")[0]) < max_rounds for part in str(row.get("rounds_best", "")).split(",") if part)


def plot(rows: list[dict], path: Path, n_seeds: int, max_rounds: int) -> Path:
    """Pooled test MAE vs site-effect scale, one line per model; hollow markers: a run stopped early."""
    from neurofed.plots import _STYLE, COLUMN_WIDTH, _pyplot, _save

    plt = _pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH * 1.2, 0.75 * COLUMN_WIDTH * 1.2))
        for k, model in enumerate(models):
            pts = sorted((r for r in rows if r["model"] == model), key=lambda r: r["site_effect"])
            x = np.asarray([r["site_effect"] for r in pts]) + (k - (len(models) - 1) / 2) * 0.03
            y = np.asarray([r["mae"] for r in pts])
            err = np.asarray([[r["mae"] - r["low"] for r in pts], [r["high"] - r["mae"] for r in pts]])
            style = {"ls": ":", "color": "0.5"} if model == rep.MEAN else {"marker": "o", "ms": 3}
            line = ax.errorbar(x, y, yerr=err, lw=1, capsize=2, label=model, **style)
            early = [stopped_early(r, max_rounds) for r in pts]
            if model != rep.MEAN and any(early):
                ax.plot(x[early], y[early], "o", ms=5, mfc="white", mec=line[0].get_color(), zorder=3)
        ax.set_xlabel("site-effect scale (0: one scanner, 1: published differences)")
        ax.set_ylabel("pooled test MAE (years)")
        ax.set_title(f"Brain age under scanner shift ({n_seeds} seed{'s' if n_seeds > 1 else ''}; 95 % bootstrap CI;\n"
                     f"hollow: early-stopped before round {max_rounds})")
        ax.legend(frameon=False)
    return _save(fig, path)


if __name__ == "__main__":
    main()
