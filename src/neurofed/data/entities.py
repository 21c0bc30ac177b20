"""Choosing one scan per subject and session by BIDS entities, and saying why.

A raw dataset may hold several T1w per session (``acq-``, ``run-``); a derivatives pipeline such as fMRIPrep
holds the same scan in several spaces and resolutions (``space-MNI152NLin2009cAsym_res-2_desc-preproc``).
Filters pick among them. Whatever a filter drops, or whatever choice is left to the default order, is
reported: a typo in ``acq`` must not silently empty a dataset, nor native space be picked without a word.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Entities a data module can filter on, in the order they are applied.
FILTER_ENTITIES: tuple[str, ...] = ("acq", "run", "space", "desc", "res")

AnatFile = tuple[Path, str, dict[str, str]]  # path, suffix, entities


def parse_entities(text: str) -> dict[str, str]:
    """``"_ses-1_acq-fast_run-2"`` -> ``{"ses": "1", "acq": "fast", "run": "2"}``."""
    pairs = (item.split("-", 1) for item in text.strip("_").split("_") if item)
    return {key: value for key, value in pairs}


def same_value(key: str, found: str | None, wanted: str) -> bool:
    """Whether an entity value matches a filter; ``run-01`` and ``run-1`` are the same run."""
    if found is None:
        return False
    if key == "run" and found.isdigit() and wanted.isdigit():
        return int(found) == int(wanted)
    return found == wanted


#: The order BIDS writes entities in a file name (those an anat file may carry).
_BIDS_ORDER = ("ses", "task", "acq", "ce", "rec", "run", "echo", "part", "space", "res", "den", "label", "desc")


def describe(entities: dict[str, str]) -> str:
    """``space-MNI_res-2_desc-preproc`` (in BIDS order), or ``no entities``."""
    order = {key: i for i, key in enumerate(_BIDS_ORDER)}
    keys = sorted(entities, key=lambda k: (order.get(k, len(order)), k))
    return "_".join(f"{k}-{entities[k]}" for k in keys) or "no entities"


def preference(entities: dict[str, str]) -> tuple:
    """Sort key whose maximum is the default choice: fewest entities (the plainest acquisition, native
    space in a derivatives folder), then the last run."""
    run = entities.get("run", "")
    other = tuple(sorted((k, v) for k, v in entities.items() if k != "run"))
    return (-len(other), other, int(run) if run.isdigit() else -1, run)


@dataclass
class Choice:
    """The scan picked for one subject/session: one file per modality, and the alternatives it beat."""

    paths: dict[str, Path]
    entities: dict[str, str]
    candidates: list[dict[str, str]]  # entities of every complete candidate, the chosen one included


def filter_files(files: list[AnatFile], filters: dict[str, str]) -> tuple[list[AnatFile], str | None]:
    """Apply the filters in order; return the files kept and the first filter that left nothing, if any.

    Only files whose suffix is T1w count for "left nothing", since every scan needs one.
    """
    kept = files
    for key in FILTER_ENTITIES:
        wanted = filters.get(key)
        if wanted is None:
            continue
        kept = [f for f in kept if same_value(key, f[2].get(key), wanted)]
        if not any(suffix == "T1w" for _, suffix, _ in kept):
            return kept, f"{key}={wanted}"
    return kept, None


def select_scan(files: list[AnatFile], modalities: tuple[str, ...]) -> Choice | None:
    """Pick one set of files (one per modality) sharing the same entities, by :func:`preference`."""
    by_entities: dict[tuple, dict[str, Path]] = {}
    for path, suffix, entities in files:
        if suffix not in modalities:
            continue
        key = tuple(sorted((k, v) for k, v in entities.items() if k != "ses"))
        by_entities.setdefault(key, {})[suffix] = path
    complete = [k for k, mods in by_entities.items() if all(m in mods for m in modalities)]
    if not complete:
        return None
    complete.sort(key=lambda k: preference(dict(k)))
    chosen = complete[-1]
    mods = by_entities[chosen]
    return Choice({m: mods[m] for m in modalities}, dict(chosen), [dict(k) for k in complete])


def choice_note(choice: Choice, where: list[str], set_filters: dict[str, str]) -> str:
    """One note for all subjects/sessions that had the same candidates and got the same choice."""
    shown = ", ".join(where[:5]) + (f" and {len(where) - 5} more" if len(where) > 5 else "")
    keys = {k for c in choice.candidates for k in c}
    differing = [k for k in FILTER_ENTITIES if k in keys and len({c.get(k) for c in choice.candidates}) > 1]
    options = [k for k in differing if k not in set_filters] or list(FILTER_ENTITIES)
    return (
        f"{shown}: {len(choice.candidates)} matching scans ({'; '.join(map(describe, choice.candidates))}), using "
        f"{describe(choice.entities)} (fewest entities, i.e. native space and the plainest acquisition, then "
        f"the last run); set {', '.join(f'{k}=' for k in options)} to choose"
    )
