"""Soft-label KL and age bins."""

from __future__ import annotations

import pytest
import torch

from neurofed.models import AgeBins, expected_value, gaussian_soft_labels, soft_label_kl


def _log(probs: torch.Tensor) -> torch.Tensor:
    """Log of a distribution whose far tails underflow to 0, kept finite like a network's log_softmax."""
    return probs.clamp_min(1e-12).log()


def test_bins_default_range() -> None:
    bins = AgeBins()
    assert bins.n_bins == 80
    assert bins.centers[0].item() == pytest.approx(14.5) and bins.centers[-1].item() == pytest.approx(93.5)
    with pytest.raises(ValueError, match="whole number"):
        AgeBins((14, 94), 3.0)


def test_soft_labels_are_distributions_centred_on_age() -> None:
    bins = AgeBins((40, 60), 1.0)
    labels = gaussian_soft_labels(torch.tensor([50.0, 45.3]), bins.centers, sigma=1.0)
    assert labels.shape == (2, 20)
    torch.testing.assert_close(labels.sum(1), torch.ones(2))
    expectation = expected_value(_log(labels), bins.centers)
    torch.testing.assert_close(expectation, torch.tensor([50.0, 45.3]), atol=1e-3, rtol=0)


def test_kl_minimal_at_true_age() -> None:
    bins = AgeBins()
    true_age = torch.tensor([37.0])
    candidates = torch.arange(20.0, 60.0, 0.5)
    losses = torch.stack([
        soft_label_kl(_log(gaussian_soft_labels(torch.tensor([a]), bins.centers)), true_age, bins.centers)
        for a in candidates
    ])
    assert candidates[losses.argmin()].item() == pytest.approx(37.0)
    assert losses.min().item() == pytest.approx(0.0, abs=1e-6)
    assert (losses >= -1e-6).all()


def test_targets_outside_range_are_clipped() -> None:
    bins = AgeBins((40, 60), 1.0)
    low = gaussian_soft_labels(torch.tensor([5.0, 40.0]), bins.centers)
    torch.testing.assert_close(low[0], low[1])
    high = gaussian_soft_labels(torch.tensor([100.0]), bins.centers)
    assert high[0].argmax().item() == bins.n_bins - 1
    assert torch.isfinite(soft_label_kl(torch.full((1, 20), -3.0), torch.tensor([200.0]), bins.centers))


def test_expectation_of_one_hot() -> None:
    bins = AgeBins()
    log_probs = torch.full((2, bins.n_bins), -1e4)
    log_probs[0, 10] = 0.0
    log_probs[1, 70] = 0.0
    torch.testing.assert_close(expected_value(log_probs, bins.centers), torch.tensor([24.5, 84.5]))
