"""One-time preprocessing of a scan into a fixed-size, normalised array.

Run once per file and configuration and cached (see ``cache.py``), so training
epochs never decode NIfTI or resample. torchio is pinned to 1.x (2.x renamed
most transforms).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchio as tio

from neurofed.data.nifti import load_volume
from neurofed.data.validation import NeurofedDataError

# Bump when the transform chain changes, so old cache entries are not reused.
PIPELINE_VERSION = 1


@dataclass(frozen=True)
class PreprocessConfig:
    """Target grid and intensity normalisation; ``key()`` identifies it in the cache."""

    spacing: float = 2.0
    shape: tuple[int, int, int] = (80, 96, 80)
    intensity: str = "zscore"  # "zscore" over foreground, or "minmax" (0.5-99.5 percentiles -> 0..1)

    def __post_init__(self) -> None:
        if self.intensity not in ("zscore", "minmax"):
            raise ValueError(f"intensity must be 'zscore' or 'minmax', got {self.intensity!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", float(self.spacing))
        if len(self.shape) != 3 or self.spacing <= 0:
            raise ValueError(f"need a positive spacing and a 3D shape, got {self.spacing}, {self.shape}")

    def key(self) -> str:
        payload = json.dumps({**asdict(self), "version": PIPELINE_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


PathsLike = str | Path | Sequence[str | Path] | Mapping[str, str | Path]


def as_path_list(paths: PathsLike) -> list[Path]:
    """Normalise one path, a list (T1w first) or a modality->path dict to a list of Paths."""
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    if isinstance(paths, Mapping):
        return [Path(p) for p in paths.values()]
    return [Path(p) for p in paths]


def _scalar_image(path: Path, notes: list[str] | None) -> tio.ScalarImage:
    data, affine = load_volume(path, notes)
    return tio.ScalarImage(tensor=torch.from_numpy(data)[None], affine=affine)


def preprocess(
    paths: PathsLike, config: PreprocessConfig | None = None, notes: list[str] | None = None
) -> np.ndarray:
    """Return a float16 array ``[C, D, H, W]`` (C = modalities, first = reference grid).

    Notes on repairs made while loading (NaN background set to 0) are appended to ``notes`` when given.
    """
    config = config or PreprocessConfig()
    files = as_path_list(paths)
    names = [f"m{i}" for i in range(len(files))]
    subject = tio.Subject({name: _scalar_image(path, notes) for name, path in zip(names, files)})
    steps: list[tio.Transform] = [tio.ToCanonical(), tio.Resample(config.spacing)]
    if len(files) > 1:
        steps.append(tio.Resample(target=names[0], include=names[1:]))
    steps.append(tio.CropOrPad(config.shape))
    if config.intensity == "zscore":
        steps.append(tio.ZNormalization(masking_method=tio.ZNormalization.mean))
    else:
        steps.append(tio.RescaleIntensity(out_min_max=(0.0, 1.0), percentiles=(0.5, 99.5)))
    try:
        out = tio.Compose(steps)(subject)
    except Exception as exc:  # e.g. a blank image cannot be z-scored
        raise NeurofedDataError(
            f"{files[0]}: preprocessing failed ({exc}); check that the scan is a non-empty T1w "
            "and that all modalities overlap in space.",
            reason="preprocessing failed",
        ) from exc
    stacked = np.concatenate([out[name].data.numpy() for name in names], axis=0)
    return np.clip(stacked, -6e4, 6e4).astype(np.float16)
