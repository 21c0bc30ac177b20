"""Names and units of the label columns, for axes and data dictionaries.

A figure axis reading "age" or a TSV column without a unit leaves a reviewer guessing; every place that shows
a label asks here. Unknown columns are shown by their name, without a unit.
"""

from __future__ import annotations

#: label column -> (display name, unit as written on an axis, unit as written in a BIDS sidecar)
LABELS: dict[str, tuple[str, str, str]] = {
    "age": ("age", "years", "year"),
    "sdmt": ("SDMT", "points", "points (correct symbol-digit pairs in 90 s)"),
}


def display_name(label: str) -> str:
    """``"sdmt"`` -> ``"SDMT"``; unknown labels unchanged."""
    return LABELS.get(label, (label, "", ""))[0]


def axis_label(label: str, prefix: str = "") -> str:
    """``"age (years)"``, ``"predicted SDMT (points)"``: name and unit, as a figure axis shows them."""
    name, unit, _ = LABELS.get(label, (label, "", ""))
    text = f"{prefix} {name}".strip()
    return f"{text} ({unit})" if unit else text


def sidecar_units(label: str) -> str | None:
    """The ``Units`` of a BIDS data dictionary entry, or None when unknown."""
    return LABELS.get(label, (label, "", ""))[2] or None


def loss_axis(loss: str | None, label: str, what: str = "loss") -> str:
    """``"validation loss (L1, years)"``: a loss curve's axis, with its unit when the loss has one.

    Args:
        loss: ``"l1"`` (in the label's unit), ``"kl"`` (soft-label KL, no unit) or ``None`` (unknown).
        label: The label column.
        what: The quantity, e.g. ``"validation loss"``.
    """
    if loss == "l1":
        unit = LABELS.get(label, (label, "", ""))[1]
        return f"{what} (L1, {unit})" if unit else f"{what} (L1)"
    if loss == "kl":
        return f"{what} (soft-label KL)"
    return what
