"""Data problems found while indexing or caching a cohort.

Real cohorts always contain a few broken or unlabeled scans. Stopping on the
first one wastes a site's afternoon, silently dropping them hides data loss.
So soft problems are collected as :class:`DataIssue` records in a
:class:`ValidationReport` (counted, logged, optionally fatal with ``strict``),
while problems that make the whole dataset unusable raise
:class:`NeurofedDataError` right away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ISSUE_KINDS: tuple[str, ...] = (
    "missing_image",
    "missing_label",
    "unreadable",
    "duplicate_id",
    "not_in_participants",
    "qc",  # outside the input contract (qc.py): counted, kept unless strict
)


class NeurofedDataError(ValueError):
    """A data problem with a message that names the file and the fix.

    ``reason`` is a short label of the kind of problem ("empty file", "CIFTI-2 file", ...), so that a
    report can count skipped scans by cause instead of listing thousands of messages.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keeps ``reason`` when raised in a worker process
        return (type(self), (str(self), self.reason))


@dataclass(frozen=True)
class DataIssue:
    """One problem with one file or participant, and what to do about it."""

    kind: str
    path: str
    message: str
    hint: str = ""
    reason: str = ""

    def __str__(self) -> str:
        # Messages of NeurofedDataError already start with the path: print it once.
        message = self.message.removeprefix(f"{self.path}: ")
        text = f"[{self.kind}] {self.path}: {message}"
        return f"{text} ({self.hint})" if self.hint else text


@dataclass
class ValidationReport:
    """Issues grouped by kind (``report.issues[kind]`` is a list) plus informational notes."""

    issues: dict[str, list[DataIssue]] = field(
        default_factory=lambda: {kind: [] for kind in ISSUE_KINDS}
    )
    notes: list[str] = field(default_factory=list)
    #: ``"acq=mprage"`` -> subjects that have scans, none of which this filter matches.
    filtered: dict[str, list[str]] = field(default_factory=dict)
    #: Datasets in which the filters matched no scan at all (an error under ``strict``).
    emptied: list[str] = field(default_factory=list)

    def add(
        self, kind: str, path: str | Path, message: str, hint: str = "", reason: str = ""
    ) -> DataIssue:
        if kind not in self.issues:
            raise ValueError(f"unknown issue kind {kind!r}; expected one of {ISSUE_KINDS}")
        issue = DataIssue(kind, str(path), message, hint, reason)
        self.issues[kind].append(issue)
        return issue

    def note(self, text: str) -> None:
        self.notes.append(text)

    def reasons(self) -> dict[str, int]:
        """Counts of what kept scans out, by cause: issue kinds (unreadable split by reason) and filters.

        This is what a site operator needs when nothing is left to train on: "unreadable (empty file): 12"
        says more than a list of twelve paths.
        """
        counts: dict[str, int] = {}
        for issue in self:
            name = f"{issue.kind} ({issue.reason})" if issue.reason else issue.kind
            counts[name] = counts.get(name, 0) + 1
        for text, subjects in self.filtered.items():
            counts[f"no scan matches {text}"] = len(subjects)
        return counts

    def __getitem__(self, kind: str) -> list[DataIssue]:
        return self.issues[kind]

    def __iter__(self):
        for kind in ISSUE_KINDS:
            yield from self.issues[kind]

    def __len__(self) -> int:
        return sum(len(v) for v in self.issues.values())

    def merge(self, other: ValidationReport) -> ValidationReport:
        """Add another report's issues and notes to this one (in place) and return self."""
        for kind, items in other.issues.items():
            self.issues.setdefault(kind, []).extend(items)
        self.notes.extend(other.notes)
        for text, subjects in other.filtered.items():
            self.filtered.setdefault(text, []).extend(subjects)
        self.emptied.extend(other.emptied)
        return self

    @property
    def counts(self) -> dict[str, int]:
        return {kind: len(items) for kind, items in self.issues.items()}

    @property
    def ok(self) -> bool:
        """No issue, and no dataset that the filters emptied."""
        return len(self) == 0 and not self.emptied

    def summary(self, max_per_kind: int = 5) -> str:
        """Readable text: a count per kind and what the filters left out, the first few issues of each, notes."""
        head = "no issues" if len(self) == 0 else "{} issue(s): {}".format(
            len(self), ", ".join(f"{k}={n}" for k, n in self.counts.items() if n))
        if self.emptied:
            head += f"; the filters match no scan at all in {', '.join(self.emptied)}"
        elif self.filtered:
            head += f"; the filters left out {sum(map(len, self.filtered.values()))} subject(s) (notes below)"
        lines = [f"data validation: {head}"]
        if len(self):
            for kind in ISSUE_KINDS:
                items = self.issues[kind]
                for issue in items[:max_per_kind]:
                    lines.append(f"  {issue}")
                if len(items) > max_per_kind:
                    lines.append(f"  ... and {len(items) - max_per_kind} more {kind}")
        lines.extend(f"  note: {text}" for text in self.notes)
        return "\n".join(lines)

    def raise_if_issues(self) -> None:
        """Raise :class:`NeurofedDataError` listing every issue (used by ``strict=True``)."""
        if not self.ok:
            fix = ("change the filters (the notes list the values present)" if self.emptied and not len(self)
                   else "fix or remove these files, or pass strict=False to skip them")
            raise NeurofedDataError(self.summary(max_per_kind=50) + f"\nstrict mode: {fix}.")
