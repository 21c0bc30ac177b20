"""FedBN (Li et al. 2021): batch-norm layers stay local.

Sites differ like scanners do (contrast, intensity scale); keeping each site's BatchNorm statistics and
affine parameters local lets them absorb that shift while every other weight is averaged.
"""

from __future__ import annotations

import re

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from neurofed.federated.params import float_keys
from neurofed.federated.strategies.fedavg import FedAvg

__all__ = ["FedBN"]

_BN_NAME = re.compile(r"^(bn\d*|batch_?norm\d*|.*_bn\d*)$", re.IGNORECASE)


def _prefix(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


class FedBN(FedAvg):
    """Weighted averaging of every floating-point entry except those of BatchNorm layers."""

    def bn_prefixes(self, state_dict: dict[str, Tensor], model: nn.Module | None = None) -> set[str]:
        """Module prefixes of BatchNorm layers.

        With a model, by module type (exact). Without one, by name: a module with a ``running_mean``
        entry, or one named like ``bn``, ``bn1``, ``batchnorm``, ``conv_bn``. Generic ``norm`` names are
        not matched because LayerNorm/GroupNorm carry no site statistics and should be shared.
        """
        if model is not None:
            names = {name for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
            prefixes = {p for p in map(_prefix, state_dict) if any(p == n or p.endswith("." + n) for n in names)}
            if prefixes or not names:
                return prefixes
        prefixes = {_prefix(k) for k in state_dict if k.endswith("running_mean")}
        prefixes |= {p for p in map(_prefix, state_dict) if _BN_NAME.match(p.rsplit(".", 1)[-1])}
        return prefixes

    def aggregated_keys(self, state_dict: dict[str, Tensor], model: nn.Module | None = None) -> list[str]:
        local = self.bn_prefixes(state_dict, model)
        return [k for k in float_keys(state_dict) if _prefix(k) not in local]
