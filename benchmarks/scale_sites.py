"""How do round time and memory grow with the number of simulated sites on one machine?

Runs 2, 4, 8 and 16 site processes (loopback federation) with a tiny SFCN on 32^3 random volumes and prints
the mean round time (slowest site: train + aggregate + validate), the aggregation time of the slowest site
(pure communication), the peak resident memory per site process and in total, and the wall time including
process start-up. On a 2-core machine the sites share the cores, so round time grows with the site count;
the question this answers is whether the federation itself (rendezvous, all_reduce) adds more than that.

    python benchmarks/scale_sites.py [--sites 2 4 8 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from round_overhead import run_federation  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    cfg = dict(rounds=args.rounds, steps=args.steps, batch=2, val=2, size=32, channels=[4, 8, 8, 8, 8, 8],
               accelerator="cpu", precision="32-true")
    header = (f"{'sites':>5} | {'round s':>8} | {'aggregate s':>11} | {'peak MiB/site':>13} | "
              f"{'peak MiB total':>14} | {'wall s':>7}")
    print(f"tiny SFCN (channels {cfg['channels']}), 32^3, {args.steps} steps x batch 2 per round, "
          f"{args.rounds} rounds, {os.cpu_count()} CPU cores")
    print(header)
    print("-" * len(header), flush=True)
    for n in args.sites:
        with tempfile.TemporaryDirectory() as root:
            histories, _, peaks, wall = run_federation(n, dict(cfg, root=root))
        rounds = range(1, args.rounds) if args.rounds > 1 else range(args.rounds)  # round 0 includes warm-up
        round_s, agg_s = [], []
        for r in rounds:
            rows = [h[r] for h in histories.values()]
            round_s.append(max(h["time/train_s"] + h["time/aggregate_s"] + h["time/validate_s"] for h in rows))
            agg_s.append(min(h["time/aggregate_s"] for h in rows))
        print(f"{n:>5} | {sum(round_s) / len(round_s):>8.2f} | {sum(agg_s) / len(agg_s):>11.4f} | "
              f"{max(peaks):>13.0f} | {sum(peaks):>14.0f} | {wall:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
