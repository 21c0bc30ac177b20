"""``neurofed federation check``: what each site runs before training, to see what works and what does not.

It reads the federation settings of a training config, then, without loading data or a model: validates
the settings, looks for the secret, reaches the rendezvous (site 0 listens on it), forms the federation
with every peer, runs the handshake (every site proves the secret; the trainer settings of the config are
compared) and prints a table, one line per check. Exit 0 when every check passes, 2 otherwise.

    neurofed federation check --config configs/federated_brain_age.yaml --site_rank 1 --secret_file secret
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import time
from typing import Any

__all__ = ["add_arguments", "run"]

DESCRIPTION = __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1]
USAGE = "neurofed federation check --config CONFIG [--site_rank K] [--secret_file FILE] [overrides]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["check"], help="the only action: check this site's federation")
    parser.add_argument("--config", required=True, help="the training config (its trainer.federation section)")
    for name in ("address", "bind_address", "secret_file"):
        parser.add_argument(f"--{name}", default=None, help=f"override trainer.federation.{name}")
    for name in ("port", "site_rank", "num_sites"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"override trainer.federation.{name}")
    parser.add_argument("--timeout_s", type=float, default=None, help="override trainer.federation.timeout_s")
    parser.add_argument("--insecure", action="store_true", help="allow no secret off loopback")


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    import yaml

    with open(args.config, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    trainer = dict(config.get("trainer") or {})
    federation = dict(trainer.pop("federation", None) or {})
    for key in ("address", "bind_address", "secret_file", "port", "site_rank", "num_sites", "timeout_s"):
        if getattr(args, key) is not None:
            federation[key] = getattr(args, key)
    if args.insecure:
        federation["insecure"] = True
    shared = {"trainer": trainer, "model": config.get("model"),
              "federation": {k: v for k, v in federation.items() if k not in ("site_rank", "secret_file", "bind_address")}}
    return federation, shared


def run(args: argparse.Namespace) -> int:
    from neurofed.federated.config import Federation
    from neurofed.federated.errors import FederationError
    from neurofed.federated.group import FederationGroup
    from neurofed.federated.handshake import handshake

    rows: list[tuple[str, bool, str]] = []

    def report() -> int:
        width = max(len(r[0]) for r in rows)
        print(f"federation check, site {fed_args.get('site_rank', 0)} ({args.config})")
        for name, ok, detail in rows:
            print(f"  {'ok  ' if ok else 'FAIL'}  {name.ljust(width)}  {detail}")
        return 0 if all(ok for _, ok, _ in rows) else 2

    fed_args, shared = _settings(args)
    try:
        fed = Federation(**fed_args)
        rows.append(("settings", True, f"site {fed.site_rank} of {fed.num_sites}, rendezvous {fed.address}:{fed.port}"))
    except (ValueError, TypeError) as e:
        rows.append(("settings", False, str(e).splitlines()[0]))
        return report()
    try:
        secret = fed.require_secret_or_loopback()
        rows.append(("secret", True, "present" if secret else "none (loopback or insecure: sites are not "
                                                              "authenticated)"))
    except FederationError as e:
        rows.append(("secret", False, str(e)))
        return report()
    if fed.site_rank != 0:
        started = time.monotonic()
        while True:
            try:
                socket.create_connection((fed.address, fed.port), timeout=2).close()
                rows.append(("rendezvous", True, f"{fed.address}:{fed.port} reachable"))
                break
            except OSError as e:
                if time.monotonic() - started > fed.timeout_s:
                    rows.append(("rendezvous", False, f"{fed.address}:{fed.port} unreachable ({e}); is site 0 "
                                                      "running its check, and is the port open to this site?"))
                    return report()
                time.sleep(1.0)
    try:
        group = FederationGroup(fed.address, fed.port, fed.site_rank, fed.num_sites, fed.timeout_s, fed.bind_address)
    except FederationError as e:
        rows.append(("peers", False, str(e)))
        return report()
    where = "site 0 listens" if fed.site_rank == 0 else "joined"
    rows.append(("peers", True, f"{where}; all {fed.num_sites} sites formed the gloo group"))
    digest = hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).hexdigest()[:16]
    try:
        handshake(group, secret, {"config (trainer, model, federation)": digest}, None, 0.0)
        rows.append(("secret proven", True, "every site proved the federation secret to every other"))
        rows.append(("settings agree", True, f"same trainer, model and federation settings (sha256 {digest})"))
    except FederationError as e:
        rows.append(("handshake", False, str(e)))
    finally:
        group.close()
    return report()
