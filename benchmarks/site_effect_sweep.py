"""Where FedAvg breaks: brain-age test MAE against the scale of the scanner differences, and under label shift.

For each ``--site-effect`` scale (default 0, 1, 2: 0 = every site the same scanner, 1 = the published
between-scanner differences of ``docs/synthetic_data.md``, 2 = twice them) the three healthy sites are generated
again (same subjects, same seed; only the scanners change), plus one setting where the sites share one scanner
but differ in the ages they scanned (label shift: ``--age-shift``, default IXI 18–45, SALD 40–65, Cam-CAN
60–88 years). On cohorts of the demo's size (``--subjects 40`` per site on average) the replication's CPU
settings and the shipped recipe (``configs/brain_age_cpu.yaml``) train:

- centralized (one site holding the three roots);
- the control "centralized + per-site BN": the centralized model, BatchNorm statistics re-estimated at each
  site, no training (what per-site normalisation alone is worth);
- FedAvg with the BatchNorm SFCN (its statistics stay local and are re-estimated each round: ``precise_bn``);
- FedBN (BatchNorm layers stay local: statistics and affine parameters);
- with ``--methods`` including it, FedAvg with a GroupNorm SFCN (``--model.init_args.norm group``: no batch
  statistics at all; ``docs/results/recipe.md`` compares it on the demo's data).

Each point is the pooled test MAE (all sites, all seeds); error bars and the differences to centralized are
95 % paired hierarchical bootstrap intervals that resample seeds and test subjects (``neurofed.stats``). Outputs:
the runs under ``--out``; ``sweep.tsv``, ``meta.json`` and the plot under ``--results`` (default
``docs/results/site_effect_sweep/``).

    python benchmarks/site_effect_sweep.py --out results/site_effect_sweep
    python benchmarks/site_effect_sweep.py --out results/site_effect_sweep --report-only
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import replication as rep
from provenance import write_meta

METHODS = {  # name -> (strategy or None for centralized, norm)
    "centralized": (None, "batch"),
    "FedAvg": ("fedavg", "batch"),
    "FedBN": ("fedbn", "batch"),
    "FedAvg + GroupNorm": ("fedavg", "group"),
}
AGE_SHIFT = "18-45,40-65,60-88"


def run_name(method: str, seed: int) -> str:
    names = {"centralized": "central", "FedAvg": "fedavg", "FedBN": "fedbn", "FedAvg + GroupNorm": "fedavg_gn"}
    return f"{names[method]}_s{seed}"


def finished(roots: list[str], name: str) -> bool:
    """Whether run ``name`` wrote its predictions at every site."""
    return rep.finished(roots, name, "age")


def conditions(args: argparse.Namespace) -> list[dict]:
    """The settings to sweep: one per scanner-difference scale, and the label-shift setting."""
    out = [{"name": f"scanner {e:g}", "folder": f"effect-{e:g}", "site_effect": e, "age_ranges": None}
           for e in (float(x) for x in args.effects.split(",") if x.strip())]
    if args.age_shift:
        out.append({"name": "age shift", "folder": "age-shift", "site_effect": 0.0, "age_ranges": args.age_shift})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=rep.REPO / "results" / "site_effect_sweep")
    parser.add_argument("--results", type=Path, default=rep.REPO / "docs" / "results" / "site_effect_sweep")
    parser.add_argument("--effects", default="0,1,2", help="comma-separated --site-effect scales")
    parser.add_argument("--age-shift", default=AGE_SHIFT,
                        help="age ranges of the label-shift setting (one scanner), one per site; '' to skip it")
    parser.add_argument("--methods", default="centralized,FedAvg,FedBN", help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--subjects", type=int, default=40,
                        help="mean subjects per site (reference proportions); default 40, the demo's size")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--resume", action="store_true",
                        help="keep sites already generated for a setting and skip runs that already finished")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table and plot")
    args = parser.parse_args()
    args.scale, args.split = None, None
    args.full, args.ms_fraction = False, None
    args = rep.apply_defaults(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            sys.exit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    seeds = list(range(args.seed, args.seed + args.seeds))
    timings_path = args.out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    rows = []
    for cond in conditions(args):
        sub = copy.copy(args)
        sub.out = args.out / cond["folder"]
        roots = [str(sub.out / "sites" / s) for s in rep.HEALTHY]
        logs = sub.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        names = {m: {s: run_name(m, s) for s in seeds} for m in methods}
        if not args.report_only:
            have_sites = all((Path(r) / "participants.tsv").is_file() for r in roots)
            if not (args.resume and have_sites):
                for folder in ("sites", "runs", "cache"):
                    shutil.rmtree(sub.out / folder, ignore_errors=True)
                timings[f"{cond['name']}: synth"] = rep.synth(sub, "sites", rep.HEALTHY, args.subjects, args.seed,
                                                              logs / "synth.log", site_effect=cond["site_effect"],
                                                              age_ranges=cond["age_ranges"])
            for seed in seeds:
                for method in methods:
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
                    timings[f"{cond['name']}: {method} seed {seed}"] = rep.run(cmd, logs / f"{names[method][seed]}.log")
                    timings_path.parent.mkdir(parents=True, exist_ok=True)
                    timings_path.write_text(json.dumps(timings, indent=1))
        # Report the methods that finished on every seed (an interrupted sweep still plots what it has).
        ready = {m: runs for m, runs in names.items() if all(finished(roots, n) for n in runs.values())}
        if not ready:
            print(f"{cond['name']}: no finished run yet")
            continue
        if len(ready) < len(names):
            print(f"{cond['name']}: not finished: {', '.join(m for m in names if m not in ready)}")
        extra = {}
        if "centralized" in ready:
            t0 = time.perf_counter()
            extra[rep.CENTRAL_SITE_BN] = {
                s: rep.site_bn_predictions(sub.out / "runs" / names["centralized"][s] / "site-0" / "best.ckpt",
                                           roots, sub, s) for s in seeds}
            timings[f"{cond['name']}: control, all seeds"] = time.perf_counter() - t0
        data = rep.collect("brain age", ready, roots, "age", extra=extra)
        others = [m for m in [*ready, *extra] if m != "centralized"]
        summary = rep.summarize(data, [(m, "centralized") for m in others if "centralized" in ready], args.n_boot)
        for model, m in summary["models"].items():
            diff = next((ci for a, _, ci in summary["diffs"] if a == model), None)
            ratio = next((ci for a, _, ci in summary["ratios"] if a == model), None)
            stab = [rep.stability(sub.out / "runs" / n / "history.json", 0)["max_rise"]
                    for n in ready.get(model, {}).values()]
            rows.append({"setting": cond["name"], "site_effect": cond["site_effect"],
                         "age_ranges": cond["age_ranges"] or "", "model": model, "n": summary["n_scans"],
                         "mae": m["pooled"].estimate, "low": m["pooled"].low, "high": m["pooled"].high,
                         "mae_seeds": ",".join(f"{v:.3f}" for v in m["mae_seeds"]), "mae_seed_sd": m["mae_sd"],
                         "r": m["r"],
                         "delta": diff.estimate if diff else "", "delta_low": diff.low if diff else "",
                         "delta_high": diff.high if diff else "", "ratio": ratio.estimate if ratio else "",
                         "ratio_low": ratio.low if ratio else "", "ratio_high": ratio.high if ratio else "",
                         "max_val_rise": max(stab) if stab else ""})
    if not rows:
        sys.exit("no finished setting to report")
    fields = list(rows[0])
    lines = ["\t".join(fields)] + ["\t".join(f"{r[f]:.3f}" if isinstance(r[f], float) else str(r[f])
                                             for f in fields) for r in rows]
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    (results / "sweep.tsv").write_text("\n".join(lines) + "\n")
    plot(rows, results / "site_effect_sweep.png", len(seeds))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "results", "report_only")}
    write_meta(results, seeds, settings=settings, minutes={k: round(v / 60, 2) for k, v in timings.items()})
    for line in lines:
        print(line)
    print(f"\nwrote {results}/sweep.tsv, meta.json and site_effect_sweep.png")
    subprocess.run([sys.executable, str(rep.REPO / "benchmarks" / "report.py")], cwd=rep.REPO, check=False)


def plot(rows: list[dict], path: Path, n_seeds: int) -> Path:
    """Pooled test MAE per setting, one marker per model, with its interval."""
    from neurofed.plots import _STYLE, COLUMN_WIDTH, _pyplot, _save

    plt = _pyplot()
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH * 1.6, 0.7 * COLUMN_WIDTH * 1.6))
        for k, model in enumerate(models):
            pts = [next((r for r in rows if r["setting"] == s and r["model"] == model), None) for s in settings]
            x = np.asarray([i for i, p in enumerate(pts) if p]) + (k - (len(models) - 1) / 2) * 0.1
            pts = [p for p in pts if p]
            y = np.asarray([p["mae"] for p in pts])
            err = np.asarray([[p["mae"] - p["low"] for p in pts], [p["high"] - p["mae"] for p in pts]])
            style = {"ls": ":", "color": "0.5"} if model == rep.MEAN else {"marker": "o", "ms": 3, "ls": "none"}
            ax.errorbar(x, y, yerr=err, lw=1, capsize=2, label=model, **style)
        ax.set_xticks(range(len(settings)), settings)
        ax.set_ylabel("pooled test MAE (years)")
        ax.set_title(f"Brain age under scanner and label shift ({n_seeds} seeds; 95 % CI over seeds and subjects)")
        ax.legend(frameon=False, fontsize="small")
    return _save(fig, path)


if __name__ == "__main__":
    main()
