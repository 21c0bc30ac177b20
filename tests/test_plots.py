"""Figures are written as PNG files with the expected content size."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np

from neurofed.plots import loss_per_round, scatter_true_vs_predicted


def test_scatter_per_site(tmp_path):
    rng = np.random.default_rng(0)
    per_site = {s: (a := rng.uniform(20, 80, 30), a + rng.normal(0, 5, 30)) for s in ("ixi", "sald")}
    path = scatter_true_vs_predicted(per_site, tmp_path / "scatter.png")
    image = mpimg.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_loss_curves(tmp_path):
    path = loss_per_round({"federated": [3, 2, 1.5], "centralized": [3.2, 2.5, 2]}, tmp_path / "loss.png")
    assert mpimg.imread(path)[..., :3].std() > 0.05
