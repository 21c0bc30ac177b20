"""Render the generated parts of README.md and docs/ from the committed results files.

Numbers in the documentation are never typed: a Markdown file marks each generated part

    <!-- generated: NAME -->
    ...
    <!-- /generated -->

and this script replaces what lies between the markers by ``RENDERERS[NAME]()``, which reads only files under
``docs/results/`` that a committed benchmark command wrote (each folder has a ``meta.json`` naming the
command, the commit and the seeds). ``tests/test_generated_docs.py`` fails when a block differs from what its
results file renders, so a rerun that changes a number changes the documentation with it.

    python benchmarks/report.py            # rewrite every block
    python benchmarks/report.py --check    # list stale blocks, exit 1 if any
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.DOTALL)

sys.path.insert(0, str(REPO / "src"))


# ------------------------------------------------------------------------------------------------ readers


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def num(value: str | float | None, digits: int = 2) -> str:
    """A number for a table; an empty cell for a missing or non-finite value."""
    if value in (None, ""):
        return ""
    x = float(value)
    return "" if not math.isfinite(x) else f"{x:.{digits}f}".replace("-", "−")


def interval(estimate: float | str, low: float | str, high: float | str, digits: int = 2) -> str:
    return f"{num(estimate, digits)} [{num(low, digits)}, {num(high, digits)}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def provenance(folder: Path, meta_file: str = "meta.json") -> str:
    """One line: the command that wrote the results, at which commit, on which machine, with which seeds."""
    meta = read_json(folder / meta_file)
    m = meta.get("machine", {})
    where = f"{m.get('cpus', '?')}-core CPU" + (f", {m['gpu']}" if m.get("gpu") else "")
    seeds = meta.get("seeds") or []
    seeds_text = f"seeds {seeds[0]}–{seeds[-1]}" if len(seeds) > 1 else (f"seed {seeds[0]}" if seeds else "")
    parts = [f"`{meta['command']}`", f"commit {meta['commit']}", where, seeds_text, meta.get("date", "")]
    return "Source: " + "; ".join(p for p in parts if p) + f" (`{folder.relative_to(REPO)}/`)."


# ------------------------------------------------------------------------------------------------ renderers

RENDERERS: dict[str, Callable[[], str]] = {}


def renderer(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        RENDERERS[name] = fn
        return fn
    return register


@renderer("demo")
def render_demo() -> str:
    """The demo's test table exactly as ``bash scripts/demo.sh`` prints it, and its reproducibility."""
    from neurofed.metrics import format_table

    folder = RESULTS / "demo"
    rows = read_json(folder / "test_metrics.json")
    pooled = rows["pooled"]
    sites = [k for k in rows if k != "pooled"]
    below = sum(rows[s]["mae"] < rows[s]["baseline_mae"] for s in sites)
    lines = ["```text", f"test (demo, {len(sites)} site(s))", format_table(rows), "```", "",
             (f"Pooled test MAE {num(pooled['mae'])} years against {num(pooled['baseline_mae'])} for predicting the "
              f"training mean (ratio {num(pooled['mae'] / pooled['baseline_mae'])}); {below} of {len(sites)} sites "
              "below their own predict-the-mean MAE.")]
    threads = folder / "threads.json"
    if threads.is_file():
        t = read_json(threads)
        runs = ", ".join(f"{k} thread(s) per site: {num(v)}" for k, v in t["pooled_mae"].items())
        lines += ["", (f"Reproducibility across reduction orders (the same demo with a different number of torch "
                       f"threads per site, the cheapest proxy for another CPU): pooled test MAE {runs}; largest "
                       f"difference {num(t['max_difference'])} years.")]
    return "\n".join([*lines, "", provenance(folder)]) + "\n"


def _mean_sd(values: list[float], digits: int = 2) -> str:
    if len(values) < 2:
        return num(values[0], digits) if values else ""
    import statistics

    return f"{num(statistics.mean(values), digits)} ± {num(statistics.stdev(values), digits)}"


