"""The demo's documented table, and how far it moves with the number of torch threads per site.

Runs ``bash scripts/demo.sh`` as a user would (one torch thread per site, the demo's default), keeps the test
table it printed (``checkpoints/demo/test_metrics.json``) and its validation curve, then trains the same demo again
with ``--threads`` threads per site (same data, seed and settings; only the order of floating-point reductions
changes, the cheapest stand-in for another CPU) and records both pooled test MAEs. Writes
``docs/results/demo/`` (``test_metrics.json``, ``history.json``, ``threads.json``, ``meta.json``); README's demo
block is rendered from it (``benchmarks/report.py``).

    python benchmarks/demo_results.py
    python benchmarks/demo_results.py --threads 2,4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import REPO, write_meta

ROOTS = ",".join(f"data/synth/{s}" for s in ("ixi", "sald", "camcan"))


def demo(threads: int, run_name: str, log: Path) -> float:
    """One demo training with ``threads`` torch threads per site; returns the wall time in seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if run_name == "demo":
        cmd = ["bash", "scripts/demo.sh"]
    else:  # the same fit on the sites the demo generated, under another run name
        cmd = [str(REPO / ".venv" / "bin" / "neurofed"), "simulate", "--roots", ROOTS, "fit", "--config",
               "configs/federated_demo.yaml", "--trainer.run_name", run_name, "--trainer.overwrite", "true"]
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="2", help="other thread counts per site to compare with 1")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results" / "demo")
    args = parser.parse_args()
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    logs = REPO / "results" / "demo_logs"
    logs.mkdir(parents=True, exist_ok=True)
    seconds = {"demo.sh (1 thread per site)": demo(1, "demo", logs / "demo.log")}
    run = REPO / "checkpoints" / "demo"
    shutil.copy(run / "test_metrics.json", results / "test_metrics.json")
    shutil.copy(run / "history.json", results / "history.json")
    pooled = {"1": json.loads((run / "test_metrics.json").read_text())["pooled"]["mae"]}
    for threads in (int(t) for t in args.threads.split(",") if t.strip()):
        name = f"demo_threads{threads}"
        seconds[f"demo fit ({threads} threads per site)"] = demo(threads, name, logs / f"{name}.log")
        pooled[str(threads)] = json.loads((REPO / "checkpoints" / name / "test_metrics.json").read_text())["pooled"]["mae"]
    values = list(pooled.values())
    (results / "threads.json").write_text(json.dumps(
        {"pooled_mae": pooled, "max_difference": max(values) - min(values)}, indent=1) + "\n")
    write_meta(results, [0], seconds={k: round(v, 1) for k, v in seconds.items()})
    print(json.dumps({"pooled_mae": pooled, "seconds": seconds}, indent=1))
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py")], cwd=REPO, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
