"""Files that are either complete or absent: the one way neurofed writes a file someone else reads.

A crash, a kill or a full disk in the middle of a write must never leave a truncated file where the last
good one was (a checkpoint, a cached volume, a predictions table, ``history.json``). Every writer goes
through :func:`atomic_write`: write a temporary file in the same folder, flush and fsync it, then
``os.replace`` it over the target, which is atomic on POSIX and Windows. The temporary file is removed if
anything fails, and its name starts with a dot and ends in ``.tmp`` so a leftover one is easy to find.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_save", "atomic_write", "atomic_write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(binary_file)`` on a temporary file, then move it over ``path``; returns the path.

    Parent folders are created. On any error the target is left as it was and the temporary file is removed.
    """
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
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))