@renderer("recipe-ablation")
def render_recipe_ablation() -> str:
    """Each change alone, per method: best and last pooled validation loss and the largest rise, over seeds."""
    folder = RESULTS / "recipe"
    rows = read_tsv(folder / "ablation.tsv")
    meta = read_json(folder / "meta.json")
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            sel = [r for r in rows if r["variant"] == variant and r["method"] == method]
            if not sel:
                continue
            best = [float(r["best"]) for r in sel]
            last = [float(r["last"]) for r in sel]
            rise = max(float(r["max_rise"]) for r in sel)
            rounds = ", ".join(f"{r['rounds']}/{r['best_round']}" for r in sel)
            out.append([variant, method, ", ".join(r["seed"] for r in sel), _mean_sd(best), _mean_sd(last),
                        f"{rise * 100:.0f} %", rounds])
    header = ["variant", "method", "seeds", "best val loss (mean ± SD over seeds)", "last round's",
              "largest rise over the best so far", "rounds run / best round, per seed"]
    note = (f"Pooled validation L1 (years) on the demo's data; the rise is counted after the warm-up "
            f"({meta['warmup_rounds']} round(s)) for the variants that have one.")
    return "\n".join([table(header, out), "", note, "", provenance(folder)]) + "\n"


def _comparisons(folder: Path) -> list[dict[str, str]]:
    return read_tsv(folder / "comparisons.tsv")


def _task_table(folder: Path, task: str, reference: str | None) -> str:
    rows = [r for r in _comparisons(folder) if r["task"] == task]
    maes = {r["model_a"]: r for r in rows if r["kind"] == "mae"}
    diffs = {(r["model_a"], r["model_b"]): r for r in rows if r["kind"] == "difference"}
    header = ["model", "MAE per seed", "mean ± SD over seeds", "pooled [95 % CI over seeds and subjects]", "r",
              f"Δ vs {reference} [95 % CI]" if reference else "Δ vs predict-the-mean [95 % CI]"]
    body = []
    for model, r in maes.items():
        seeds = [float(v) for v in r["seed_values"].split(",") if v]
        d = diffs.get((model, reference or "predict-the-mean"))
        delta = ""
        if d:
            delta = interval(d["estimate"], d["low"], d["high"])
            delta = f"**{delta}**" if d["excludes_zero"] == "True" else delta
        body.append([model, ", ".join(num(v) for v in seeds), _mean_sd(seeds),
                     interval(r["estimate"], r["low"], r["high"]), "" if model == "predict-the-mean" else num(r["r"]),
                     delta])
    return table(header, body)


@renderer("replication-brain-age")
def render_replication_brain_age() -> str:
    folder = RESULTS / "replication"
    meta = read_json(folder / "meta.json")
    scans = meta["test_scans"]["brain age"]
    text = [_task_table(folder, "brain age", "centralized"), "",
            (f"Test scans per seed: {', '.join(map(str, scans))} ({sum(scans)} in all, "
             f"{meta['distinct_test_subjects']['brain age']} distinct subjects). Bold: the interval excludes zero.")]
    return "\n".join([*text, "", provenance(folder)]) + "\n"


@renderer("replication-comparisons")
def render_replication_comparisons() -> str:
    folder = RESULTS / "replication"
    rows = [r for r in _comparisons(folder) if r["kind"] in ("difference", "ratio")]
    body = []
    for r in rows:
        kind = "MAE(A) − MAE(B)" if r["kind"] == "difference" else "MAE(A) / MAE(B)"
        verdict = "yes" if r["excludes_zero"] == "True" else "no"
        body.append([r["task"], f"{r['model_a']} vs {r['model_b']}", kind, interval(r["estimate"], r["low"], r["high"]),
                     verdict])
    header = ["task", "A vs B", "statistic", "estimate [95 % CI over seeds and subjects]",
              "interval excludes no effect (0, or 1 for a ratio)"]
    return "\n".join([table(header, body), "", provenance(folder)]) + "\n"


