"""Which training changes make federated brain age converge: each change alone, judged on validation only.

On the demo's data (three synthetic sites, 40 subjects per site on average, 4 mm input, quarter-width SFCN),
every variant is trained centralized (one site holding the three roots), with FedAvg and with FedBN (seed 0;
"before" and "recipe" also seeds 1 and 2 for their spread: ``--spread``, ``--seeds``), and judged on the pooled **validation** loss per round only (the test split is never looked at here):

- ``best``: the lowest pooled validation loss (years; L1);
- ``last``: the last round's;
- ``max rise``: the largest rise of a round over the best of the rounds before it, after the warm-up (0.15 =
  15 % above the best so far): a recipe that converges keeps it small, so the best round is not a lucky one;
- per-seed spread of ``best``.

The variants start from the recipe before this study (constant learning rate, BatchNorm statistics averaged
like any weight, one local epoch per round, the round's own model evaluated, early stopping after 6 rounds
without improvement) and add one change at a time; ``recipe`` is all of them together (the demo config), and
``recipe + GroupNorm`` swaps BatchNorm for GroupNorm (under FedAvg only: GroupNorm keeps no batch statistics for FedBN to keep local). Writes ``docs/results/recipe/ablation.tsv`` (one row per variant, method and seed), ``curves.json``
(every run's pooled validation loss per round), ``meta.json`` and ``val_loss_<method>.png`` (seed 0, before vs
after); ``docs/results/recipe.md`` is rendered from them.

    python benchmarks/recipe_ablation.py --out results/recipe
    python benchmarks/recipe_ablation.py --out results/recipe --report-only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import replication as rep
from provenance import write_meta

CONFIG = rep.REPO / "configs" / "federated_demo.yaml"
#: The recipe before this study, spelled as overrides of the demo config.
BEFORE = ["--trainer.precise_bn", "false", "--trainer.lr_schedule", "null", "--trainer.ema_decay", "null",
          "--trainer.local_epochs", "1", "--trainer.min_rounds", "0", "--trainer.patience", "6"]
VARIANTS: dict[str, list[str]] = {
    "before": BEFORE,
    "+ precise BN": [*BEFORE, "--trainer.precise_bn", "true"],
    "+ cosine schedule": [*BEFORE, "--trainer.lr_schedule", '{"kind": "cosine", "warmup_rounds": 1}',
                          "--trainer.patience", "null", "--trainer.min_rounds", "1"],
    "+ two local epochs": [*BEFORE, "--trainer.local_epochs", "2"],
    "+ weight average": [*BEFORE, "--trainer.ema_decay", "0.5"],
    "recipe": [],
    "recipe + GroupNorm": ["--model.init_args.norm", "group"],
}
METHODS = {"centralized": None, "FedAvg": "fedavg", "FedBN": "fedbn"}
#: GroupNorm has no batch statistics, so FedBN has nothing to keep local: compared under FedAvg only.
ONLY = {"recipe + GroupNorm": ["FedAvg"]}


def run_name(variant: str, method: str, seed: int) -> str:
    slug = variant.replace("+ ", "").replace(" ", "_")
    return f"{slug}_{method.lower()}_s{seed}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=rep.REPO / "results" / "recipe")
    parser.add_argument("--results", type=Path, default=rep.REPO / "docs" / "results" / "recipe")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder with the three demo sites (default: generate them under --out)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"from: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the --spread variants")
    parser.add_argument("--spread", default="before,recipe",
                        help="variants trained with --seeds seeds, for their spread; every other variant: seed 0")
    parser.add_argument("--resume", action="store_true", help="skip runs that already finished")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    out = args.out.resolve()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    seeds = list(range(args.seeds))
    spread = {v.strip() for v in args.spread.split(",")}
    seeds_of = {v: seeds if v in spread else seeds[:1] for v in VARIANTS}
    data = (args.data or out / "sites").resolve()
    roots = [str(data / s) for s in rep.HEALTHY]
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    minutes: dict[str, float] = {}
    if not args.report_only:
        if args.data is None and not (args.resume and all(Path(r, "participants.tsv").is_file() for r in roots)):
            rep.run(rep.neurofed("synth", "--out", str(data), "--sites", ",".join(rep.HEALTHY), "--subjects", "40",
                                 "--resolution", "2", "--seed", "0", "--no-progress"), logs / "synth.log")
        for variant in variants:
            for method, strategy in METHODS.items():
                if method not in ONLY.get(variant, METHODS):
                    continue
                for seed in seeds_of[variant]:
                    name = run_name(variant, method, seed)
                    if args.resume and (out / "runs" / name / "test_metrics.json").is_file():  # fit and test done
                        continue
                    base = ["--config", str(CONFIG), "--seed_everything", str(seed), "--data.split_seed",
                            str(42 + seed), "--data.cache_dir", str(out / "cache"), "--trainer.default_root_dir",
                            str(out / "runs"), "--trainer.run_name", name, "--trainer.overwrite", "true",
                            *VARIANTS[variant]]
                    if strategy is None:
                        cmd = rep.neurofed("fit", *base, "--data.root", json.dumps(roots),
                                           "--trainer.federation.num_sites", "1",
                                           "--trainer.strategy.class_path", rep.STRATEGIES["fedavg"])
                    else:
                        cmd = rep.neurofed("simulate", "--roots", ",".join(roots), "fit", *base,
                                           "--trainer.strategy.class_path", rep.STRATEGIES[strategy])
                    minutes[name] = rep.run(cmd, logs / f"{name}.log") / 60
    report(args, out, variants, seeds_of, minutes)
    return 0


def report(args: argparse.Namespace, out: Path, variants: list[str], seeds_of: dict[str, list[int]],
           minutes: dict[str, float]) -> None:
    warmup = rep.warmup_rounds(CONFIG)
    rows, curves = ["variant\tmethod\tseed\trounds\tbest_round\tbest\tlast\tmax_rise"], {}
    for variant in variants:
        for method in METHODS:
            for seed in seeds_of[variant]:
                name = run_name(variant, method, seed)
                history = out / "runs" / name / "history.json"
                if not history.is_file():
                    continue
                st = rep.stability(history, warmup if variant in ("+ cosine schedule", "recipe", "recipe + GroupNorm")
                                   else 0)
                rows.append(f"{variant}\t{method}\t{seed}\t{st['rounds']}\t{st['best_round']}\t{st['best']:.3f}\t"
                            f"{st['last']:.3f}\t{st['max_rise']:.4f}")
                curves[name] = [h["val/pooled/loss"] for h in json.loads(history.read_text())]
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    (results / "ablation.tsv").write_text("\n".join(rows) + "\n")
    (results / "curves.json").write_text(json.dumps(curves, indent=0) + "\n")
    from neurofed.plots import loss_per_round

    for method in METHODS:
        pair = {v: curves.get(run_name(v, method, 0)) for v in ("before", "recipe")}
        if all(pair.values()):
            loss_per_round(pair, results / f"val_loss_{method.lower()}.png",
                           ylabel="pooled validation loss (L1, years)", run=f"{method}, seed 0")
    write_meta(results, sorted({s for v in variants for s in seeds_of[v]}),
               seeds_per_variant={v: seeds_of[v] for v in variants}, variants={v: VARIANTS[v] for v in variants}, warmup_rounds=warmup,
               minutes={k: round(v, 2) for k, v in minutes.items()}, config=str(CONFIG.relative_to(rep.REPO)))
    print("\n".join(rows))
    subprocess.run([sys.executable, str(rep.REPO / "benchmarks" / "report.py")], cwd=rep.REPO, check=False)


if __name__ == "__main__":
    sys.exit(main())
