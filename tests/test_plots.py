"""Figures: PNGs sized for a paper's column, with units on the axes, titles naming the run, whole-round ticks."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from neurofed import plots
from neurofed.plots import (
    COLUMN_WIDTH,
    DPI,
    figure_title,
    loss_per_round,
    scatter_true_vs_predicted,
)


@pytest.fixture
def drawn(monkeypatch):
    """The axes of every figure saved, read before the figure is closed."""
    axes = []
    real = plots._save

    def keep(fig, path):
        fig.canvas.draw()
        axes.append(fig.axes[0])
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return axes


def test_scatter_per_site(tmp_path, drawn):
    rng = np.random.default_rng(0)
    per_site = {s: (a := rng.uniform(20, 80, 30), a + rng.normal(0, 5, 30)) for s in ("ixi", "sald")}
    path = scatter_true_vs_predicted(per_site, tmp_path / "scatter.png", run="brain_age_fedavg",
                                     strategy="FedAvg", split="test")
    image = mpimg.imread(path)
    assert image.shape[1] == pytest.approx(COLUMN_WIDTH * DPI, rel=0.02)  # one journal column at 300 dpi
    assert image[..., :3].std() > 0.05  # not a blank canvas
    (ax,) = drawn
    assert ax.get_xlabel() == "true age (years)" and ax.get_ylabel() == "predicted age (years)"
    assert ax.get_title() == "age: true vs predicted, test split\nrun brain_age_fedavg, FedAvg"
    assert max(t.get_fontsize() for t in ax.get_xticklabels()) <= 8


def test_scatter_sdmt_units_and_old_call(tmp_path, drawn):
    per_site = {"brussels": ([40.0, 50.0, 60.0], [42.0, 48.0, 61.0])}
    scatter_true_vs_predicted(per_site, tmp_path / "s.png", "sdmt", "my title")
    (ax,) = drawn
    assert ax.get_xlabel() == "true SDMT (points)" and ax.get_title() == "my title"


def test_loss_curves_have_whole_round_ticks(tmp_path, drawn):
    curves = {"federated": [3, 2, 1.5, 1.4, 1.3], "centralized": [3.2, 2.5, 2, 1.8, 1.7]}
    path = loss_per_round(curves, tmp_path / "loss.png", run="r1", strategy="FedProx")
    assert mpimg.imread(path)[..., :3].std() > 0.05
    (ax,) = drawn
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 5]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert ax.get_xlabel() == "round" and ax.get_title() == "validation loss\nrun r1, FedProx"


def test_figure_title_without_run():
    assert figure_title("age", split="val") == "age, val split"