@renderer("replication-stability")
def render_replication_stability() -> str:
    folder = RESULTS / "replication"
    rows = read_tsv(folder / "stability.tsv")
    body = []
    for run in dict.fromkeys(r["run"] for r in rows):
        sel = [r for r in rows if r["run"] == run]
        rises = [float(r["max_rise"]) for r in sel]
        body.append([run, ", ".join(f"{x * 100:.0f} %" for x in rises), ", ".join(f"{r['rounds']}/{r['best_round']}"
                                                                            for r in sel)])
    meta = read_json(folder / "meta.json")
    minutes = meta.get("minutes", {})
    total = minutes.get("total (this invocation)")
    text = [table(["run", "largest rise of the pooled validation loss over the best so far, per seed",
                   "rounds run / best round, per seed"], body), "",
            f"Counted after the {meta['warmup_rounds']}-round warm-up."]
    if total is not None:
        cpu = minutes.get("CPU time of all steps (user + system)")
        text.append(f"The whole study took {total:.1f} minutes" + (f" ({cpu:.1f} CPU minutes)" if cpu else "") + ".")
    return "\n".join([*text, "", provenance(folder)]) + "\n"


@renderer("sweep")
def render_sweep() -> str:
    folder = RESULTS / "site_effect_sweep"
    rows = read_tsv(folder / "sweep.tsv")
    body = []
    for r in rows:
        delta = ""
        if r["delta"]:
            delta = interval(r["delta"], r["delta_low"], r["delta_high"])
            if float(r["delta_low"]) > 0 or float(r["delta_high"]) < 0:
                delta = f"**{delta}**"
        seeds = [float(v) for v in r["mae_seeds"].split(",") if v]
        body.append([r["setting"], r["model"], interval(r["mae"], r["low"], r["high"]), _mean_sd(seeds), delta,
                     "" if not r["ratio"] else interval(r["ratio"], r["ratio_low"], r["ratio_high"])])
    header = ["setting", "model", "pooled test MAE [95 % CI]", "per seed, mean ± SD", "Δ vs centralized [95 % CI]",
              "ratio to centralized [95 % CI]"]
    return "\n".join([table(header, body), "", "Bold: the interval excludes zero.", "", provenance(folder)]) + "\n"


@renderer("sdmt-signal")
def render_sdmt_signal() -> str:
    """What the SDMT floor's image features detect: their r with the generator's true lesion load and thalamic
    loss, beside the oracle (true drivers) and predicting the mean, held out by subject."""
    folder = RESULTS / "sdmt"
    text = (folder / "signal.txt").read_text().rstrip("\n")
    return "\n".join(["```text", text, "```", "", provenance(folder, "signal_meta.json")]) + "\n"


@renderer("sdmt-curve")
def render_sdmt_curve() -> str:
    """Deep vs shallow SDMT transfer and the references, per cohort size, with seed-and-subject intervals."""
    folder = RESULTS / "sdmt"
    rows = read_tsv(folder / "learning_curve.tsv")
    meta = read_json(folder / "learning_curve.json")
    models = list(dict.fromkeys(r["model"] for r in rows))
    body = []
    for patients in dict.fromkeys(r["patients"] for r in rows):
        sel = {r["model"]: r for r in rows if r["patients"] == patients}
        first = next(iter(sel.values()))
        body.append([patients, first["seeds"], first["test_scans"],
                     *(interval(sel[m]["mae"], sel[m]["low"], sel[m]["high"]) if m in sel else "" for m in models)])
    diffs = []
    for r in read_tsv(folder / "learning_curve_comparisons.tsv"):
        d = interval(r["delta_mae"], r["low"], r["high"])
        diffs.append([r["patients"], f"{r['model_a']} − {r['model_b']}",
                      f"**{d}**" if r["excludes_zero"] == "True" else d])
    note = ("SDMT test MAE (points), pooled over seeds [95 % interval resampling seeds, then test subjects within "
            "seed and site]. Bold: the interval excludes zero.")
    source = (f"Source: `{meta['command']}`; commit {meta['commit']} (runs trained at {meta['train_commit']}); "
              f"seeds per size {meta['seeds']} (`{folder.relative_to(REPO)}/`).")
    return "\n".join([table(["patients", "seeds", "test scans", *models], body), "", note, "",
                      table(["patients", "comparison", "ΔMAE [95 % CI]"], diffs), "", source]) + "\n"


