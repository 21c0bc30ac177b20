"""The wire record of a 3-site federation under secure aggregation: every payload one site sends.

Three site processes (toy regressor, loopback gloo) run ``fit`` for one round and ``test`` under
``SecureAggregation(FedAvg())``; site 0's group records each payload's kind, dtype, shape, bytes and the
collective that carried it. A payload carried by a sum reaches the others only summed over all sites
(and, masked, not even as the first chunk of gloo's ring); one carried by a gather or a broadcast reaches
every site as this site's own. The table is printed and written to ``--out``.

    python benchmarks/secagg_wire_record.py --out docs/results/privacy/secagg_wire_record.md
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "federated"))  # the toy model and data

WHAT = {
    "handshake": "handshake: nonces, coin commitments and keys; signatures; verdicts; fingerprint digests; "
                 "resume round, declared count (-1) and coin; then the signature over the secure-aggregation keys",
    "public_key": "X25519 public key for the pairwise masks",
    "masked_statistics": "statistic + masks (label stats, example count, loss sum, metric sums)",
    "parameters": "site 0's initial weights (the common starting point)",
    "masked_parameters": "weighted update + masks",
    "round_mac": "round check: hash of the result + Ed25519 signature",
    "site_name": "the site's dataset name (32 bytes)",
}


class PhaseRecorder:
    """Round hooks that tell the recording group which phase the federation is in."""

    def __init__(self, group) -> None:
        self.group = group

    def on_round_start(self, trainer, round):
        self.group.phase = f"round {round + 1}"

    def on_fit_end(self, trainer):
        self.group.phase = "test"


def _site(rank: int, port: int, out: str) -> None:
    import lightning as L
    from federated_toys import ToyRegressor, site_data

    from neurofed.federated import FedAvg, FederatedTrainer, Federation, SecureAggregation
    from neurofed.federated.group import FederationGroup, RecordingGroup

    class Recording(RecordingGroup):
        phase = "opening"

        def _record(self, kind, t):
            super()._record(kind, t)
            self.rows.append([self.phase, kind, str(t.dtype).replace("torch.", ""), list(t.shape),
                              t.numel() * t.element_size()])

    torch.set_num_threads(1)
    L.seed_everything(rank)
    group = Recording(FederationGroup("127.0.0.1", port, rank, 3, timeout_s=120))
    group.rows = []
    trainer = FederatedTrainer(rounds=1, strategy=SecureAggregation(FedAvg()), accelerator="cpu", logger=False,
                               enable_progress_bar=False, default_root_dir=out, run_name=f"site{rank}",
                               federation=Federation(port=port, site_rank=rank, num_sites=3, timeout_s=120),
                               callbacks=[PhaseRecorder(group)])
    trainer.group = group
    trainer.fit(ToyRegressor(bn=False), site_data(rank))
    trainer.test(ToyRegressor(bn=False), site_data(rank), ckpt_path="best")
    trainer.close()
    rows = [row + [op] for row, op in zip(group.rows, group.ops)]
    Path(out, f"wire{rank}.json").write_text(json.dumps(rows))


def table(rows: list[list]) -> str:
    lines = ["| # | phase | kind | dtype | shape | bytes | collective | reaches the others |",
             "|---|---|---|---|---|---|---|---|"]
    for i, (phase, kind, dtype, shape, size, op) in enumerate(rows, start=1):
        reach = "summed over all sites (masked)" if op == "sum" else "individual (this site's own)"
        lines.append(f"| {i} | {phase} | {kind} | {dtype} | {tuple(shape)} | {size} | {op} | {reach} |")
    individual = sum(r[4] for r in rows if r[5] != "sum")
    summed = sum(r[4] for r in rows if r[5] == "sum")
    lines.append(f"\nTotal sent by site 0: {individual + summed} bytes, {individual} individual "
                 f"(handshake, keys, names, round checks, initial weights) and {summed} only ever summed.")
    lines.append("\nKinds: " + "; ".join(f"**{k}**: {v}" for k, v in WHAT.items() if any(r[1] == k for r in rows)) + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="markdown file to write the table to")
    args = parser.parse_args()
    from neurofed.federated.simulate import free_port

    with tempfile.TemporaryDirectory() as folder:
        ctx, port = mp.get_context("spawn"), free_port()
        procs = [ctx.Process(target=_site, args=(k, port, folder)) for k in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(600)
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"a site failed: exit codes {[p.exitcode for p in procs]}")
        rows = json.loads(Path(folder, "wire0.json").read_text())
    text = ("# Wire record of a 3-site round under secure aggregation\n\nWritten by `python benchmarks/"
            "secagg_wire_record.py --out docs/results/privacy/secagg_wire_record.md` (site 0; one fit round and "
            "test, `SecureAggregation(FedAvg())`, toy regressor: 118 aggregated values).\n\n" + table(rows) + "\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
