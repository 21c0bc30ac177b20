"""``neurofed federation keygen | roster | secret | check``: a federation's set-up in a few minutes, checked.

    neurofed federation keygen --name ixi --out ixi.key           # at each site: its key (mode 600) and ixi.pub
    neurofed federation roster --out roster.txt --pub ixi.pub --pub sald.pub --pub camcan.pub  # seat order
    neurofed federation secret --out federation.secret            # once: 32 random bytes (mode 600)
    neurofed federation check --config configs/federated_brain_age.yaml --site_rank 1 \
        --key_file sald.key --roster_file roster.txt --secret_file federation.secret

``keygen`` writes a site's Ed25519 private key and its public line; ``roster`` joins the public lines of
every site, in seat order, into the roster every site holds (like SSH's ``known_hosts``, it travels out of
band — compare its printed fingerprint by phone); ``secret`` writes the rendezvous secret. ``check`` reads
the federation settings of a training config, then, without loading data or a model: validates the
settings, the key, the roster and the secret, reaches the rendezvous (site 0 listens on it), forms the
federation with every peer, runs the handshake (every site signs it with its roster key; the trainer
settings of the config are compared) and prints a table, one line per check. Exit 0 when every check
passes, 2 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]

DESCRIPTION = __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1]
USAGE = ("neurofed federation {keygen --name NAME --out FILE | roster --out FILE --pub PUB... | secret --out FILE | "
         "check --config CONFIG [--site_rank K] [--key_file F --roster_file F --secret_file F] [overrides]}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["keygen", "roster", "secret", "check"],
                        help="keygen: a site's key; roster: every site's public key; secret: the rendezvous secret; "
                             "check: this site's federation")
    parser.add_argument("--pub", action="append", default=[], dest="public_lines",
                        help="roster: a site's .pub file; repeat it for every site, in seat order")
    parser.add_argument("--name", default=None, help="keygen: this site's name in the roster (e.g. ixi)")
    parser.add_argument("--out", default=None, help="keygen, roster, secret: the file to write (never overwritten)")
    parser.add_argument("--config", default=None, help="check: the training config (its trainer.federation section)")
    for name in ("address", "bind_address", "key_file", "roster_file", "secret_file"):
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
    for key in ("address", "bind_address", "key_file", "roster_file", "secret_file", "port", "site_rank", "num_sites",
                "timeout_s"):
        if getattr(args, key) is not None:
            federation[key] = getattr(args, key)
    if args.insecure:
        federation["insecure"] = True
    shared = {"trainer": trainer, "model": config.get("model"),
              "federation": {k: v for k, v in federation.items()
                             if k not in ("site_rank", "secret_file", "key_file", "roster_file", "bind_address")}}
    return federation, shared


def _keygen(args: argparse.Namespace) -> int:
    from neurofed.federated.identity import RosterEntry, SiteIdentity

    if not args.name or not args.out or not args.name.isidentifier():
        raise SystemExit("neurofed federation keygen: give --name (letters, digits, _) and --out KEY_FILE")
    out, pub = Path(args.out), Path(args.out).with_suffix(".pub")
    for path in (out, pub):
        if path.exists():
            raise SystemExit(f"neurofed federation keygen: {path} exists; a key is never overwritten, choose another --out")
    identity = SiteIdentity.ephemeral()
    identity.write(out)
    line = RosterEntry(0, args.name, identity.public).line().split(" ", 1)[1]  # NAME ed25519 KEY (no seat yet)
    pub.write_text(line + "\n", encoding="utf-8")
    print(f"wrote {out} (private, mode 600: keep it at this site) and {pub} (public: send it to whoever writes the "
          f"roster)\n{line}")
    return 0


def _roster(args: argparse.Namespace) -> int:
    from neurofed.federated.identity import Roster

    if not args.out or not args.public_lines:
        raise SystemExit("neurofed federation roster: give --out ROSTER_FILE and --pub for every site's .pub file, in seat order")
    lines = [Path(p).read_text(encoding="utf-8").split("#", 1)[0].strip() for p in args.public_lines]
    roster = Roster.parse("".join(f"{k} {line}\n" for k, line in enumerate(lines)), "the .pub files")
    if Path(args.out).exists():
        raise SystemExit(f"neurofed federation roster: {args.out} exists; it is never overwritten, choose another --out")
    Path(args.out).write_text(roster.text(), encoding="utf-8")
    print(f"wrote {args.out}: {len(roster)} seats ({', '.join(e.name for e in roster.entries)}); give the same file "
          f"to every site and compare its fingerprint out of band: sha256 {roster.digest[:32]}")
    return 0


def _secret(args: argparse.Namespace) -> int:
    if not args.out:
        raise SystemExit("neurofed federation secret: give --out SECRET_FILE")
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    print(f"wrote {args.out} (32 random bytes, mode 600); give it to every site over a private channel")
    return 0


def run(args: argparse.Namespace) -> int:
    action = {"keygen": _keygen, "roster": _roster, "secret": _secret}.get(args.action)
    if action is not None:
        return action(args)
    if not args.config:
        raise SystemExit("neurofed federation check: give --config CONFIG")
    return _check(args)


def _check(args: argparse.Namespace) -> int:
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
        rows.append(("secret", True, "present, private, 32+ bytes" if secret else "none (loopback or insecure: the "
                                                                                 "rendezvous is open)"))
        identity, roster = fed.load_identity()
        if roster is None:
            rows.append(("identity", True, "no roster (loopback or insecure: sites are not authenticated)"))
        elif identity.public != roster.key(fed.site_rank):
            rows.append(("identity", False, f"{fed.key_file} is not the key the roster lists for seat {fed.site_rank} "
                                            f"({roster.name(fed.site_rank)}); use that seat's key_file or fix the roster"))
            # go on: the handshake then fails at every site too, naming this seat
        else:
            rows.append(("identity", True, f"seat {fed.site_rank} is {roster.name(fed.site_rank)}; roster sha256 "
                                           f"{roster.digest[:32]}"))
    except FederationError as e:
        rows.append(("secret and identity", False, str(e)))
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
        group = FederationGroup(fed.address, fed.port, fed.site_rank, fed.num_sites, fed.timeout_s, fed.bind_address,
                                secret=secret)
    except FederationError as e:
        rows.append(("peers", False, str(e)))
        return report()
    where = "site 0 listens" if fed.site_rank == 0 else "joined"
    rows.append(("peers", True, f"{where}; all {fed.num_sites} sites formed the gloo group"))
    digest = hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).hexdigest()[:16]
    try:
        handshake(group, identity, roster, {"config (trainer, model, federation)": digest}, None, None)
        rows.append(("identities proven", True, "every site signed the handshake with its roster key" if roster
                     else "every site signed the handshake (throw-away keys: no roster)"))
        rows.append(("settings agree", True, f"same trainer, model and federation settings (sha256 {digest})"))
    except FederationError as e:
        rows.append(("handshake", False, str(e)))
    finally:
        group.close()
    return report()