@renderer("recipe-summary")
def render_recipe_summary() -> str:
    """Before vs after, per method: the short form of the ablation for README."""
    folder = RESULTS / "recipe"
    rows = read_tsv(folder / "ablation.tsv")
    body = []
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = [method]
        for variant in ("before", "recipe"):
            sel = [r for r in rows if r["variant"] == variant and r["method"] == method]
            if not sel:
                cells += ["", ""]
                continue
            cells.append(_mean_sd([float(r["best"]) for r in sel]))
            cells.append(f"{max(float(r['max_rise']) for r in sel) * 100:.0f} %")
        body.append(cells)
    header = ["method", "before: best val loss", "before: largest rise", "recipe: best val loss", "recipe: largest rise"]
    return "\n".join([table(header, body), "", provenance(folder)]) + "\n"


def _row(rows: list[dict[str, str]], kind: str, a: str, b: str = "") -> dict[str, str] | None:
    return next((r for r in rows if r["kind"] == kind and r["model_a"] == a and r["model_b"] == b), None)


def _verdict(r: dict[str, str], unit: str = "years") -> str:
    text = f"{interval(r['estimate'], r['low'], r['high'])} {unit}"
    if r["excludes_zero"] != "True":
        return f"{text}: the interval includes zero, so no difference is shown"
    return f"{text}: {'lower' if float(r['high']) < 0 else 'higher'}, and the interval excludes zero"


@renderer("replication-verdict")
def render_replication_verdict() -> str:
    """The replication's comparisons in plain words, every number from comparisons.tsv."""
    folder = RESULTS / "replication"
    rows = [r for r in _comparisons(folder) if r["task"] == "brain age"]
    lines = []
    for r in rows:
        if r["kind"] == "difference" and r["model_b"] == "centralized" and r["model_a"].startswith("federated"):
            ratio = _row(rows, "ratio", r["model_a"], "centralized")
            extra = f" (MAE ratio {interval(ratio['estimate'], ratio['low'], ratio['high'])})" if ratio else ""
            lines.append(f"- **{r['model_a']} vs centralized:** {_verdict(r)}{extra}.")
    control = _row(rows, "difference", "centralized + per-site BN", "centralized")
    if control:
        lines.append(f"- **Per-site BatchNorm alone** (the centralized model, its statistics re-estimated at each site, "
                     f"no training) vs centralized: {_verdict(control)}.")
    for r in rows:
        if r["kind"] == "difference" and r["model_b"] == "centralized + per-site BN":
            lines.append(f"- **{r['model_a']} vs that control** (what federation adds beyond normalisation): "
                         f"{_verdict(r)}.")
    sdmt = [r for r in _comparisons(folder) if r["task"] == "sdmt"]
    deep = _row(sdmt, "difference", "deep", "shallow")
    if deep:
        lines.append(f"- **SDMT, deep vs shallow transfer:** {_verdict(deep, 'points')}.")
        for arm in ("deep", "shallow"):
            mean = _row(sdmt, "difference", arm, "predict-the-mean")
            if mean:
                lines.append(f"- **SDMT, {arm} vs predicting the mean:** {_verdict(mean, 'points')}.")
    return "\n".join([*lines, "", provenance(folder)]) + "\n"


