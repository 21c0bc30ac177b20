"""What the positions of a strategy's flat vector are: trained weights, or BatchNorm running variances.

A flat vector (:mod:`neurofed.federated.params`) mixes two kinds of numbers. Weights are what gradient
descent moves, so the *direction* of a site's update lives there (update screening compares directions
over the weights only: BatchNorm statistics of sites that see similar scans move alike, and would hide a
flipped weight update). Running variances must stay positive: an average of positive numbers always is,
so a variance at or below zero, in a site's update or in an aggregate, is certain evidence that something
extrapolated instead of averaging — and a model with one cannot be evaluated (its output is NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["VectorLayout"]


@dataclass(frozen=True)
class VectorLayout:
    """Positions of one strategy's flat vector.

    Attributes:
        weights: Boolean mask over the vector: True where the value is a trainable parameter.
        variances: ``(state-dict key, start, end)`` of every aggregated BatchNorm ``running_var``.
    """

    weights: Tensor
    variances: tuple[tuple[str, int, int], ...]

    @classmethod
    def of(cls, model: nn.Module, keys: list[str]) -> VectorLayout:
        """The layout of ``flatten(model.state_dict(), keys)``."""
        state, trainable = model.state_dict(), {name for name, p in model.named_parameters() if p.requires_grad}
        running_vars = {f"{name}.running_var" if name else "running_var" for name, m in model.named_modules()
                        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats}
        mask, variances, offset = [], [], 0
        for key in keys:
            n = state[key].numel()
            mask.append(torch.full((n,), key in trainable, dtype=torch.bool))
            if key in running_vars:
                variances.append((key, offset, offset + n))
            offset += n
        return cls(torch.cat(mask) if mask else torch.zeros(0, dtype=torch.bool), tuple(variances))

    def weight_values(self, vec: Tensor) -> Tensor:
        """The trainable-parameter entries of ``vec``, in order."""
        return vec[self.weights]

    def variance_values(self, vec: Tensor) -> Tensor:
        """Every aggregated running variance of ``vec``, concatenated (empty without BatchNorm)."""
        if not self.variances:
            return vec.new_zeros(0)
        return torch.cat([vec[start:end] for _, start, end in self.variances])

    def nonpositive_variances(self, vec: Tensor) -> str | None:
        """``None`` when every running variance of ``vec`` is finite and positive, else where it is not."""
        positive = [(key, vec[s:e] > 0) for key, s, e in self.variances]
        bad = [(key, int((~ok).sum()), ok.numel()) for key, ok in positive if not bool(ok.all())]
        if not bad:
            return None
        shown = ", ".join(f"{key} ({count} of {total})" for key, count, total in bad[:3])
        more = f" and {len(bad) - 3} more layers" if len(bad) > 3 else ""
        return f"BatchNorm running variances at or below zero, or not finite: {shown}{more}"
