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
from neurofed.data.registration import REGISTRATION_MODES, register_to_template, template_grid
from neurofed.data.validation import NeurofedDataError

# Bump when the transform chain changes, so old cache entries are not reused.
PIPELINE_VERSION = 1


@dataclass(frozen=True)
class PreprocessConfig:
    """Target grid and intensity normalisation; ``key()`` identifies it in the cache."""

    spacing: float = 2.0
    shape: tuple[int, int, int] = (80, 96, 80)
    intensity: str = "zscore"  # "zscore" over foreground, or "minmax" (0.5-99.5 percentiles -> 0..1)
    registration: str = "none"  # "affine": register to MNI152 and apply its brain mask (registration.py)

    def __post_init__(self) -> None:
        if self.intensity not in ("zscore", "minmax"):
            raise ValueError(f"intensity must be 'zscore' or 'minmax', got {self.intensity!r}")
        if self.registration not in REGISTRATION_MODES:
            raise ValueError(f"registration must be one of {REGISTRATION_MODES}, got {self.registration!r}; "
                             "use 'affine' for raw scans, 'none' for scans already registered to MNI152")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", float(self.spacing))
        if len(self.shape) != 3 or self.spacing <= 0:
            raise ValueError(f"need a positive spacing and a 3D shape, got {self.spacing}, {self.shape}")

    def key(self) -> str:
        settings = asdict(self)
        if settings["registration"] == "none":  # keeps the keys of entries cached before the option existed
            del settings["registration"]
        payload = json.dumps({**settings, "version": PIPELINE_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


PathsLike = str | Path | Sequence[str | Path] | Mapping[str, str | Path]


def as_path_list(paths: PathsLike) -> list[Path]:
    """Normalise one path, a list (T1w first) or a modality->path dict to a list of Paths."""
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    if isinstance(paths, Mapping):
        return [Path(p) for p in paths.values()]
    return [Path(p) for p in paths]


def _scalar_images(files: list[Path], config: PreprocessConfig, notes: list[str] | None) -> list[tio.ScalarImage]:
    volumes = [load_volume(path, notes) for path in files]
    if config.registration == "affine":
        try:
            arrays, affine, _ = register_to_template(volumes, config.spacing, config.shape)
        except RuntimeError as exc:
            raise NeurofedDataError(
                f"{files[0]}: affine registration to MNI152 failed ({exc}); check that the file is a T1w "
                "of a whole head, or register it yourself and set registration: none.",
                reason="registration failed") from exc
        volumes = [(a, affine) for a in arrays]
    return [tio.ScalarImage(tensor=torch.from_numpy(d)[None], affine=a) for d, a in volumes]


def output_affine(path: str | Path, config: PreprocessConfig) -> np.ndarray:
    """RAS affine of ``preprocess``'s output grid for ``path``, from the header alone.

    Follows torchio 1.x: ``ToCanonical``, ``Resample`` (same centre, ``floor`` of the extent) and the
    centred ``CropOrPad``; the input QC uses it to place the template on a cached array without decoding
    the file again. ``tests/data/test_qc.py`` checks it against torchio.
    """
    if config.registration == "affine":
        return template_grid(config.spacing, config.shape)
    import nibabel as nib

    header = nib.load(str(path))
    shape = np.asarray(header.shape[:3])
    ornt = nib.io_orientation(header.affine)
    affine = header.affine @ nib.orientations.inv_ornt_aff(ornt, tuple(shape))
    shape = np.abs(nib.orientations.apply_orientation(np.zeros(tuple(shape), np.int8), ornt).shape)
    old_spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / old_spacing
    centre = affine[:3, :3] @ ((shape - 1) / 2) + affine[:3, 3]
    size = np.floor(shape * old_spacing / config.spacing)
    out = np.eye(4)
    out[:3, :3] = direction * config.spacing
    out[:3, 3] = centre - out[:3, :3] @ ((size - 1) / 2)
    diff = np.asarray(config.shape) - size
    start = np.where(diff > 0, -np.ceil(diff / 2), np.ceil(-diff / 2))
    out[:3, 3] = out[:3, :3] @ start + out[:3, 3]
    return out


def preprocess(
    paths: PathsLike, config: PreprocessConfig | None = None, notes: list[str] | None = None
) -> np.ndarray:
    """Return a float16 array ``[C, D, H, W]`` (C = modalities, first = reference grid).

    Notes on repairs made while loading (NaN background set to 0) are appended to ``notes`` when given.
    """
    config = config or PreprocessConfig()
    files = as_path_list(paths)
    names = [f"m{i}" for i in range(len(files))]
    subject = tio.Subject(dict(zip(names, _scalar_images(files, config, notes))))
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