@renderer("targets")
def render_targets() -> str:
    """The convergence targets, each against what the results files say."""
    body = []

    def add(target: str, measured: str, met: bool | None) -> None:
        body.append([target, measured, "" if met is None else ("yes" if met else "**no**")])

    demo = RESULTS / "demo"
    if (demo / "history.json").is_file():
        warmup = 1
        losses = [h["val/pooled/loss"] for h in read_json(demo / "history.json")]
        rise = max([losses[r] / min(losses[:r]) - 1 for r in range(max(warmup, 1), len(losses))], default=0.0)
        add("demo: no round after the warm-up above the best so far by > 15 %", f"largest rise {rise * 100:.1f} %",
            rise <= 0.15)
    if (demo / "test_metrics.json").is_file():
        rows = read_json(demo / "test_metrics.json")
        ratio = rows["pooled"]["mae"] / rows["pooled"]["baseline_mae"]
        add("demo: pooled test MAE ≤ 0.6 × predict-the-mean", f"{ratio:.2f} ×", ratio <= 0.6)
        above = [k for k, v in rows.items() if k != "pooled" and v["mae"] >= v["baseline_mae"]]
        add("demo: every site below its own predict-the-mean MAE",
            "every site below" if not above else f"not at {', '.join(above)}", not above)
    if (demo / "threads.json").is_file():
        diff = read_json(demo / "threads.json")["max_difference"]
        add("demo: pooled test MAE within ±0.5 y between 1 and 2 threads per site", f"{diff:.2f} y", diff <= 0.5)
    rep = RESULTS / "replication"
    if (rep / "stability.tsv").is_file():
        rises = [float(r["max_rise"]) for r in read_tsv(rep / "stability.tsv")]
        add("replication: no round after the warm-up above the best so far by > 15 %, every run",
            f"largest rise {max(rises) * 100:.1f} % over {len(rises)} runs", max(rises) <= 0.15)
        import statistics

        sds = {r["model_a"]: statistics.stdev([float(v) for v in r["seed_values"].split(",")])
               for r in _comparisons(rep) if r["task"] == "brain age" and r["kind"] == "mae" and
               r["model_a"] != "predict-the-mean"}
        worst = max(sds, key=sds.get)
        add("replication, brain age: per-seed SD ≤ 1 y for every model", f"largest: {worst} {sds[worst]:.2f} y",
            sds[worst] <= 1.0)
        minutes = read_json(rep / "meta.json").get("minutes", {})
        cpu = minutes.get("CPU time of all steps (user + system)")
        if cpu:
            add("replication ≤ 45 min on 2 idle cores with its default seeds",
                f"{cpu:.0f} CPU minutes (≥ {cpu / 2:.0f} min on 2 cores)", cpu / 2 <= 45)
    sweep = RESULTS / "site_effect_sweep"
    ratio = next((r for r in _comparisons(rep) if r["kind"] == "ratio" and r["model_a"] == "federated fedavg"
                  and r["model_b"] == "centralized"), None) if (rep / "comparisons.tsv").is_file() else None
    if not (sweep / "sweep.tsv").is_file() and ratio:
        add("FedAvg / centralized MAE ≤ 1.10 at site effect 0",
            "not measured (the sweep has not been rerun); at site effect 1 (replication): "
            + interval(ratio["estimate"], ratio["low"], ratio["high"]), None)
    if (sweep / "sweep.tsv").is_file():
        row = next((r for r in read_tsv(sweep / "sweep.tsv") if r["setting"] == "scanner 0" and r["model"] == "FedAvg"),
                   None)
        if row and row["ratio"]:
            add("FedAvg / centralized MAE ≤ 1.10 at site effect 0", interval(row["ratio"], row["ratio_low"],
                                                                            row["ratio_high"]),
                float(row["ratio"]) <= 1.10)
    return table(["target", "measured", "met"], body) + "\n"


# ------------------------------------------------------------------------------------------------ documents


def blocks(text: str) -> list[re.Match]:
    return list(BLOCK.finditer(text))


def rendered(text: str) -> str:
    """``text`` with every generated block rendered anew; unknown names are an error."""
    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in RENDERERS:
            raise KeyError(f"no renderer for generated block {name!r}; known: {', '.join(sorted(RENDERERS))}")
        return match.group(1) + RENDERERS[name]() + match.group(4)
    return BLOCK.sub(replace, text)


def stale(documents: list[Path] = DOCUMENTS) -> list[str]:
    """``file: block`` for every block whose text differs from what its results file renders."""
    out = []
    for path in documents:
        text = path.read_text()
        for match in blocks(text):
            fresh = rendered(match.group(0))
            if fresh != match.group(0):
                shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                out.append(f"{shown}: {match.group('name')}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only list stale blocks; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        out = stale()
        print("\n".join(out) if out else "every generated block matches its results file")
        return 1 if out else 0
    for path in DOCUMENTS:
        text = path.read_text()
        if blocks(text):
            new = rendered(text)
            if new != text:
                path.write_text(new)
                print(f"updated {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
