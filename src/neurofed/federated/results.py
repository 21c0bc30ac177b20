"""A run's results as JSON files that people and scripts can read without torch.

Metrics are NaN where undefined (r of a constant prediction, say); strict JSON has no NaN, so it is
written as ``null``. Files are replaced atomically: a reader never sees half a file, even while a run
rewrites ``history.json`` after every round.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from neurofed.atomic import atomic_write_text
from neurofed.federated.commit import site_dir

__all__ = [
    "HISTORY_FILE", "RunExistsError", "SiteRecord", "history_until", "metrics_file", "read_json", "refuse_existing_run",
    "site_record_dir", "started_run", "strategy_name", "write_json", "write_site_results",
]

HISTORY_FILE = "history.json"


def metrics_file(stage: str) -> str:
    """``test_metrics.json`` / ``validate_metrics.json``: the table of a ``test()`` / ``validate()`` call."""
    return f"{stage}_metrics.json"


def _strict(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def strategy_name(trainer: Any) -> str:
    """How a run trained, for titles and records: its strategy's class, or "centralized" for one site."""
    return "centralized" if trainer.federation.num_sites == 1 else type(trainer.strategy).__name__


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (NaN and infinities as ``null``), atomically."""
    return atomic_write_text(path, json.dumps(_strict(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    """The content of a file written by :func:`write_json` (``null`` stays ``None``)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def history_until(run_dir: str | Path, round: int) -> list[dict[str, Any]]:
    """The rows of ``run_dir``'s ``history.json`` for rounds ``1..round`` (none when there is no file).

    A resumed run keeps these and appends its own rounds, so the file never holds a round twice.
    """
    path = Path(run_dir) / HISTORY_FILE
    return [h for h in read_json(path) if h["round"] <= round] if path.is_file() else []


# ----------------------------------------------------------------------------------------------------
# A run folder already in use
# ----------------------------------------------------------------------------------------------------
#: Files that exist once a run has committed its first round: the history, and each site's commit pointer.
_STARTED_MARKERS = (HISTORY_FILE,)
_SITE_MARKERS = ("committed", "best.ckpt", HISTORY_FILE)


class RunExistsError(FileExistsError):
    """``fit`` was pointed at a run folder that already holds a run, without resuming or overwriting it."""


def site_record_dir(run_dir: str | Path, site_rank: int) -> Path:
    """``run_dir/site-<k>``: the folder where site ``k`` keeps its own record of a run (and its rounds)."""
    return site_dir(run_dir, site_rank)


def started_run(run_dir: str | Path, site_rank: int) -> Path | None:
    """The first file showing that ``run_dir`` holds a run that got past round 1 at this site, else ``None``.

    Only files written after a round count, never the resolved config: every site of a simulation checks
    the same folder before any of them can finish round 1 (the rendezvous waits for all), so all sites take
    the same decision, and a run that crashed before its first round blocks nothing.
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / name for name in _STARTED_MARKERS]
    candidates += [site_record_dir(run_dir, site_rank) / name for name in _SITE_MARKERS]
    return next((path for path in candidates if path.is_file()), None)


def describe_run(run_dir: str | Path) -> str:
    """``"3 of 15 rounds, best round 2"``-style summary of a run folder (empty when it has no history)."""
    path = Path(run_dir) / HISTORY_FILE
    try:
        rows = read_json(path) if path.is_file() else []
    except (OSError, ValueError):
        return ""
    return f"{len(rows)} round(s) recorded" if rows else ""


def refuse_existing_run(run_dir: str | Path, site_rank: int) -> None:
    """Raise :class:`RunExistsError` naming the existing run and the two ways out, if ``run_dir`` holds one."""
    found = started_run(run_dir, site_rank)
    if found is None:
        return
    what = describe_run(run_dir)
    raise RunExistsError(
        f"run folder {run_dir} already holds a run ({found.name}{', ' + what if what else ''}); "
        "resume it with `--ckpt_path last`, replace it with `--trainer.overwrite true`, "
        "or choose another `--trainer.run_name`"
    )


# ----------------------------------------------------------------------------------------------------
# Every site's own record
# ----------------------------------------------------------------------------------------------------
class SiteRecord:
    """Round-hook callback: each site leader keeps ``site-<k>/history.json`` (its own and the pooled metrics).

    Site 0's run-level ``history.json`` is the federation's view; a hospital that is not site 0 would
    otherwise keep nothing but its CSV log. Rows are rewritten after every round, so the file is complete
    even if the run stops; a resumed run keeps the rows before its checkpoint.
    """

    def __init__(self) -> None:
        self._before: list[dict[str, Any]] = []

    def on_fit_start(self, trainer: Any) -> None:
        self._before = history_until(site_record_dir(trainer.run_dir, trainer.federation.site_rank),
                                     trainer.state.round) if trainer.state.round else []

    def on_round_end(self, trainer: Any, round: int, metrics: dict[str, Any]) -> None:
        if trainer.site.is_leader:
            folder = site_record_dir(trainer.run_dir, trainer.federation.site_rank)
            write_json(folder / HISTORY_FILE, self._before + list(trainer.history))


def write_site_results(run_dir: str | Path, site_rank: int, stage: str, rows: dict[str, dict[str, float]]) -> Path:
    """``site-<k>/<stage>_metrics.json``: the federation's table as this site received it."""
    return write_json(site_record_dir(run_dir, site_rank) / metrics_file(stage), rows)
