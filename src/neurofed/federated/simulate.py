"""Run a federation of N sites as N processes on this machine.

Each site process is the same command a real site would run, with its own data root, site rank and the
shared federation address (loopback here). Each also gets its own ``MASTER_PORT`` for the DDP group inside
the site, so several multi-GPU sites do not collide. Output lines are prefixed with ``[site k]``; progress
bars are off in the sites (their carriage returns would run into the other sites' lines), and each site logs
one short line per round instead. When a site fails, the first one to fail (by time, which is the cause; the
others usually fail because it left) is named with its exit code, the others are terminated (they would
otherwise wait for it until their timeout) and ``simulate`` exits with 2.

    neurofed simulate --roots data/synth/ixi,data/synth/sald fit --config configs/federated_demo.yaml
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence, TextIO

__all__ = ["DESCRIPTION", "FAILED", "USAGE", "add_arguments", "free_port", "run", "simulate"]

USAGE = "neurofed simulate --roots ROOT,ROOT,... [--port PORT] [--address ADDRESS] {fit,validate,test,predict} ..."

DESCRIPTION = """Run a federation of N sites as N processes on this machine.

A subcommand must follow the options: the command every site runs (fit, validate, test or predict with
its arguments); each site gets its own --data.root, site rank and the federation's port. Example:

  neurofed simulate --roots data/synth/ixi,data/synth/sald,data/synth/camcan \\
      fit --config configs/federated_demo.yaml --trainer.rounds 3
"""

#: Exit code of ``simulate`` when a site fails (the site's own code is printed).
FAILED = 2

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
    """The command line of one site (no progress bar over rounds unless the command asks for one)."""
    quiet = [] if any("enable_progress_bar" in arg for arg in command) else ["--trainer.enable_progress_bar", "false"]
    return [
        *entry, *command,
        "--data.root", str(root),
        "--trainer.federation.site_rank", str(site_rank),
        "--trainer.federation.num_sites", str(num_sites),
        "--trainer.federation.port", str(port),
        "--trainer.federation.address", address,
        *quiet,
    ]


def _wait(k: int, proc: subprocess.Popen, exits: queue.Queue) -> None:
    exits.put((k, proc.wait()))


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
) -> int:
    """Start one process per root and wait for all; 0 if every site succeeded, else :data:`FAILED` (2).

    Args:
        command: Arguments after the entry, e.g. ``["fit", "--config", "brain_age.yaml"]``.
        roots: One data root per site; site ``k`` reads ``roots[k]``.
        port: Federation port (site 0 hosts the rendezvous); a free one if ``None``.
        address: Federation address; loopback for a simulation.
        entry: Program to run; default ``python -m neurofed``.
        extra_per_site: Additional arguments for each site (same length as ``roots``).
        out: Where prefixed output goes; default ``sys.stdout``.
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
    threads: list[threading.Thread] = []
    exits: queue.Queue = queue.Queue()  # (site, code) in the order the processes exit
    for k, root in enumerate(roots):
        argv = site_command(entry, command, root, k, len(roots), port, address)
        if extra_per_site is not None:
            argv += list(extra_per_site[k])
        env = {key: value for key, value in os.environ.items() if key not in _RANK_VARIABLES}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
        # The sites share this machine's cores: without a cap each would start one thread per core and they
        # would spend their time preempting each other. A value the user set is kept.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(roots))))
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
        procs.append(p)
        threads.append(threading.Thread(target=_relay, args=(k, p.stdout, out, lock), daemon=True))
        threading.Thread(target=_wait, args=(k, p, exits), daemon=True).start()
        threads[-1].start()

    code = 0
    try:
        for _ in procs:
            k, site_code = exits.get()
            if site_code != 0:
                with lock:
                    out.write(f"[simulate] site {k} failed first (exit code {site_code}); stopping the other sites\n")
                    out.flush()
                code = FAILED
                break
    finally:
        _stop(procs)
        for t in threads:
            t.join(timeout=5)
    return code


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
    parser.add_argument("--port", type=int, default=None, help="federation port; None picks a free one")
    parser.add_argument("--address", default="127.0.0.1", help="federation address (loopback on one machine)")


def run(args: argparse.Namespace) -> int:
    """Run ``simulate`` from parsed arguments; ``args.passthrough`` is the sites' command (``--`` optional)."""
    command = list(getattr(args, "passthrough", []) or [])
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SystemExit("neurofed simulate: give the command every site runs, e.g. `-- fit --config c.yaml`")
    roots = [root for value in args.roots for root in value.split(",") if root]
    return simulate(command, roots, port=args.port, address=args.address)
