"""One faulty or hostile site in a federation of four: what it does to each rule, and what the trust layer stops.

Four synthetic sites (the IXI, SALD, Cam-CAN and Greifswald scanners, healthy cohort, ``--subjects`` each, 2 mm),
the demo's quarter-width SFCN on 4 mm input, 10 rounds of 2 local epochs, no early stopping, for each seed.
Every run is ``neurofed simulate ... fit --config configs/federated_demo.yaml`` with the overrides below: four
real site processes on loopback. Site 3 attacks by altering its own update through the public round hook
``on_local_train_end`` before anything leaves it: its model becomes ``global + factor × (local − global)``,

- ``honest``: no change;
- ``flip5``: factor −5 on every aggregated entry (weights and BatchNorm statistics);
- ``scale8``: factor 8 on every aggregated entry;
- ``flip5w``: factor −5 on the trained weights only (BatchNorm statistics left honest).

The attack and a recorder are given to the sites as ``--trainer.callbacks``; the recorder (site 0) writes every
round's screening statistics (each site's update norm, cosine to the other sites' updates, BatchNorm variance
ratios, who was left out and why) and whether the aggregate was rejected.

Honest references run with the recorder too, for false exclusions: the demo (``configs/federated_demo.yaml`` as
``scripts/demo.sh`` runs it) and every federated run of seed 0 of ``benchmarks/replication.py`` (its CPU
defaults: brain age with FedAvg, FedBN and FedProx over three healthy sites; SDMT, deep and shallow transfer,
over three MS sites of 6, 30 and 98 patients).

Outputs under ``--out``: ``runs.tsv`` (one row per run), ``screening.tsv`` (one row per run, round and site),
``table.md`` (the attack table with the honest run beside each, the distribution of the honest screening
statistics and the thresholds it gives), plus each run's folder and log; copies of the three go to
``--docs-dir`` (``docs/results/poisoned_site*``). The tables cover every finished run under ``--out``; finished
runs are skipped unless ``--rerun``, and ``--report-only`` only rebuilds the tables.

    python benchmarks/poisoned_site.py --out results/poisoned_site
    python benchmarks/poisoned_site.py --out results/poisoned_site --report-only
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

#: Site profiles of the four sites, in site order; the attacker is the last.
SITES = ["ixi", "sald", "camcan", "greifswald"]
ATTACKER = 3
STRATEGIES = {
    "FedAvg": "neurofed.federated.strategies.FedAvg",
    "FedMedian": "neurofed.federated.strategies.FedMedian",
    "FedTrimmedAvg": "neurofed.federated.strategies.FedTrimmedAvg",
}
#: condition -> (factor, entries) of site 3's alteration; ``None``: honest.
CONDITIONS: dict[str, tuple[float, str] | None] = {
    "honest": None, "flip5": (-5.0, "all"), "scale8": (8.0, "all"), "flip5w": (-5.0, "weights"),
}
#: strategy[/seeds]:conditions;... FedTrimmedAvg trims one site at each end of four, the mean of the middle two:
#: FedMedian's rule, so its runs repeat FedMedian's bit for bit; the first seed shows it.
DEFAULT_PLAN = "FedAvg:honest,flip5,scale8,flip5w;FedMedian:honest,flip5,scale8;FedTrimmedAvg/1:honest,flip5,scale8"


# ---------------------------------------------------------------------------------------------- round hooks
class AlterUpdate:
    """Round hook of the attacking site: its model becomes ``global + factor × (local − global)``.

    Args:
        factor: The multiple of the honest update that is sent (−5: a flipped, five times larger update).
        entries: ``"all"`` floating-point entries of the state dict, or ``"weights"`` (trainable parameters) only.
    """

    def __init__(self, factor: float, entries: str = "all") -> None:
        if entries not in ("all", "weights"):
            raise ValueError(f"AlterUpdate: entries must be 'all' or 'weights', got {entries!r}")
        self.factor, self.entries = float(factor), entries
        self._global: dict[str, Any] = {}

    def _altered(self, model: Any) -> dict[str, Any]:
        state = model.state_dict()
        names = {n for n, _ in model.named_parameters()} if self.entries == "weights" else set(state)
        return {k: v for k, v in state.items() if k in names and v.is_floating_point()}

    def on_round_start(self, trainer: Any, round: int) -> None:
        self._global = {k: v.detach().clone() for k, v in self._altered(trainer.site.model).items()}

    def on_local_train_end(self, trainer: Any, round: int, result: Any) -> None:
        import torch

        if not result.steps:
            return
        with torch.no_grad():
            for k, v in self._altered(trainer.site.model).items():
                v.copy_(self._global[k] + self.factor * (v - self._global[k]))


class RecordScreening:
    """Round hook (one site is enough: every site knows every site's numbers): one JSON line per round."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def on_round_end(self, trainer: Any, round: int, metrics: dict[str, Any]) -> None:
        screening = trainer.screening
        row = {"round": round + 1, "rejected": metrics.get("rejected", 0.0), "val_loss": metrics["val/pooled/loss"],
               "sites": [] if screening is None else [vars(s) for s in screening.stats],
               "excluded": {} if screening is None else {str(k): v for k, v in screening.excluded.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def _callbacks(*hooks: tuple[str, dict[str, Any]]) -> list[str]:
    specs = [{"class_path": f"poisoned_site.{name}", "init_args": args} for name, args in hooks]
    return ["--trainer.callbacks", json.dumps(specs)] if specs else []


# ---------------------------------------------------------------------------------------------------- runs
def _run_federation(command: list[str], roots: list[str], extra: list[list[str]], log_path: Path) -> tuple[int, float]:
    """``neurofed simulate``'s loop, with arguments for each site; returns (exit code, seconds)."""
    from neurofed.federated.simulate import simulate

    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = simulate(command, roots, extra_per_site=extra, out=log)
    return code, time.perf_counter() - start


def _synth(out: Path, sites: list[str], subjects: int, sizes: str, log: Path) -> None:
    import subprocess

    if all((out / s / "participants.tsv").is_file() for s in sites):
        return
    cmd = [sys.executable, "-m", "neurofed", "synth", "--out", str(out), "--sites", ",".join(sites), "--cohort",
           "healthy", "--subjects", str(subjects), "--sizes", sizes, "--resolution", "2", "--seed", "0",
           "--no-progress"]
    print("$ " + " ".join(cmd[2:]), flush=True)
    with open(log, "w") as fh:
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=True, cwd=REPO)


def run_attack(out: Path, roots: list[str], strategy: str, condition: str, seed: int, rerun: bool) -> dict[str, Any]:
    name = f"{strategy.lower()}_{condition}_s{seed}"
    record = out / "records" / f"{name}.json"
    if record.is_file() and not rerun:
        return json.loads(record.read_text())
    screening = out / "records" / f"{name}.screening.jsonl"
    command = ["fit", "--config", str(REPO / "configs" / "federated_demo.yaml"),
               "--trainer.strategy.class_path", STRATEGIES[strategy], "--trainer.rounds", "10",
               "--trainer.local_epochs", "2", "--trainer.patience", "null", "--trainer.federation.num_sites", "4",
               "--trainer.default_root_dir", str(out / "runs"), "--trainer.run_name", name,
               "--trainer.overwrite", "true", "--data.cache_dir", str(out / "cache"), "--seed_everything", str(seed),
               "--trainer.seed", str(seed), "--data.split_seed", str(42 + seed)]
    extra: list[list[str]] = []
    for k in range(len(roots)):
        hooks = [("RecordScreening", {"path": str(screening)})] if k == 0 else []
        if k == ATTACKER and CONDITIONS[condition] is not None:
            factor, entries = CONDITIONS[condition]
            hooks.append(("AlterUpdate", {"factor": factor, "entries": entries}))
        extra.append(_callbacks(*hooks))
    print(f"run {name}", flush=True)
    code, seconds = _run_federation(command, roots, extra, out / "logs" / f"{name}.log")
    result = summarize_run(out / "runs" / name, out / "logs" / f"{name}.log", screening, code, seconds)
    result.update(strategy=strategy, condition=condition, seed=seed, name=name)
    record.write_text(json.dumps(result, indent=1))
    print(f"  exit {code}, {seconds / 60:.1f} min; final pooled val loss {result['final_val_loss']:.3f}, "
          f"rejected {result['rejected_rounds']}, screened out {result['screened_out']}", flush=True)
    return result


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def summarize_run(run_dir: Path, log: Path, screening: Path, code: int, seconds: float) -> dict[str, Any]:
    """What one run did: rounds, NaN rounds committed, rejections, exclusions, the final model and the test."""
    history = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").is_file() else []
    committed = [h for h in history if not h.get("rejected")]
    losses = [math.nan if h["val/pooled/loss"] is None else h["val/pooled/loss"] for h in committed]  # JSON null
    test_path = run_dir / "test_metrics.json"
    test = json.loads(test_path.read_text())["pooled"] if test_path.is_file() else {}
    rounds = [json.loads(line) for line in screening.read_text().splitlines()] if screening.is_file() else []
    errors = sorted({m.group(1) for m in re.finditer(r"neurofed: error: (.*?) \(NEUROFED_DEBUG", log.read_text())})
    return {
        "exit_code": code, "minutes": seconds / 60, "rounds": len(history),
        "nan_rounds_committed": sum(not math.isfinite(x) for x in losses),
        "rejected_rounds": sum(bool(h.get("rejected")) for h in history),
        "screened_out": sum(len(r["excluded"]) for r in rounds),
        "screened_attacker": sum(str(ATTACKER) in r["excluded"] for r in rounds),
        "final_val_loss": losses[-1] if losses else math.nan,
        "best_val_loss": min((x for x in losses if math.isfinite(x)), default=math.nan),
        "best_round": int(committed[int(np.nanargmin(losses))]["round"]) if any(map(math.isfinite, losses)) else 0,
        "test_mae": _number(test.get("mae")), "mean_predictor_mae": _number(test.get("baseline_mae")),
        "error": errors[0] if errors else "",
    }


def run_demo(out: Path, rerun: bool) -> dict[str, Any]:
    """The demo exactly as ``scripts/demo.sh`` runs it (40 subjects on average per site, seed 0), plus the recorder."""
    record = out / "records" / "demo.json"
    if record.is_file() and not rerun:
        return json.loads(record.read_text())
    data = out / "demo_data"
    _synth(data, ["ixi", "sald", "camcan"], 40, "reference", out / "logs" / "synth_demo.log")
    roots = [str(data / s) for s in ("ixi", "sald", "camcan")]
    screening = out / "records" / "demo.screening.jsonl"
    command = ["fit", "--config", str(REPO / "configs" / "federated_demo.yaml"), "--trainer.default_root_dir",
               str(out / "runs"), "--trainer.run_name", "demo", "--trainer.overwrite", "true",
               "--data.cache_dir", str(out / "cache")]
    extra = [_callbacks(("RecordScreening", {"path": str(screening)}))] + [[]] * 2
    print("run demo", flush=True)
    code, seconds = _run_federation(command, roots, extra, out / "logs" / "demo.log")
    result = summarize_run(out / "runs" / "demo", out / "logs" / "demo.log", screening, code, seconds)
    result.update(strategy="FedBN", condition="honest (demo)", seed=0, name="demo")
    record.write_text(json.dumps(result, indent=1))
    return result


def run_replication_like(out: Path, rerun: bool) -> list[dict[str, Any]]:
    """Seed 0 of ``benchmarks/replication.py`` (its CPU defaults), every federated run of it, plus the recorder:
    brain age over the three healthy sites with FedAvg, FedBN and FedProx, then SDMT over the three MS sites
    (patients 6, 30 and 98: the most unequal sites), deep and shallow transfer from the FedAvg model."""
    import replication as rep

    args = rep.apply_defaults(argparse.Namespace(full=False, out=out / "replication"))
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    healthy = [str(args.out / "sites" / s) for s in rep.HEALTHY]
    ms = [str(args.out / "sites_ms" / s) for s in rep.MS]
    if not all((Path(r) / "participants.tsv").is_file() for r in healthy):
        rep.synth(args, "sites", rep.HEALTHY, round(args.scale * rep.HEALTHY_STUDY / 3), 0,
                  args.out / "logs" / "synth_healthy.log")
    if not all((Path(r) / "participants.tsv").is_file() for r in ms):
        rep.synth(args, "sites_ms", rep.MS, max(round(args.scale * args.ms_fraction * rep.MS_STUDY / 3), 20), 1,
                  args.out / "logs" / "synth_ms.log", cohort="ms")
    brain = ["--config", str(REPO / "configs" / "brain_age_cpu.yaml"), *rep.size_args(args, 0),
             *rep.brain_age_model_args(args)]
    backbone = args.out / "runs" / "replication_fedavg_s0" / "site-0" / "best.ckpt"
    labels = {"fedavg": "FedAvg", "fedbn": "FedBN", "fedprox": "FedProx"}
    steps = {f"replication_{s}_s0": (healthy, labels[s], [
        *brain, "--trainer.strategy.class_path", rep.STRATEGIES[s]]) for s in ("fedavg", "fedbn", "fedprox")}
    for transfer in ("deep", "shallow"):
        steps[f"replication_sdmt_{transfer}_s0"] = (ms, f"SDMT {transfer}", [
            "--config", str(REPO / "configs" / f"sdmt_{transfer}_cpu.yaml"), *rep.size_args(args, 0),
            "--model.init_args.brain_age_checkpoint", str(backbone),
            "--model.init_args.channels_last", str(args.channels_last).lower()])
    results = []
    for name, (roots, strategy, base) in steps.items():
        record = out / "records" / f"{name}.json"
        if record.is_file() and not rerun:
            results.append(json.loads(record.read_text()))
            continue
        screening = out / "records" / f"{name}.screening.jsonl"
        extra = [_callbacks(("RecordScreening", {"path": str(screening)}))] + [[]] * (len(roots) - 1)
        print(f"run {name}", flush=True)
        code, seconds = _run_federation(["fit", *base, "--trainer.run_name", name, "--trainer.overwrite", "true"],
                                        roots, extra, out / "logs" / f"{name}.log")
        result = summarize_run(args.out / "runs" / name, out / "logs" / f"{name}.log", screening, code, seconds)
        result.update(strategy=strategy, condition="honest (replication-like)", seed=0, name=name)
        record.write_text(json.dumps(result, indent=1))
        results.append(result)
    return results


# ------------------------------------------------------------------------------------------------- report
def screening_rows(out: Path, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run, round and contributing site, from the recorders' files."""
    rows = []
    for res in results:
        path = out / "records" / f"{res['name']}.screening.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            r = json.loads(line)
            contributing = [s for s in r["sites"] if s["weight"] > 0 and s["finite"]]
            median = float(np.median([s["norm"] for s in contributing])) if contributing else math.nan
            weights_median = float(np.median([s["weight_norm"] for s in contributing])) if contributing else math.nan
            for k, s in enumerate(r["sites"]):
                if s["weight"] <= 0:
                    continue
                rows.append({"run": res["name"], "strategy": res["strategy"], "condition": res["condition"],
                             "seed": res["seed"], "round": r["round"], "site": k, "norm": s["norm"],
                             "norm_ratio": s["norm"] / median if median > 0 else math.nan,
                             "weight_norm_ratio": s["weight_norm"] / weights_median if weights_median > 0 else math.nan,
                             "cosine": s["cosine"],
                             "variance_ratio_min": s["variance_ratio_min"],
                             "variance_ratio_max": s["variance_ratio_max"], "excluded": r["excluded"].get(str(k), ""),
                             "rejected": r["rejected"]})
    return rows


def _quantiles(values: list[float]) -> str:
    v = np.asarray([x for x in values if math.isfinite(x)])
    if v.size == 0:
        return "n/a | n/a | n/a | n/a | n/a | 0"
    q = np.quantile(v, [0.0, 0.01, 0.5, 0.99, 1.0])
    return " | ".join(f"{x:.3f}" for x in q) + f" | {v.size}"


def derive_thresholds(honest: list[dict[str, Any]]) -> dict[str, float]:
    """The screening thresholds the honest statistics give: each honest extreme with a margin (cosine: minus 0.1;
    ratios: times 1.5), rounded outward to one decimal."""
    def finite(values: Any) -> list[float]:
        return [v for v in values if math.isfinite(v)]

    cosines = finite(x["cosine"] for x in honest)
    ratios = finite(x[k] for x in honest for k in ("norm_ratio", "weight_norm_ratio"))
    spread = finite(max(x["variance_ratio_max"], 1 / x["variance_ratio_min"]) for x in honest
                    if x["variance_ratio_min"] > 0)
    outward = {"min_update_cosine": (cosines, lambda v: math.floor((min(v) - 0.1) * 10) / 10),
               "update_norm_factor": (ratios, lambda v: math.ceil(max(v) * 1.5 * 10) / 10),
               "max_variance_ratio": (spread, lambda v: math.ceil(max(v) * 1.5 * 10) / 10)}
    return {name: rule(values) if values else math.nan for name, (values, rule) in outward.items()}


def report(out: Path, results: list[dict[str, Any]], honest_refs: list[dict[str, Any]]) -> list[str]:
    fields = ["strategy", "condition", "seed", "exit_code", "rounds", "nan_rounds_committed", "rejected_rounds",
              "screened_out", "screened_attacker", "final_val_loss", "best_val_loss", "best_round", "test_mae",
              "mean_predictor_mae", "minutes", "error"]
    with open(out / "runs.tsv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fields, delimiter="\t", extrasaction="ignore")
        w.writeheader()
        for res in results + honest_refs:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in res.items()})
    rows = screening_rows(out, results + honest_refs)
    if rows:
        with open(out / "screening.tsv", "w", newline="") as fh:
            w = csv.DictWriter(fh, list(rows[0]), delimiter="\t")
            w.writeheader()
            w.writerows(rows)

    def fmt(values: list[float], digits: int = 2) -> str:
        v = [x for x in values if math.isfinite(x)]
        if not v:
            return "NaN"
        return f"{np.mean(v):.{digits}f}" + (f" ± {np.std(v, ddof=1):.{digits}f}" if len(v) > 1 else "") + (
            f" ({len(values) - len(v)} NaN)" if len(v) < len(values) else "")

    seeds = sorted({r["seed"] for r in results})
    md = [f"## One faulty or hostile site of four (seeds {', '.join(map(str, seeds))}; mean ± SD over seeds)", "",
          "| strategy | site 3 sends | committed rounds with a NaN pooled val loss | rejected rounds | final pooled "
          "val loss | honest run's | ratio to honest, per seed | test pooled MAE (mean-predictor) | screened out: "
          "site-rounds (site 3) | exit codes |", "|---|---|---|---|---|---|---|---|---|---|"]
    honest = {(r["strategy"], r["seed"]): r for r in results if r["condition"] == "honest"}
    label = {"honest": "honest", "flip5": "update × −5 (sign flip)", "scale8": "update × 8",
             "flip5w": "weights' update × −5"}
    for strategy in STRATEGIES:
        for condition in CONDITIONS:
            runs = sorted((r for r in results if r["strategy"] == strategy and r["condition"] == condition),
                          key=lambda r: r["seed"])
            if not runs:
                continue
            mates = [honest.get((strategy, r["seed"])) for r in runs]
            ratios = [r["final_val_loss"] / h["final_val_loss"] if h else math.nan for r, h in zip(runs, mates)]
            md.append(
                f"| {strategy} | {label[condition]} | {sum(r['nan_rounds_committed'] for r in runs)} of "
                f"{sum(r['rounds'] - r['rejected_rounds'] for r in runs)} | {sum(r['rejected_rounds'] for r in runs)} | "
                f"{fmt([r['final_val_loss'] for r in runs])} | {fmt([h['final_val_loss'] for h in mates if h])} | "
                f"{', '.join(f'{x:.2f}' for x in ratios)} | {fmt([r['test_mae'] for r in runs])} "
                f"({fmt([r['mean_predictor_mae'] for r in runs])}) | {sum(r['screened_out'] for r in runs)} "
                f"({sum(r['screened_attacker'] for r in runs)}) | {', '.join(str(r['exit_code']) for r in runs)} |")
    twins = [(r, m) for r in results if r["strategy"] == "FedTrimmedAvg" for m in results
             if m["strategy"] == "FedMedian" and (m["condition"], m["seed"]) == (r["condition"], r["seed"])]
    if twins:
        same = all(all(r[k] == m[k] for k in ("final_val_loss", "best_val_loss", "test_mae", "screened_out"))
                   for r, m in twins)
        md += ["", f"FedTrimmedAvg (default β) at four sites trims one site at each end, the mean of the middle two: "
               f"FedMedian's rule. Its {len(twins)} run(s) against FedMedian's with the same condition and seed: "
               f"{'identical final and best validation loss, test MAE and exclusions' if same else 'DIFFERENT'}."]
    stops = sorted({r["error"] for r in results if r["error"]})
    if stops:
        md += ["", "Runs that stopped (the line every site printed):", ""] + [f"- `{line}`" for line in stops]
    md += ["", "## Honest runs: no site may be left out", "",
           "| run | strategy | rounds | screened out | rejected rounds | exit code |", "|---|---|---|---|---|---|"]
    for r in [r for r in results if r["condition"] == "honest"] + honest_refs:
        md.append(f"| {r['name']} | {r['strategy']} | {r['rounds']} | {r['screened_out']} | {r['rejected_rounds']} | "
                  f"{r['exit_code']} |")
    md += ["", "## Distribution of the honest screening statistics (every contributing site and round)", "",
           "| runs | statistic | min | 1 % | median | 99 % | max | n |", "|---|---|---|---|---|---|---|---|"]
    groups = {"4-site matrix, honest": [x for x in rows if x["condition"] == "honest"],
              "demo and replication-like": [x for x in rows if x["condition"].startswith("honest (")]}
    for group, sel in groups.items():
        for stat in ("cosine", "norm_ratio", "weight_norm_ratio", "variance_ratio_min", "variance_ratio_max"):
            md.append(f"| {group} | {stat} | {_quantiles([x[stat] for x in sel])} |")
    derived = derive_thresholds([x for x in rows if x["condition"].startswith("honest")])
    from neurofed.federated.config import Federation

    defaults = Federation()
    md += ["", "Thresholds from every honest run above (rule: each honest extreme with a margin — the lowest cosine "
           "minus 0.1; the highest norm ratio, of the whole update or of its weights, and the highest BatchNorm "
           "variance ratio, sent to global or its inverse, times 1.5 — rounded outward to one decimal):", "",
           "| setting | from the honest runs | default in `Federation` |", "|---|---|---|"]
    md += [f"| {name} | {value:g} | {getattr(defaults, name)} |" for name, value in derived.items()]
    md += ["", "Attacker's statistics (site 3, every attacked run and round):", "",
           "| site 3 sends | statistic | min | 1 % | median | 99 % | max | n |", "|---|---|---|---|---|---|---|---|"]
    for condition in [c for c in CONDITIONS if c != "honest"]:
        sel = [x for x in rows if x["condition"] == condition and x["site"] == ATTACKER]
        for stat in ("cosine", "norm_ratio", "weight_norm_ratio", "variance_ratio_min"):
            if sel:
                md.append(f"| {label[condition]} | {stat} | {_quantiles([x[stat] for x in sel])} |")
    (out / "table.md").write_text("\n".join(md) + "\n")
    return md


def command_line() -> str:
    """The command that wrote the tables (``--report-only`` left out: it only rebuilds them from the runs)."""
    import shlex

    return "python benchmarks/poisoned_site.py " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--report-only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "poisoned_site")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--subjects", type=int, default=32, help="subjects per site of the four-site federation")
    parser.add_argument("--plan", default=DEFAULT_PLAN,
                        help="strategy[/seeds]:condition,condition;... (conditions: " + ", ".join(CONDITIONS) + ")")
    parser.add_argument("--no-references", action="store_true", help="skip the demo and replication-like runs")
    parser.add_argument("--rerun", action="store_true", help="run again what already finished")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the tables of finished runs")
    parser.add_argument("--docs-dir", type=Path, default=REPO / "docs" / "results",
                        help="where copies of the tables go (poisoned_site.md, poisoned_site_*.tsv)")
    args = parser.parse_args()
    out = args.out.resolve()
    for folder in ("records", "logs", "runs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    plan = []  # (strategy, condition, seeds)
    for part in filter(None, args.plan.split(";")):
        head, conditions = part.split(":")
        strategy, _, seeds = head.partition("/")
        plan += [(strategy, c, int(seeds) if seeds else args.seeds) for c in conditions.split(",")]
    for s, c, _ in plan:
        if s not in STRATEGIES or c not in CONDITIONS:
            sys.exit(f"unknown strategy or condition in --plan: {s}:{c}")
    data = out / "data"
    roots = [str(data / s) for s in SITES]
    if not args.report_only:
        if not args.no_references:
            run_demo(out, args.rerun)
            run_replication_like(out, args.rerun)
        _synth(data, SITES, args.subjects, "equal", out / "logs" / "synth.log")
        for seed in range(args.seeds):
            for strategy, condition, seeds in plan:
                if seed < seeds:
                    run_attack(out, roots, strategy, condition, seed, args.rerun)
    # The tables cover every finished run under --out, of this invocation and of earlier ones.
    records = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    refs = [r for r in records if r["condition"].startswith("honest (")]
    results = [r for r in records if not r["condition"].startswith("honest (")]
    md = report(out, results, refs)
    print("\n".join(md))
    args.docs_dir.mkdir(parents=True, exist_ok=True)
    (args.docs_dir / "poisoned_site.md").write_text(
        "# One faulty or hostile site\n\nWritten by `" + command_line() + "` (this file and "
        "`poisoned_site_runs.tsv`, `poisoned_site_screening.tsv` beside it); what the checks are: "
        "`docs/robustness.md`.\n\n" + "\n".join(md) + "\n")
    for name in ("runs.tsv", "screening.tsv"):
        if (out / name).is_file():
            (args.docs_dir / f"poisoned_site_{name}").write_text((out / name).read_text())
    print(f"\nwrote {out / 'runs.tsv'}, {out / 'screening.tsv'}, {out / 'table.md'} and their copies under "
          f"{args.docs_dir}")


if __name__ == "__main__":
    main()
