"""Where a results file came from: the command, the commit, the seeds and the machine, written beside it.

Every number in README.md and docs/ is rendered from a results file (``benchmarks/report.py``); this is the
record that lets a reader rerun the command that wrote it and compare.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

__all__ = ["REPO", "command_line", "git_commit", "machine", "write_meta"]


def git_commit() -> str:
    """The checked-out commit, with ``+changes`` when tracked source files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks",
                                  "configs", "scripts"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if changed.strip() else "")


def machine() -> dict[str, Any]:
    """What the numbers depend on beyond the code: CPU count, threads, library versions."""
    import numpy
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def command_line(argv: list[str] | None = None) -> str:
    """The command that reproduces the results, relative to the repository: ``python benchmarks/x.py --opt value``.

    ``--resume`` and ``--report-only`` are left out: they choose which runs are redone, not what the results are
    (runs are deterministic), and on a fresh clone the command without them redoes everything.
    """
    argv = [a for a in (sys.argv if argv is None else argv) if a not in ("--resume", "--report-only")]
    script = Path(argv[0]).resolve()
    shown = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else argv[0]
    return "python " + " ".join(shlex.quote(a) for a in [shown, *argv[1:]])


def write_meta(folder: Path, seeds: list[int], **extra: Any) -> Path:
    """``folder/meta.json``: command, commit, seeds, date and machine, plus ``extra`` (settings, timings)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"command": command_line(), "commit": git_commit(), "seeds": list(seeds),
            "date": datetime.date.today().isoformat(), "machine": machine(), **extra}
    path = folder / "meta.json"
    path.write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return path
