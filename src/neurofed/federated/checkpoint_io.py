"""Crash-safe checkpoint files.

A round checkpoint is rewritten every round; a crash or a full disk during ``torch.save`` must never
leave a truncated file where the last good one was. We write to a temporary file in the same folder,
fsync it and ``os.replace`` it over the target, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "atomic_save", "atomic_write_text", "load"]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or cannot be read."""


def _atomic_write(path: str | os.PathLike, write) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; creates parent folders. Returns the path."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; creates parent folders. Returns the path."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by :func:`atomic_save`, with an error naming the file on failure."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist; check ckpt_path (or the run's checkpoint folder)")
    try:
        return torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {p} is corrupt or not a torch checkpoint ({type(e).__name__}: {e}); "
            "delete it or point ckpt_path at an earlier round"
        ) from e
