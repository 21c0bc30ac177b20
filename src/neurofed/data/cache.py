"""Content-addressed cache of preprocessed volumes (fp16 ``.npy``, memory-mapped).

Decoding a ``.nii.gz`` and resampling costs ~0.3-1 s per volume, reading a
cached fp16 ``.npy`` a few milliseconds. The key is the SHA-256 of the file
*contents* (not the path or mtime) plus the preprocessing config key, so a
renamed file is still a hit and an edited file is a miss. Entries are written
through :func:`neurofed.atomic.atomic_write` (temporary file, then ``os.replace``), so concurrent
workers or an interrupted run never leave a half-written entry.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from neurofed.atomic import atomic_write
from neurofed.data.bids import ScanRecord
from neurofed.data.preprocessing import (
    PathsLike,
    PreprocessConfig,
    as_path_list,
    preprocess,
)
from neurofed.data.validation import NeurofedDataError, ValidationReport

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$NEUROFED_CACHE`` if set, else ``~/.cache/neurofed``."""
    return Path(os.environ.get("NEUROFED_CACHE") or Path.home() / ".cache" / "neurofed")


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's contents, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _build_entry(paths: list[Path], config: PreprocessConfig, target: Path) -> Path:
    """Preprocess and store atomically (runs in worker processes too)."""
    array = preprocess(paths, config)
    return atomic_write(target, lambda fh: np.save(fh, array))


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _mp_context() -> multiprocessing.context.BaseContext:
    """fork starts workers in milliseconds; spawn is required once CUDA is initialised."""
    import torch

    if torch.cuda.is_initialized() or "fork" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    return multiprocessing.get_context("fork")


class VolumeCache:
    """Maps (file contents, config) to a preprocessed fp16 array on disk."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._digests: dict[tuple[str, int, int], str] = {}

    def _digest(self, path: Path) -> str:
        # Hashing is the dominant cost of a lookup; remember it while size and mtime are unchanged.
        stat = path.stat()
        memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if memo not in self._digests:
            self._digests[memo] = file_digest(path)
        return self._digests[memo]

    def key(self, paths: PathsLike, config: PreprocessConfig) -> str:
        files = as_path_list(paths)
        digest = hashlib.sha256(config.key().encode())
        for path in files:
            if not path.is_file():
                raise NeurofedDataError(f"{path}: file not found; re-index the dataset.")
            digest.update(self._digest(path).encode())
        return digest.hexdigest()

    def path_for(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.npy"

    def contains(self, paths: PathsLike, config: PreprocessConfig) -> bool:
        return self.path_for(self.key(paths, config)).is_file()

    def get(self, paths: PathsLike, config: PreprocessConfig) -> np.memmap:
        """Memory-mapped fp16 ``[C, D, H, W]``; preprocesses and stores it on a miss."""
        target = self.path_for(self.key(paths, config))
        if not target.is_file():
            _build_entry(as_path_list(paths), config, target)
        return np.load(target, mmap_mode="r")

    def ensure(
        self,
        records: Iterable[ScanRecord],
        config: PreprocessConfig,
        num_workers: int = 0,
        report: ValidationReport | None = None,
        strict: bool = False,
    ) -> ValidationReport:
        """Fill missing entries; failures become "unreadable" issues, never a crash halfway.

        Returns the report (the one passed in, or a new one). ``strict=True``
        raises after the pass if any file failed.
        """
        report = report if report is not None else ValidationReport()
        todo: list[tuple[ScanRecord, Path]] = []
        for record in records:
            try:
                target = self.path_for(self.key(record.paths, config))
            except (NeurofedDataError, OSError) as exc:
                self._fail(report, record, exc)
                continue
            if not target.is_file():
                todo.append((record, target))
        if todo:
            bar = tqdm(total=len(todo), desc="preprocessing scans", unit="scan")
            if num_workers > 1:
                ctx = _mp_context()
                with ProcessPoolExecutor(num_workers, mp_context=ctx, initializer=_init_worker) as pool:
                    futures = {
                        pool.submit(_build_entry, as_path_list(r.paths), config, t): r for r, t in todo
                    }
                    for future in as_completed(futures):
                        try:
                            future.result()
                        except (NeurofedDataError, OSError) as exc:
                            self._fail(report, futures[future], exc)
                        bar.update()
            else:
                for record, target in todo:
                    try:
                        _build_entry(as_path_list(record.paths), config, target)
                    except (NeurofedDataError, OSError) as exc:
                        self._fail(report, record, exc)
                    bar.update()
            bar.close()
        if strict and report["unreadable"]:
            report.raise_if_issues()
        return report

    @staticmethod
    def _fail(report: ValidationReport, record: ScanRecord, exc: Exception) -> None:
        path = next(iter(record.paths.values()))
        report.add("unreadable", path, str(exc), "skipped; fix or remove the file")
        log.warning("skipping unreadable scan: %s", exc)
