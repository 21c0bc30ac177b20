"""``neurofed status RUN_DIR``: how far a run got, read from its files alone (no torch, safe while it runs).

A site operator asks three things of a run folder: is it still going, is it any good, and did my site keep
its record. The answers come from ``history.json`` (rounds done, best round, last pooled metrics), the
resolved ``config-fit.yaml`` (rounds planned), ``test_metrics.json`` (the run finished: it is written after
the final test) and each ``site-<k>/`` folder.

    neurofed status checkpoints/demo
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from neurofed.federated.results import HISTORY_FILE, metrics_file, read_json

__all__ = ["DESCRIPTION", "RunStatus", "add_arguments", "read_status", "run"]

DESCRIPTION = """Print a run's progress: rounds done and planned, best round, last pooled metrics, each site's
record, whether the run finished and, if not, the command that resumes it. Reads the run folder only; safe
while the run goes on.

  neurofed status checkpoints/demo
"""
USAGE = "neurofed status RUN_DIR"

#: Files a site keeps under ``site-<k>/``, in the order ``status`` lists them.
SITE_FILES = ("config-fit.yaml", HISTORY_FILE, "committed", "best.ckpt", metrics_file("test"), "loss.png")


class NotARunError(ValueError):
    """The folder given to ``status`` holds no run."""


class RunStatus:
    """What ``status`` reports, read from a run folder (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        history_path = run_dir / HISTORY_FILE
        self.history: list[dict[str, Any]] = read_json(history_path) if history_path.is_file() else []
        self.planned = _planned_rounds(run_dir)
        self.test = read_json(run_dir / metrics_file("test")) if (run_dir / metrics_file("test")).is_file() else None
        self.sites = sorted((p for p in run_dir.glob("site-*") if p.is_dir()), key=_site_number)
        if not (self.history or self.sites or (run_dir / "config-fit.yaml").is_file()):
            raise NotARunError(
                f"{run_dir} is not a neurofed run folder (no history.json, config-fit.yaml or site-<k>/); "
                "give default_root_dir/run_name, e.g. `neurofed status checkpoints/demo`"
            )

    @property
    def best(self) -> dict[str, Any] | None:
        """The committed history row with the lowest pooled validation loss."""
        rows = [r for r in self.history if _finite(r.get("val/pooled/loss")) and not r.get("rejected")]
        return min(rows, key=lambda r: r["val/pooled/loss"]) if rows else None

    def lines(self) -> list[str]:
        done = len(self.history)
        planned = f" of {self.planned}" if self.planned else ""
        state = "finished (tested)" if self.test is not None else ("running or stopped" if done else "not started")
        out = [f"run {self.run_dir}: {done}{planned} rounds done, {state}"]
        if self.best is not None:
            out.append(f"best round {int(self.best['round'])}: pooled val loss {_fmt(self.best['val/pooled/loss'])}")
        if self.history:
            last = self.history[-1]
            out.append(f"last round {int(last['round'])}: pooled val loss {_fmt(last.get('val/pooled/loss'))}, "
                       f"MAE {_fmt(last.get('val/pooled/mae'))}, r {_fmt(last.get('val/pooled/r'))}")
        rejected = [str(int(r["round"])) for r in self.history if r.get("rejected")]
        if rejected:
            out.append(f"not committed (the new global model failed its checks): round {', '.join(rejected)}")
        if self.test is not None and "pooled" in self.test:
            pooled = self.test["pooled"]
            out.append(f"test (pooled): MAE {_fmt(pooled.get('mae'))}, r {_fmt(pooled.get('r'))}, n {_fmt(pooled.get('n'))}")
        for folder in self.sites:
            out.append(f"  {folder.name}: {_site_line(folder)}")
        if self.test is None and any((folder / "committed").is_file() for folder in self.sites):
            out.append(f"resume: {self.resume_command()}")
        return out

    def resume_command(self) -> str:
        """The command that continues this run from its last committed round.

        The saved ``config-fit.yaml`` holds every setting; a federation on loopback (a simulation) is resumed
        with ``simulate`` over the sites' own roots, a real one at each site with its own saved config.
        """
        config = self.run_dir / "config-fit.yaml"
        federation = (_config(config).get("trainer") or {}).get("federation") or {}
        sites = int(federation.get("num_sites") or 1)
        if sites == 1:
            return shlex.join(["neurofed", "fit", "--config", str(config), "--ckpt_path", "last"])
        roots = [str((_config(self.run_dir / f"site-{k}" / "config-fit.yaml").get("data") or {}).get("root", "?"))
                 for k in range(sites)]
        if str(federation.get("address", "127.0.0.1")) in ("127.0.0.1", "localhost", "::1"):
            return shlex.join(["neurofed", "simulate", "--roots", ",".join(roots), "fit", "--config", str(config),
                               "--ckpt_path", "last"])
        site_config = self.run_dir / "site-<k>" / "config-fit.yaml"
        return f"at each site k: neurofed fit --config {site_config} --ckpt_path last"


def _site_line(folder: Path) -> str:
    history_path = folder / HISTORY_FILE
    rounds = read_json(history_path) if history_path.is_file() else []
    last = f"last round {int(rounds[-1]['round'])}" if rounds else "no round recorded"
    present = [name for name in SITE_FILES if (folder / name).is_file()]
    return f"{last}; files: {', '.join(present) if present else 'none'}"


def _config(path: Path) -> dict[str, Any]:
    """A saved ``config-*.yaml`` as a dict (empty when missing or unreadable)."""
    if not path.is_file():
        return {}
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _planned_rounds(run_dir: Path) -> int | None:
    try:
        return int((_config(run_dir / "config-fit.yaml").get("trainer") or {}).get("rounds"))
    except (TypeError, ValueError):
        return None


def _site_number(path: Path) -> int:
    tail = path.name.split("-", 1)[-1]
    return int(tail) if tail.isdigit() else 1 << 30


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if _finite(value) else "n/a"


def read_status(run_dir: str | Path) -> RunStatus:
    """The status of ``run_dir``; :class:`NotARunError` when it is missing or holds no run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotARunError(f"{run_dir} does not exist; give default_root_dir/run_name, e.g. checkpoints/demo")
    return RunStatus(run_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``neurofed status``."""
    parser.add_argument("run_dir", help="the run folder: trainer.default_root_dir/trainer.run_name")


def run(args: argparse.Namespace) -> int:
    """Print the status of ``args.run_dir``; exit code 2 with one line when it is not a run."""
    try:
        status = read_status(args.run_dir)
    except NotARunError as error:
        print(f"neurofed status: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(status.lines()))
    return 0
