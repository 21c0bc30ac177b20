"""BIDS data pipeline: index, validate, preprocess once, cache, load, augment on the GPU.

Names load lazily, so that a light command (``neurofed synth``, ``neurofed status``, ``--help``) that only needs
the validation report or the synthetic sites does not pay for importing torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GPUAugment": "neurofed.data.augmentation",
    "ScanRecord": "neurofed.data.bids",
    "dataset_name": "neurofed.data.bids",
    "index_bids": "neurofed.data.bids",
    "VolumeCache": "neurofed.data.cache",
    "default_cache_dir": "neurofed.data.cache",
    "file_digest": "neurofed.data.cache",
    "BrainMRIDataModule": "neurofed.data.datamodule",
    "CachedVolumeDataset": "neurofed.data.dataset",
    "ResidentVolumeDataset": "neurofed.data.dataset",
    "load_volume": "neurofed.data.nifti",
    "PreprocessConfig": "neurofed.data.preprocessing",
    "preprocess": "neurofed.data.preprocessing",
    "ResidentVolumes": "neurofed.data.resident",
    "split_subjects": "neurofed.data.splits",
    "DataIssue": "neurofed.data.validation",
    "NeurofedDataError": "neurofed.data.validation",
    "ValidationReport": "neurofed.data.validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neurofed.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
