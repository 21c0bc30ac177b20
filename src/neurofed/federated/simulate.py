"""Run a federation of N sites as N processes on this machine.

Each site process is the same command a real site would run, with its own data root, site rank and the
shared federation address (loopback here). Each also gets its own ``MASTER_PORT`` for the DDP group inside
the site, so several multi-GPU sites do not collide. Output lines are prefixed with ``[site k]``; if one
site fails the others are terminated (they would otherwise wait for it until their timeout).

    neurofed simulate --roots data/synth/ixi,data/synth/sald fit --config configs/federated_demo.yaml
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence, TextIO

__all__ = ["add_arguments", "free_port", "run", "simulate"]

# Variables that would make a site believe it is one rank of an already-launched job.
_RANK_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def site_command(
    entry: Sequence[str], command: Sequence[str], root: str, site_rank: int, num_sites: int, port: int, address: str
) -> list[str]:
    """The command line of one site."""
    return [
        *entry, *command,
        "--data.root", str(root),
        "--trainer.federation.site_rank", str(site_rank),
        "--trainer.federation.num_sites", str(num_sites),
        "--trainer.federation.port", str(port),
        "--trainer.federation.address", address,
    ]


def _relay(k: int, stream: TextIO, out: TextIO, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(f"[site {k}] {line if line.endswith(chr(10)) else line + chr(10)}")
            out.flush()
    stream.close()


def simulate(
    command: Sequence[str],
    roots: Sequence[str],
    port: int | None = None,
    address: str = "127.0.0.1",
    entry: Sequence[str] | None = None,
    extra_per_site: Sequence[Sequence[str]] | None = None,
    out: TextIO | None = None,
    poll_s: float = 0.2,
) -> int:
    """Start one process per root, wait for all, and return the first non-zero exit code (else 0).

    Args:
        command: Arguments after the entry, e.g. ``["fit", "--config", "brain_age.yaml"]``.
        roots: One data root per site; site ``k`` reads ``roots[k]``.
        port: Federation port (site 0 hosts the rendezvous); a free one if ``None``.
        address: Federation address; loopback for a simulation.
        entry: Program to run; default ``python -m neurofed``.
        extra_per_site: Additional arguments for each site (same length as ``roots``).
        out: Where prefixed output goes; default ``sys.stdout``.
        poll_s: Seconds between checks of the processes.
    """
    if not roots:
        raise ValueError("simulate: give at least one data root (--roots)")
    if extra_per_site is not None and len(extra_per_site) != len(roots):
        raise ValueError(f"simulate: {len(extra_per_site)} extra argument lists for {len(roots)} roots")
    out = out if out is not None else sys.stdout
    entry = list(entry) if entry is not None else [sys.executable, "-m", "neurofed"]
    port = int(port) if port is not None else free_port()
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    for k, root in enumerate(roots):
        argv = site_command(entry, command, root, k, len(roots), port, address)
        if extra_per_site is not None:
            argv += list(extra_per_site[k])
        env = {key: value for key, value in os.environ.items() if key not in _RANK_VARIABLES}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
        # The sites share this machine's cores: without a cap each would start one thread per core and they
        # would spend their time preempting each other. A value the user set is kept.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(roots))))
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
        procs.append(p)
        t = threading.Thread(target=_relay, args=(k, p.stdout, out, lock), daemon=True)
        t.start()
        relays.append(t)

    code = 0
    try:
        while None in [p.poll() for p in procs]:  # a list: poll every process, not just the first running one
            failed = [(k, p.returncode) for k, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                k, code = failed[0]
                with lock:
                    out.write(f"[simulate] site {k} exited with code {code}; stopping the other sites\n")
                break
            time.sleep(poll_s)
    finally:
        _stop(procs)
        for t in relays:
            t.join(timeout=5)
    if code == 0:
        code = next((p.returncode for p in procs if p.returncode != 0), 0)
    return int(code)


def _stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``neurofed simulate``; everything else is passed to every site's command."""
    parser.add_argument(
        "--roots", action="append", required=True,
        help="data roots, one per site, comma-separated (data/a,data/b) or given as repeated --roots",
    )
    parser.add_argument("--port", type=int, default=None, help="federation port (default: a free one)")
    parser.add_argument("--address", default="127.0.0.1", help="federation address (default: loopback)")


def run(args: argparse.Namespace) -> int:
    """Run ``simulate`` from parsed arguments; ``args.passthrough`` is the sites' command (``--`` optional)."""
    command = list(getattr(args, "passthrough", []) or [])
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SystemExit("neurofed simulate: give the command every site runs, e.g. `-- fit --config c.yaml`")
    roots = [root for value in args.roots for root in value.split(",") if root]
    return simulate(command, roots, port=args.port, address=args.address)
