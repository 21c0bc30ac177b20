"""neurofed: federated deep learning on brain MRI.

The main classes are importable from the top level; they load lazily so that light commands
(``neurofed synth``) do not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BrainAgeModule": "neurofed.models",
    "SDMTModule": "neurofed.models",
    "SFCN": "neurofed.models",
    "BrainMRIDataModule": "neurofed.data",
    "FederatedTrainer": "neurofed.federated",
    "Federation": "neurofed.federated",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neurofed' has no attribute {name!r}")
