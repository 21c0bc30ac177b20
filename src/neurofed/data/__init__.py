"""BIDS data pipeline: index, validate, preprocess once, cache, load, augment on the GPU."""

from neurofed.data.augmentation import GPUAugment
from neurofed.data.bids import ScanRecord, dataset_name, index_bids
from neurofed.data.cache import VolumeCache, default_cache_dir, file_digest
from neurofed.data.datamodule import BrainMRIDataModule
from neurofed.data.dataset import CachedVolumeDataset, ResidentVolumeDataset
from neurofed.data.nifti import load_volume
from neurofed.data.preprocessing import PreprocessConfig, preprocess
from neurofed.data.resident import ResidentVolumes
from neurofed.data.splits import split_subjects
from neurofed.data.validation import DataIssue, NeurofedDataError, ValidationReport

__all__ = [
    "BrainMRIDataModule",
    "CachedVolumeDataset",
    "DataIssue",
    "GPUAugment",
    "NeurofedDataError",
    "PreprocessConfig",
    "ResidentVolumeDataset",
    "ResidentVolumes",
    "ScanRecord",
    "ValidationReport",
    "VolumeCache",
    "dataset_name",
    "default_cache_dir",
    "file_digest",
    "index_bids",
    "load_volume",
    "preprocess",
    "split_subjects",
]
