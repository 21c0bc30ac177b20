"""How long the README's "Using it" commands take: a quick first try, and a round of the full CPU config.

Runs, as a new user would and each as its own ``neurofed`` process:

1. the quick first try: ``synth`` with ``--subjects`` per site (default 20), ``fit`` of ``brain_age_cpu.yaml`` for
   ``--rounds`` rounds (default 3), ``predict`` with its best model, ``status``;
2. the README's own sites (``synth --subjects 100``) and ``fit`` of ``brain_age_cpu.yaml`` for two rounds; a
   round's time comes from ``history.json`` (training + aggregation + validation of round 2, once the cache is
   warm), so the full run's time is that times the config's rounds (30, fewer if early stopping ends it).

Writes ``<out>/first_run_times.json`` and a table (``--table``, default ``docs/results/first_run_times.md``).
Times depend on the machine and on what else runs on it; the table says which machine it was.

    python benchmarks/first_run_times.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SITES = ("ixi", "sald", "camcan")
CONFIG = "configs/brain_age_cpu.yaml"
FULL_ROUNDS = 30  # brain_age_cpu.yaml's trainer.rounds


def neurofed(*args: str) -> float:
    """Run one ``neurofed`` command; its wall time in seconds (it must succeed)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "neurofed", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def fit_args(out: Path, roots: list[Path], run: str, rounds: int) -> list[str]:
    return ["fit", "--config", CONFIG, "--data.root", "[" + ",".join(map(str, roots)) + "]",
            "--trainer.rounds", str(rounds), "--trainer.run_name", run, "--trainer.default_root_dir",
            str(out / "runs"), "--data.cache_dir", str(out / "cache"), "--trainer.enable_progress_bar", "false",
            "--trainer.overwrite", "true"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/first_run"))
    parser.add_argument("--subjects", type=int, default=20, help="subjects per site of the quick first try")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the quick first try")
    parser.add_argument("--table", type=Path, default=Path("docs/results/first_run_times.md"))
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    quick = [out / "synth_quick" / s for s in SITES]
    times["quick synth"] = neurofed("synth", "--out", str(out / "synth_quick"), "--sites", ",".join(SITES),
                                    "--subjects", str(args.subjects), "--resolution", "2", "--no-progress")
    times["quick fit"] = neurofed(*fit_args(out, quick, "quick", args.rounds))
    times["quick predict"] = neurofed("predict", "--config", CONFIG, "--data.root",
                                      "[" + ",".join(map(str, quick)) + "]", "--data.cache_dir", str(out / "cache"),
                                      "--trainer.default_root_dir", str(out / "runs"), "--trainer.run_name", "quick",
                                      "--ckpt_path", str(out / "runs" / "quick" / "best.ckpt"))
    times["status"] = neurofed("status", str(out / "runs" / "quick"))

    full = [out / "synth" / s for s in SITES]
    times["synth (README: 100 subjects per site)"] = neurofed(
        "synth", "--out", str(out / "synth"), "--sites", ",".join(SITES), "--subjects", "100", "--resolution", "2",
        "--no-progress")
    times["fit, 2 rounds of brain_age_cpu.yaml"] = neurofed(*fit_args(out, full, "full", 2))
    history = json.loads((out / "runs" / "full" / "history.json").read_text())
    second = history[-1]
    round_s = second["time/train_s"] + second["time/aggregate_s"] + second["time/validate_s"]
    times["one round of brain_age_cpu.yaml (round 2)"] = round_s
    times["brain_age_cpu.yaml, 30 rounds (estimate)"] = FULL_ROUNDS * round_s

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    (out / "first_run_times.json").write_text(json.dumps({"machine": machine, "seconds": times}, indent=2) + "\n")
    lines = ["# Times of the README's first commands", "",
             f"`python benchmarks/first_run_times.py` on {machine} (1-minute load average at the end).", "",
             "| step | seconds | minutes |", "|---|---|---|"]
    lines += [f"| {name} | {s:.0f} | {s / 60:.1f} |" for name, s in times.items()]
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
