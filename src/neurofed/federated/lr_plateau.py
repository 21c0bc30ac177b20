"""Learning rate on plateau across rounds: torch's ``ReduceLROnPlateau`` on the pooled validation loss.

Every site steps it with the same pooled loss, so every site reduces its learning rate in the same round.
torch reduces once the count of rounds without a lower loss *exceeds* its patience, so it is given ours
minus one, and ``threshold=0`` makes any lower loss an improvement: the decisions are then those of "after
``patience`` rounds without a strictly lower loss, lr ← max(lr · factor, min_lr)"
(tests/federated/test_plateau.py), except that torch skips a reduction smaller than 1e-8.
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim.lr_scheduler import ReduceLROnPlateau

__all__ = ["PlateauLR", "learning_rates"]


def learning_rates(optimizer: Any) -> list[float]:
    """The learning rate of every parameter group."""
    return [float(g["lr"]) for g in optimizer.param_groups]


class PlateauLR:
    """``ReduceLROnPlateau`` set up as above; :meth:`step` says whether it reduced the learning rate.

    Args:
        optimizer: The site's optimizer.
        patience: Rounds without a lower pooled validation loss before a reduction.
        factor: Multiplier of each reduction.
        min_lr: Learning rates are never reduced below this.
    """

    def __init__(self, optimizer: Any, patience: int, factor: float, min_lr: float) -> None:
        self.optimizer = optimizer
        self.scheduler = ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience - 1,
                                           threshold=0.0, min_lr=min_lr)

    def step(self, val_loss: float) -> bool:
        """Account for one round's pooled validation loss; True when the learning rate was just reduced."""
        before = learning_rates(self.optimizer)
        self.scheduler.step(val_loss if math.isfinite(val_loss) else math.inf)
        return learning_rates(self.optimizer) != before

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)
