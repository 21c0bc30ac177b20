"""The learning rate across rounds: a linear warm-up, then a cosine or step decay.

Why a schedule over rounds: with a constant learning rate the global model keeps moving by as much in the
last round as in the first, so the pooled validation loss swings from round to round and the "best round"
is partly luck. A decay makes late rounds small steps around a good model (SFCN's own recipe divides the
learning rate by ~3 every 30 epochs); a short warm-up keeps the first aggregations of freshly initialised,
still disagreeing sites small.

The factor depends on the round number alone, so every site sets the same learning rate in the same round
without a message, and a resumed run continues the curve exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from neurofed.federated.errors import SettingsError

__all__ = ["RoundSchedule", "apply_round_lr"]


@dataclass
class RoundSchedule:
    """Learning-rate factor of each round, applied to each parameter group's initial learning rate.

    Args:
        kind: ``"cosine"`` (half a cosine from 1 down to ``final_factor`` over the rounds after the warm-up),
            ``"step"`` (× ``step_factor`` every ``step_rounds`` rounds after the warm-up) or ``"constant"``.
        warmup_rounds: Rounds of linear warm-up: round ``r < warmup_rounds`` (0-based) uses
            ``(r + 1) / (warmup_rounds + 1)`` of the learning rate.
        final_factor: Where the cosine ends (reached just after the last round).
        step_rounds: Rounds between two steps of the step decay.
        step_factor: Factor of each step.
    """

    kind: Literal["cosine", "step", "constant"] = "cosine"
    warmup_rounds: int = 0
    final_factor: float = 0.0
    step_rounds: int = 10
    step_factor: float = 0.3

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "step", "constant"):
            raise SettingsError(f"RoundSchedule: kind must be 'cosine', 'step' or 'constant', got {self.kind!r}")
        if self.warmup_rounds < 0 or self.step_rounds < 1:
            raise SettingsError(f"RoundSchedule: warmup_rounds ({self.warmup_rounds}) must be >= 0 and step_rounds "
                                f"({self.step_rounds}) >= 1")
        if not 0 <= self.final_factor <= 1 or not 0 < self.step_factor <= 1:
            raise SettingsError(f"RoundSchedule: final_factor ({self.final_factor}) must be in [0, 1] and "
                                f"step_factor ({self.step_factor}) in (0, 1]")

    def factor(self, round: int, rounds: int) -> float:
        """Factor of 0-based round ``round`` in a run of ``rounds`` rounds."""
        if round < self.warmup_rounds:
            return (round + 1) / (self.warmup_rounds + 1)
        after = round - self.warmup_rounds
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.step_factor ** (after // self.step_rounds)
        progress = after / max(rounds - self.warmup_rounds, 1)
        return self.final_factor + (1 - self.final_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def apply_round_lr(optimizer: Any, schedule: RoundSchedule, round: int, rounds: int, scale: float,
                   min_lr: float) -> None:
    """Set every group's learning rate to ``initial × factor(round) × scale`` (never below ``min_lr``).

    ``scale`` is the product of the plateau reductions so far, so a reduction on a plateau lowers the rest of
    the curve. The initial learning rate is kept in the group (``initial_lr``, as torch's schedulers do), so
    it travels with the optimizer's state into round checkpoints.
    """
    factor = schedule.factor(round, rounds) * scale
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = max(group["initial_lr"] * factor, min(min_lr, group["initial_lr"]))
