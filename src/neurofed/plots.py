"""Figures a brain-imaging scientist looks at first: true vs predicted per site, and the loss per round.

Sized for a paper's single column (3.5 in wide, 8-pt text at 300 dpi), with units on the axes and titles that
say which run, strategy and split a figure shows, so a figure taken out of its folder still says what it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from neurofed.data.labels import axis_label, display_name

#: A journal's single-column width, in inches.
COLUMN_WIDTH = 3.5
DPI = 300
_STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 6,
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Write the figure as PNG through the atomic writer and free it: long runs draw many."""
    from neurofed.atomic import atomic_write

    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI))
    _pyplot().close(fig)
    return path


def figure_title(subject: str, run: str | None = None, strategy: str | None = None, split: str | None = None) -> str:
    """``"age, test split"`` over ``"run brain_age_fedavg, FedAvg"``: what, then which run made it."""
    first = f"{subject}, {split} split" if split else subject
    second = ", ".join(part for part in (f"run {run}" if run else "", strategy or "") if part)
    return f"{first}\n{second}" if second else first


def scatter_true_vs_predicted(
    per_site: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    label: str = "age",
    title: str | None = None,
    *,
    run: str | None = None,
    strategy: str | None = None,
    split: str | None = None,
) -> Path:
    """Scatter of true vs predicted values, one colour per site, with the identity line.

    Args:
        per_site: Site name -> ``(true, predicted)``; the legend gives each site's n and MAE.
        path: PNG file to write.
        label: Label column; names the axes with its unit ("age (years)", "SDMT (points)").
        title: Replaces the generated title (label, split, run and strategy).
        run, strategy, split: Named in the generated title when given.
    """
    plt = _pyplot()
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, COLUMN_WIDTH))
        lo, hi = np.inf, -np.inf
        for site, (true, pred) in per_site.items():
            true, pred = np.asarray(true, float), np.asarray(pred, float)
            keep = np.isfinite(true) & np.isfinite(pred)
            if not keep.any():
                continue
            true, pred = true[keep], pred[keep]
            mae = float(np.mean(np.abs(pred - true)))
            ax.scatter(true, pred, s=8, alpha=0.75, linewidths=0, label=f"{site} (n={len(true)}, MAE {mae:.2f})")
            lo, hi = min(lo, true.min(), pred.min()), max(hi, true.max(), pred.max())
        if np.isfinite(lo):
            pad = 0.05 * (hi - lo + 1e-6)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8, label="identity")
            ax.set_xlim(lo - pad, hi + pad)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel(axis_label(label, "true"))
        ax.set_ylabel(axis_label(label, "predicted"))
        ax.set_title(title or figure_title(f"{display_name(label)}: true vs predicted", run, strategy, split))
        ax.legend(loc="upper left", frameon=False)
        ax.set_aspect("equal")
        return _save(fig, path)


def loss_per_round(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    ylabel: str = "validation loss",
    *,
    run: str | None = None,
    strategy: str | None = None,
    title: str | None = None,
) -> Path:
    """Line plot of one or more per-round curves (e.g. federated vs centralized validation loss).

    Rounds are counted from 1 and ticked at whole rounds only.

    Args:
        curves: Curve name -> one value per round.
        path: PNG file to write.
        ylabel: Y axis; say the loss and its unit, e.g. ``"validation loss (MAE, years)"``.
        run, strategy: Named in the generated title when given.
        title: Replaces the generated title.
    """
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 0.72 * COLUMN_WIDTH))
        for name, values in curves.items():
            ax.plot(np.arange(1, len(values) + 1), values, marker="o", ms=2.5, lw=1, label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_title(title or figure_title(ylabel.split(" (")[0], run, strategy))
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(frameon=False)
        return _save(fig, path)
