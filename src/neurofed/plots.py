"""Figures a brain-imaging scientist looks at first: true vs predicted per site, and the loss per round."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Write the figure as PNG (creating folders) and free it: long runs draw many."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def scatter_true_vs_predicted(
    per_site: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    label: str = "age",
    title: str | None = None,
) -> Path:
    """Scatter of true vs predicted values, one colour per site, with the identity line.

    ``per_site`` maps a site name to ``(true, predicted)``; the legend gives each site's n and MAE.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=120)
    lo, hi = np.inf, -np.inf
    for site, (true, pred) in per_site.items():
        true, pred = np.asarray(true, float), np.asarray(pred, float)
        keep = np.isfinite(true) & np.isfinite(pred)
        if not keep.any():
            continue
        true, pred = true[keep], pred[keep]
        mae = float(np.mean(np.abs(pred - true)))
        ax.scatter(true, pred, s=14, alpha=0.75, label=f"{site} (n={len(true)}, MAE {mae:.2f})")
        lo, hi = min(lo, true.min(), pred.min()), max(hi, true.max(), pred.max())
    if np.isfinite(lo):
        pad = 0.05 * (hi - lo + 1e-6)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="identity")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(f"true {label}")
    ax.set_ylabel(f"predicted {label}")
    ax.set_title(title or f"{label}: true vs predicted")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_aspect("equal")
    return _save(fig, path)


def loss_per_round(curves: Mapping[str, Sequence[float]], path: str | Path, ylabel: str = "validation loss") -> Path:
    """Line plot of one or more per-round curves (e.g. federated vs centralized validation loss)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", ms=3, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
