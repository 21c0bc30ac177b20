"""Map-style datasets over preprocessed scans: read from the cache, or pointing into a resident store."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from neurofed.data.bids import ScanRecord
from neurofed.data.cache import VolumeCache
from neurofed.data.preprocessing import PreprocessConfig


class CachedVolumeDataset(Dataset):
    """Items in the batch format of docs/architecture.md; every record must already be cached.

    Cache paths are resolved once here (hashing the files), so ``__getitem__``
    is a memory-mapped read only.
    """

    def __init__(
        self,
        records: Sequence[ScanRecord],
        cache: VolumeCache,
        config: PreprocessConfig,
        augment: bool = False,
    ) -> None:
        self.records = list(records)
        self.augment = augment
        self.files = [cache.path_for(cache.key(r.paths, config)) for r in self.records]
        missing = [str(r.paths["T1w"]) for r, f in zip(self.records, self.files) if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} scan(s) not in the cache (first: {missing[0]}); "
                "run VolumeCache.ensure (or the datamodule's prepare_data) first."
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        array = np.load(self.files[index], mmap_mode="r")
        return record_item(self.records[index], self.augment, image=torch.from_numpy(np.array(array, dtype=np.float16)))


class ResidentVolumeDataset(Dataset):
    """Items like :class:`CachedVolumeDataset`'s with ``"volume"`` (a position in a
    :class:`~neurofed.data.resident.ResidentVolumes` store) in place of ``"image"``.

    Nothing heavy passes through the loader: the data module swaps the position for the scan on the device.
    """

    def __init__(self, records: Sequence[ScanRecord], positions: Sequence[int], augment: bool = False) -> None:
        if len(records) != len(positions):
            raise ValueError(f"{len(records)} records but {len(positions)} store positions")
        self.records = list(records)
        self.positions = [int(p) for p in positions]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        volume = torch.tensor(self.positions[index], dtype=torch.long)
        return record_item(self.records[index], self.augment, volume=volume)


def record_item(record: ScanRecord, augment: bool, **scan: torch.Tensor) -> dict:
    """One item of the batch format (docs/architecture.md): the scan (or its position), label and ids."""
    item = {
        **scan,
        "target": torch.tensor(record.label, dtype=torch.float32),
        "participant_id": record.participant_id,
        "session": record.session,
        "site": record.site,
    }
    if augment:
        item["augment"] = torch.tensor(True)
    return item
