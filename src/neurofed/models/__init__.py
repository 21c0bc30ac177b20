"""Models: the SFCN backbone, soft-label age bins, and the brain-age and SDMT LightningModules."""

from neurofed.models.brain_age import BrainAgeModule
from neurofed.models.losses import AgeBins, expected_value, gaussian_soft_labels, soft_label_kl
from neurofed.models.sdmt import SDMTModule
from neurofed.models.sfcn import SFCN

__all__ = [
    "SFCN",
    "AgeBins",
    "BrainAgeModule",
    "SDMTModule",
    "expected_value",
    "gaussian_soft_labels",
    "soft_label_kl",
]
