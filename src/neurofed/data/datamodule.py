"""Lightning DataModule: BIDS roots -> cached volumes -> subject-split loaders.

One instance per site in federated runs (or several roots pooled for a
centralised baseline). Indexing and caching happen in ``prepare_data`` (once
per machine, with a progress bar); ``setup`` re-indexes cheaply, splits by
subject per root and builds the datasets. GPU augmentation runs in
``on_after_batch_transfer`` so that it happens on the device, batched.

With ``resident=True`` the site's scans are read from the cache once into device memory
(:mod:`neurofed.data.resident`) and the loaders carry indices only: the configuration for GPUs, where
streaming 9.8 MB scans through loader workers cannot keep up with the training step.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from neurofed.data.augmentation import GPUAugment
from neurofed.data.bids import ScanRecord, dataset_name, index_bids
from neurofed.data.cache import VolumeCache
from neurofed.data.dataset import CachedVolumeDataset, ResidentVolumeDataset
from neurofed.data.preprocessing import PreprocessConfig
from neurofed.data.resident import ResidentVolumes
from neurofed.data.splits import split_subjects
from neurofed.data.validation import NeurofedDataError, ValidationReport

log = logging.getLogger(__name__)


class BrainMRIDataModule(L.LightningDataModule):
    """Brain MRI scans from one or more BIDS roots (one root = one site).

    Args:
        root: One BIDS dataset folder, or a list of them (one site each, pooled for a centralised run).
        label: Column of ``participants.tsv`` to predict (``age``, ``sdmt``, ...). ``predict`` works without
            it (labels n/a); ``fit``, ``validate`` and ``test`` need it.
        modalities: Image suffixes stacked as channels, T1w first (e.g. ``[T1w, FLAIR]``).
        session: Keep only this session (``ses-1`` or ``1``).
        acq: Keep only scans with this ``acq-`` entity.
        run: Keep only scans with this ``run-`` entity (``run-01`` matches ``1``).
        derivatives: Read images from ``derivatives/<name>/`` (e.g. ``fmriprep``); labels still come from
            the raw dataset.
        space: Keep only derivatives in this ``space-`` (e.g. ``MNI152NLin2009cAsym``); without it, a subject
            with several spaces gets the native one and a note says which filter to set.
        desc: Keep only derivatives with this ``desc-`` entity (e.g. ``preproc``).
        res: Keep only derivatives with this ``res-`` entity (e.g. ``2``).
        spacing: Voxel size (mm) scans are resampled to.
        shape: Grid (voxels) scans are cropped or padded to.
        split: Train, validation and test fractions of each site's subjects.
        split_seed: Seed of the subject split and of the training shuffle.
        batch_size: Scans per batch.
        num_workers: Loader and preprocessing worker processes.
        cache_dir: Preprocessed-scan cache; default ``$NEUROFED_CACHE`` or ``~/.cache/neurofed``.
        augment: GPU augmentation of training batches.
        strict: Raise on any data issue instead of skipping the scan.
        max_subjects: Use only the first N subjects of each site (quick trials).
        resident: Hold every scan of the site on the training device (fp16, ``C*D*H*W*2`` bytes each: 9.8 MB
            at 160x192x160) after the first batch, so loaders carry indices and no worker processes run. A
            site that needs more than ``resident_max_fraction`` of the device's free memory is streamed from
            the cache instead, with a warning. Batches, and hence training, are identical either way.
        resident_max_fraction: Largest share of free device memory resident scans may take.
        registration: ``none`` (scans already registered to MNI152 and brain-extracted, the input contract)
            or ``affine``: register each scan to the MNI152 template and apply its brain mask before the
            rest of the preprocessing (:mod:`neurofed.data.registration`; 6–8 s of one CPU core per 1 mm scan,
            once: the result is cached).
        qc: Compare every scan with the MNI152 template (orientation, coverage, skull, similarity;
            :mod:`neurofed.data.qc`) and count the scans outside the input contract in the validation
            report; ``strict`` refuses them. Off by default so that existing ``strict`` runs on other
            templates or phantoms keep working; turn it on for any new cohort.
    """

    def __init__(
        self,
        root: str | list[str],
        label: str = "age",
        modalities: list[str] = ["T1w"],  # noqa: B006 - documented public default, never mutated
        session: str | None = None,
        acq: str | None = None,
        run: str | None = None,
        derivatives: str | None = None,
        space: str | None = None,
        desc: str | None = None,
        res: str | None = None,
        spacing: float = 2.0,
        shape: tuple[int, int, int] = (80, 96, 80),
        split: tuple[float, float, float] = (0.7, 0.15, 0.15),
        split_seed: int = 42,
        batch_size: int = 8,
        num_workers: int = 0,
        cache_dir: str | None = None,
        augment: bool = True,
        strict: bool = False,
        max_subjects: int | None = None,
        resident: bool = False,
        resident_max_fraction: float = 0.5,
        registration: str = "none",
        qc: bool = False,
    ) -> None:
        super().__init__()
        self.roots = [Path(r) for r in ([root] if isinstance(root, (str, Path)) else root)]
        if not self.roots:
            raise ValueError("root must name at least one BIDS folder")
        self.label = label
        self.modalities = ["T1w"] + [m for m in modalities if m != "T1w"]
        self.session, self.acq, self.run, self.derivatives = session, acq, run, derivatives
        self.space, self.desc, self.res = space, desc, res
        self.config = PreprocessConfig(spacing=spacing, shape=tuple(shape), registration=registration)
        self.qc = qc
        self.split = tuple(split)
        self.split_seed = split_seed
        if int(batch_size) < 1:
            from neurofed.errors import SettingsError

            raise SettingsError(f"BrainMRIDataModule: batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache = VolumeCache(cache_dir)
        self.augment = augment
        self.strict = strict
        self.max_subjects = max_subjects
        self.resident = resident
        self.resident_max_fraction = resident_max_fraction
        self.volumes: ResidentVolumes | None = None
        self.augmenter = GPUAugment()
        self.report = ValidationReport()
        self.train_records: list[ScanRecord] = []
        self.val_records: list[ScanRecord] = []
        self.test_records: list[list[ScanRecord]] = [[] for _ in self.roots]
        self.predict_records: list[ScanRecord] = []
        self._datasets: dict[str, object] | None = None
        self._labels_required = False  # whether the datasets were built with labels checked

    @property
    def num_channels(self) -> int:
        return len(self.modalities)

    @property
    def site_names(self) -> list[str]:
        return [dataset_name(r) for r in self.roots]

    def _index(self, require_labels: bool = True) -> tuple[list[ScanRecord], ValidationReport]:
        records: list[ScanRecord] = []
        report = ValidationReport()
        for root, site in zip(self.roots, self.site_names):
            found, site_report = index_bids(
                root, self.modalities, self.label, self.session, self.acq, self.run,
                self.derivatives, strict=self.strict, site=site, space=self.space, desc=self.desc,
                res=self.res, require_labels=require_labels,
            )
            if self.max_subjects is not None:
                keep = set(sorted({r.participant_id for r in found})[: self.max_subjects])
                found = [r for r in found if r.participant_id in keep]
            records.extend(found)
            report.merge(site_report)
        return records, report

    def prepare_data(self) -> None:
        # Caching needs images only; setup checks the labels for the stage that needs them.
        records, report = self._index(require_labels=False)
        self.cache.ensure(records, self.config, self.num_workers, report, strict=self.strict, qc=self.qc)

    def setup(self, stage: str | None = None) -> None:
        """Index, cache, split by subject and build the datasets.

        ``predict`` accepts a dataset without labels. Raises :class:`NeurofedDataError` (one line: the
        roots and what kept scans out, by cause) when the stage has no usable scan, instead of a data
        loader failing on an empty dataset later.
        """
        require_labels = stage != "predict"
        if self._datasets is not None and (self._labels_required or not require_labels):
            self._require_scans(stage)
            return
        records, report = self._index(require_labels)
        self.cache.ensure(records, self.config, self.num_workers, report, strict=self.strict, qc=self.qc)
        bad = {str(issue.path) for issue in report["unreadable"]}
        records = [r for r in records if str(next(iter(r.paths.values()))) not in bad]
        self.predict_records = records
        self.train_records, self.val_records = [], []
        self.test_records = []
        for site in self.site_names:
            site_records = [r for r in records if r.site == site]
            assignment = split_subjects(
                [r.participant_id for r in site_records], self.split, self.split_seed
            )
            labeled = [r for r in site_records if r.has_label]
            self.train_records += [r for r in labeled if assignment[r.participant_id] == "train"]
            self.val_records += [r for r in labeled if assignment[r.participant_id] == "val"]
            self.test_records.append([r for r in labeled if assignment[r.participant_id] == "test"])
        unlabeled = sum(not r.has_label for r in records)
        if unlabeled:
            report.note(f"{unlabeled} scan(s) without {self.label} excluded from train/val/test, "
                        "kept for predict")
        self.report = report
        (log.warning if not report.ok else log.info)("%s", report.summary())
        if self.strict:
            report.raise_if_issues()
        self._n_indexed = len(records) + len(report["unreadable"])
        self._labels_required = require_labels
        if self.resident and records:
            # Scans with identical contents share one cache entry, hence one slot in the store.
            entry = {id(r): self.cache.path_for(self.cache.key(r.paths, self.config)) for r in records}
            files = list(dict.fromkeys(entry.values()))
            slot = {f: i for i, f in enumerate(files)}
            self.volumes = ResidentVolumes(files, self.resident_max_fraction)
            position = {k: slot[f] for k, f in entry.items()}
            make = lambda recs, aug=False: ResidentVolumeDataset(recs, [position[id(r)] for r in recs], aug)  # noqa: E731
        else:
            make = lambda recs, aug=False: CachedVolumeDataset(recs, self.cache, self.config, aug)  # noqa: E731
        self._datasets = {
            "train": make(self.train_records, self.augment),
            "val": make(self.val_records),
            "test": [make(recs) for recs in self.test_records],
            "predict": make(self.predict_records),
        }
        self._require_scans(stage)

    def _require_scans(self, stage: str | None) -> None:
        """Raise the one-line :class:`NeurofedDataError` when ``stage`` has nothing to work on."""
        # validate/test may find a site without held-out scans (a tiny site); the federation still runs.
        split = "predict" if stage == "predict" else "train" if stage in ("fit", None) else None
        if split is None:
            return
        records = self.predict_records if split == "predict" else self.train_records
        if records:
            return
        what = "training " if split == "train" else ""
        causes = ", ".join(f"{k}: {n}" for k, n in self.report.reasons().items() if n)
        causes = causes or "no sub-*/anat/*_T1w.nii[.gz] found"
        roots = ", ".join(str(r) for r in self.roots)
        fix = "fix or replace the files the data validation summary lists"
        if self.report.filtered:
            fix = f"change {', '.join(self.report.filtered)} (the notes above list the values present) or {fix}"
        raise NeurofedDataError(
            f"{roots}: no usable {what}scans ({len(self.predict_records)} of {self._n_indexed} indexed scan(s) "
            f"readable; {causes}); {fix}, or point --data.root at another dataset."
        )

    def _require(self, name: str):
        if self._datasets is None:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[name])
        return self._datasets[name]

    def _loader(self, dataset, shuffle: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.split_seed) if shuffle else None
        # Resident items are a few numbers: worker processes would only add latency. Pinned memory stays:
        # a copy from pageable memory to the GPU waits for all queued work, even for a few bytes.
        workers = 0 if isinstance(dataset, ResidentVolumeDataset) else self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            # A trailing training batch of one scan breaks BatchNorm (one value per channel); the shuffle
            # changes which scans fall off each epoch, so none is left out for good.
            drop_last=shuffle and len(dataset) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._require("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require("val"))

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self._loader(ds) for ds in self._require("test")]
        return loaders[0] if len(loaders) == 1 else loaders

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._require("predict"))

    def train_target_stats(self) -> tuple[float, int, float]:
        """Sum, count and sum of squares of the training labels: aggregates only, safe to share across sites.

        Models centre and scale their output on the pooled mean and SD these give.
        """
        if self._datasets is None:
            self.setup()
        values = [r.label for r in self.train_records if not math.isnan(r.label)]
        return float(sum(values)), len(values), float(sum(v * v for v in values))

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        """On the device: swap resident positions for their scans, then augment batches carrying "augment"."""
        if not isinstance(batch, dict) or not ("volume" in batch or "augment" in batch):
            return batch
        batch = dict(batch)  # the caller's batch keeps its keys
        if "volume" in batch:
            if self.volumes is None:
                raise RuntimeError("batch carries resident positions but this data module holds no scans; "
                                   "was it built with resident=True and set up?")
            batch["image"] = self.volumes.gather(batch.pop("volume"))
        if "augment" not in batch:
            return batch
        mask = torch.as_tensor(batch.pop("augment"), dtype=torch.bool, device=batch["image"].device)
        if self.augment:
            # No host-side look at the mask: reading a device tensor would stall the GPU every step.
            image = batch["image"]
            batch["image"] = torch.where(mask.view(-1, 1, 1, 1, 1), self.augmenter(image), image)
        return batch
