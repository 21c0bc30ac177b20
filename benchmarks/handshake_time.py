"""Time the signed handshake and the signed round check at N site processes on loopback (real gloo).

Each site holds an Ed25519 key listed in a roster; after the group forms (a barrier), every site times
``handshake`` (membership, fingerprint, resume and coins, the signed transcript: 2 signatures made and
2·(N−1) checked per site) and ``check_round`` (one signature made, N−1 checked), then site 0 prints the
slowest site's times. The sites share this machine's cores, so the times include waiting for the others.

    python benchmarks/handshake_time.py --sites 3 16
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import torch

from neurofed.federated.group import FederationGroup
from neurofed.federated.handshake import handshake
from neurofed.federated.identity import Roster, RosterEntry, SiteIdentity
from neurofed.federated.integrity import check_round
from neurofed.federated.simulate import free_port

FINGERPRINT = {f"field {i}": f"value {i}" for i in range(14)}


def _site(rank: int, n: int, port: int, folder: str, repeats: int, queue) -> None:
    torch.set_num_threads(1)
    identity = SiteIdentity.load(Path(folder) / f"site{rank}.key")
    roster = Roster.load(Path(folder) / "roster.txt")
    group = FederationGroup("127.0.0.1", port, rank, n, timeout_s=300, secret=b"s" * 32)
    handshakes, checks = [], []
    for _ in range(repeats):
        group.barrier()
        t0 = time.perf_counter()
        opened = handshake(group, identity, roster, FINGERPRINT, None, None)
        handshakes.append(time.perf_counter() - t0)
        group.barrier()
        t0 = time.perf_counter()
        check_round(group, identity, opened.public_keys, opened.session, 0, b"d" * 32)
        checks.append(time.perf_counter() - t0)
    group.barrier()
    group.close()
    queue.put((rank, handshakes, checks))


def measure(n: int, repeats: int) -> tuple[float, float]:
    """(handshake s, round check s): the median over repeats of the slowest site."""
    with tempfile.TemporaryDirectory() as folder:
        ids = [SiteIdentity.ephemeral() for _ in range(n)]
        for k, identity in enumerate(ids):
            identity.write(Path(folder) / f"site{k}.key")
        (Path(folder) / "roster.txt").write_text(Roster([RosterEntry(k, f"site{k}", i.public)
                                                          for k, i in enumerate(ids)]).text())
        ctx = mp.get_context("spawn")
        queue, port = ctx.Queue(), free_port()
        procs = [ctx.Process(target=_site, args=(k, n, port, folder, repeats, queue)) for k in range(n)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=900) for _ in procs]
        for p in procs:
            p.join()
    slowest_handshake = [max(r[1][i] for r in results) for i in range(repeats)]
    slowest_check = [max(r[2][i] for r in results) for i in range(repeats)]
    return statistics.median(slowest_handshake), statistics.median(slowest_check)


def crypto_costs(n: int) -> float:
    """Seconds of Ed25519 work one site does in a handshake: 2 signatures and 2·(n−1) checks."""
    from neurofed.federated.identity import verify

    me = SiteIdentity.ephemeral()
    message = b"m" * 32
    signature = me.sign(message)
    t0 = time.perf_counter()
    for _ in range(100):
        me.sign(message)
        me.sign(message)
        for _ in range(2 * (n - 1)):
            verify(me.public, message, signature)
    return (time.perf_counter() - t0) / 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 16])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("sites | handshake (slowest site, median) | round check | Ed25519 work per site in a handshake")
    for n in args.sites:
        hs, rc = measure(n, args.repeats)
        print(f"{n:>5} | {hs * 1000:>10.1f} ms | {rc * 1000:>8.1f} ms | {crypto_costs(n) * 1e6:>8.0f} µs", flush=True)


if __name__ == "__main__":
    main()
