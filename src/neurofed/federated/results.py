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

from neurofed.federated.checkpoint_io import atomic_write_text

__all__ = ["HISTORY_FILE", "history_until", "metrics_file", "read_json", "write_json"]

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
