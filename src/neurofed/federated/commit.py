"""A round is one commit: all of its files become current together, or none do.

Each site writes the round into its own folder, ``site-<k>/rounds/<round>/``: ``round.pt`` (what every
site agrees on: global weights, strategy state, counters, the LR scheduler, the sampling rule and the
history so far), ``local.pt`` (what only this site has: its whole model, optimizer, random states) and,
when the round improved, ``best.ckpt``. Only when every file is written and synced does the site switch
one pointer, ``site-<k>/committed``, atomically: that switch is the commit. Then the best model is
published as ``site-<k>/best.ckpt`` and older round folders are removed, keeping the previous committed
round, because sites commit one after another and a crash can leave them one round apart: the handshake
then resumes from the newest round every site has committed.

A crash at any point leaves the last committed round intact; leftovers (temporary files, a half-written
round folder) are removed at the next start. A full disk becomes one :class:`FederationStorageError`
naming the folder and the space the round needs, whether the write failed in Python (``OSError(ENOSPC)``) or
inside ``torch.save``, which reports it as a ``RuntimeError`` from its zip writer with the ``OSError`` as its
context.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

from neurofed.atomic import atomic_save, atomic_write, atomic_write_text
from neurofed.federated.checkpoint_io import CheckpointError, load
from neurofed.federated.errors import FederationStorageError

__all__ = ["BEST_FILE", "COMMITTED_FILE", "clean_orphans", "commit_round", "committed_rounds", "disk_full", "load_round",
           "forget_rounds", "publish_best", "round_dir", "site_dir"]

COMMITTED_FILE = "committed"
ROUND_FILE = "round.pt"
LOCAL_FILE = "local.pt"
BEST_FILE = "best.ckpt"
ROUNDS = "rounds"


def site_dir(run_dir: str | Path, site_rank: int) -> Path:
    """Folder of one site's files inside a run."""
    return Path(run_dir) / f"site-{site_rank}"


def round_dir(run_dir: str | Path, site_rank: int, round: int) -> Path:
    """Folder of one committed (or being written) round of one site."""
    return site_dir(run_dir, site_rank) / ROUNDS / f"{round:05d}"


def _held_rounds(run_dir: str | Path, site_rank: int) -> list[int]:
    folder = site_dir(run_dir, site_rank) / ROUNDS
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def committed_rounds(run_dir: str | Path, site_rank: int) -> tuple[int, int] | None:
    """(newest committed round, the previous one still held, or -1); ``None`` when nothing was committed."""
    pointer = site_dir(run_dir, site_rank) / COMMITTED_FILE
    if not pointer.is_file():
        return None
    newest = int(pointer.read_text().strip())
    older = [r for r in _held_rounds(run_dir, site_rank) if r < newest]
    return newest, (older[-1] if older else -1)


def load_round(run_dir: str | Path, site_rank: int, round: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shared and local content of a committed round of this site."""
    folder = round_dir(run_dir, site_rank, round)
    if not folder.is_dir():
        raise CheckpointError(f"round {round} is not held in {folder}; resume from a round this site committed")
    return load(folder / ROUND_FILE), load(folder / LOCAL_FILE)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(error: BaseException) -> bool:
    """True when ``error`` or an exception it was raised from is "no space left" (or "quota exceeded").

    ``torch.save`` turns the ``OSError`` of a full disk into ``RuntimeError: [enforce fail at
    inline_container.cc] ...``, keeping the ``OSError`` as ``__context__``; so the whole chain is searched.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20 if folder.is_dir() else 0.0


def commit_round(run_dir: str | Path, site_rank: int, round: int, shared: dict[str, Any], local: dict[str, Any],
                 best: dict[str, Any] | None) -> Path:
    """Write round ``round``'s files, switch the pointer, publish the best model, prune; returns the folder."""
    folder = round_dir(run_dir, site_rank, round)
    previous = committed_rounds(run_dir, site_rank)
    try:
        if folder.exists():  # a half-written attempt at this round: start it over
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        atomic_save(shared, folder / ROUND_FILE)
        atomic_save(local, folder / LOCAL_FILE)
        if best is not None:
            atomic_save(best, folder / BEST_FILE)
        _fsync_dir(folder)
        atomic_write_text(site_dir(run_dir, site_rank) / COMMITTED_FILE, f"{round}\n")  # the commit
    except (OSError, RuntimeError) as e:
        if not disk_full(e):
            raise
        shutil.rmtree(folder, ignore_errors=True)
        needed = _size_mb(round_dir(run_dir, site_rank, previous[0])) if previous else 0.0
        kept = f"round {previous[0]} is still the last committed one" if previous else "no round was committed yet"
        raise FederationStorageError(
            f"no space left in {folder.parent} to commit round {round} (it needs about "
            f"{max(needed, 0.1):.1f} MB); {kept}. Free space there and resume with --ckpt_path last"
        ) from e
    if best is not None:
        try:
            publish_best(run_dir, site_rank, folder / BEST_FILE)
        except (OSError, RuntimeError) as e:
            if not disk_full(e):
                raise
            raise FederationStorageError(
                f"no space left in {site_dir(run_dir, site_rank)} to publish {BEST_FILE} of round {round}; round "
                f"{round} is committed (its {BEST_FILE} is in {folder}). Free space there and resume with --ckpt_path last"
            ) from e
    keep = {round, previous[0]} if previous else {round}
    for r in _held_rounds(run_dir, site_rank):
        if r not in keep:
            shutil.rmtree(round_dir(run_dir, site_rank, r), ignore_errors=True)
    return folder


def publish_best(run_dir: str | Path, site_rank: int, source: Path) -> None:
    """Copy a committed round's ``best.ckpt`` to ``site-<k>/best.ckpt`` (site 0: also the run's), atomically."""
    data = source.read_bytes()
    atomic_write(site_dir(run_dir, site_rank) / BEST_FILE, lambda f: f.write(data))
    if site_rank == 0:
        atomic_write(Path(run_dir) / BEST_FILE, lambda f: f.write(data))


def forget_rounds(run_dir: str | Path, site_rank: int) -> None:
    """Remove this site's committed rounds before a fresh fit replaces the run (the pointer first)."""
    (site_dir(run_dir, site_rank) / COMMITTED_FILE).unlink(missing_ok=True)
    shutil.rmtree(site_dir(run_dir, site_rank) / ROUNDS, ignore_errors=True)


def clean_orphans(run_dir: str | Path, site_rank: int) -> list[Path]:
    """Remove what a killed run left behind: temporary files and round folders newer than the commit."""
    removed: list[Path] = []
    for base in (Path(run_dir), site_dir(run_dir, site_rank)):
        if base.is_dir():
            for tmp in list(base.glob(".*.tmp")) + list((base / ROUNDS).glob("*/.*.tmp")):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    committed = committed_rounds(run_dir, site_rank)
    for r in _held_rounds(run_dir, site_rank):
        if committed is None or r > committed[0]:
            shutil.rmtree(round_dir(run_dir, site_rank, r), ignore_errors=True)
            removed.append(round_dir(run_dir, site_rank, r))
    return removed
