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

from neurofed.atomic import atomic_write, atomic_write_text
from neurofed.data.bids import ScanRecord
from neurofed.data.preprocessing import (
    PathsLike,
    PreprocessConfig,
    as_path_list,
    output_affine,
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


def notes_path(target: Path) -> Path:
    """Where the repairs made while building an entry are kept, so that a cache hit still reports them."""
    return target.with_suffix(".notes.txt")


def qc_path(target: Path) -> Path:
    """Where an entry's input-QC measures are kept: computed once, like the entry itself."""
    return target.with_suffix(".qc.json")


def entry_qc(target: Path, first: Path, config: PreprocessConfig):
    """The QC measures of a cached entry, computed from the cached array on first use."""
    from neurofed.data.qc import QCResult, inspect

    path = qc_path(target)
    if path.is_file():
        return QCResult.from_json(path.read_text())
    result = inspect(np.load(target, mmap_mode="r"), output_affine(first, config))
    atomic_write_text(path, result.to_json())
    return result


def _build_entry(paths: list[Path], config: PreprocessConfig, target: Path) -> list[str]:
    """Preprocess and store atomically (runs in worker processes too); returns the repair notes.

    The notes are written before the entry, so an entry never exists without its notes.
    """
    notes: list[str] = []
    array = preprocess(paths, config, notes)
    if notes:
        atomic_write_text(notes_path(target), "\n".join(notes) + "\n")
    atomic_write(target, lambda fh: np.save(fh, array))
    return notes


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _mp_context() -> multiprocessing.context.BaseContext:
    """fork starts workers in milliseconds; spawn is required once CUDA is initialised."""
    import torch

    if torch.cuda.is_initialized() or "fork" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    return multiprocessing.get_context("fork")


def _failure_key(target: Path, record: ScanRecord) -> tuple[Path, tuple[str, ...]]:
    """Contents and config (the entry) plus the paths: two empty files share an entry, not a message."""
    return target, tuple(str(p) for p in record.paths.values())


class VolumeCache:
    """Maps (file contents, config) to a preprocessed fp16 array on disk."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._digests: dict[tuple[str, int, int], str] = {}
        # Entries that failed to build in this process: a second ensure (prepare_data, then setup) reports
        # them again without decoding the file or warning a second time.
        self._failures: dict[tuple[Path, tuple[str, ...]], NeurofedDataError | OSError] = {}

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
        qc: bool = False,
    ) -> ValidationReport:
        """Fill missing entries; failures become "unreadable" issues, never a crash halfway.

        Returns the report (the one passed in, or a new one), with one note counting the scans repaired
        while loading (NaN background set to 0), on cache hits too. A file that failed earlier in this
        process is reported again without being decoded again. ``strict=True`` raises after the pass if
        any file failed. ``qc=True`` compares every entry with the MNI152 template (``qc.py``; measures
        cached next to the entry) and adds a "qc" issue per scan outside the input contract; scans stay
        in use unless ``strict``.
        """
        report = report if report is not None else ValidationReport()
        records = list(records)
        todo: list[tuple[ScanRecord, Path]] = []
        repairs: list[str] = []
        for record in records:
            try:
                target = self.path_for(self.key(record.paths, config))
            except (NeurofedDataError, OSError) as exc:
                self._fail(report, record, exc)
                continue
            failed = self._failures.get(_failure_key(target, record))
            if failed is not None:
                self._fail(report, record, failed)
            elif not target.is_file():
                todo.append((record, target))
            elif notes_path(target).is_file():
                repairs += notes_path(target).read_text().splitlines()
        if todo:
            bar = tqdm(total=len(todo), desc="preprocessing scans", unit="scan")
            if num_workers > 1:
                ctx = _mp_context()
                with ProcessPoolExecutor(num_workers, mp_context=ctx, initializer=_init_worker) as pool:
                    futures = {
                        pool.submit(_build_entry, as_path_list(r.paths), config, t): (r, t) for r, t in todo
                    }
                    for future in as_completed(futures):
                        record, target = futures[future]
                        try:
                            repairs += future.result()
                        except (NeurofedDataError, OSError) as exc:
                            self._failures[_failure_key(target, record)] = exc
                            self._fail(report, record, exc)
                        bar.update()
            else:
                for record, target in todo:
                    try:
                        repairs += _build_entry(as_path_list(record.paths), config, target)
                    except (NeurofedDataError, OSError) as exc:
                        self._failures[_failure_key(target, record)] = exc
                        self._fail(report, record, exc)
                    bar.update()
            bar.close()
        if repairs:
            for text in repairs:
                log.debug("%s", text)
            report.note(f"{len(repairs)} file(s) with NaN/inf background outside the field of view, set to 0 "
                        f"(first: {repairs[0]})")
        if qc:
            self._check(records, config, report)
        if strict and (report["unreadable"] or report["qc"]):
            report.raise_if_issues()
        return report

    def _check(self, records: Iterable[ScanRecord], config: PreprocessConfig, report: ValidationReport) -> None:
        failed = {issue.path for issue in report["unreadable"]}
        for record in records:
            first = next(iter(record.paths.values()))
            if str(first) in failed:
                continue
            try:
                target = self.path_for(self.key(record.paths, config))
                result = entry_qc(target, Path(first), config)
            except (NeurofedDataError, OSError, ValueError) as exc:
                log.debug("QC skipped for %s: %s", first, exc)
                continue
            problems = result.problems()
            if problems:
                from neurofed.data.qc import FIXES

                report.add("qc", first, f"{first}: outside the input contract: {', '.join(problems)}; "
                           f"{result.describe()}", f"kept; fix: {FIXES[problems[0]]}", reason=problems[0])

    @staticmethod
    def _fail(report: ValidationReport, record: ScanRecord, exc: Exception) -> None:
        """Record the failure; the data module's summary is the one warning a run prints about it."""
        path = next(iter(record.paths.values()))
        report.add("unreadable", path, str(exc), "skipped; fix or remove the file",
                   reason=getattr(exc, "reason", "") or type(exc).__name__)
        log.debug("unreadable scan: %s", exc)
