"""Loading one NIfTI volume with checks that explain what is wrong.

nibabel's own errors ("Unexpected end of file", "Error -3 while decompressing")
do not say which of thousands of files failed nor how to fix it; every failure
here raises :class:`NeurofedDataError` naming the file and the remedy.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from neurofed.data.validation import NeurofedDataError

_GZIP_MAGIC = b"\x1f\x8b"


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(data, affine)``: a float32 3D array and its 4x4 voxel-to-world affine."""
    path = Path(path)
    if not path.is_file():
        raise NeurofedDataError(f"{path}: file not found; check the path or re-export the scan.")
    if path.stat().st_size == 0:
        raise NeurofedDataError(
            f"{path}: empty (0-byte) file; the copy or conversion was interrupted, re-export the scan."
        )
    if path.name.endswith(".gz"):
        with open(path, "rb") as fh:
            if fh.read(2) != _GZIP_MAGIC:
                raise NeurofedDataError(
                    f"{path}: corrupt gzip (no gzip header); recompress it with gzip or rename it to .nii."
                )
    try:
        image = nib.load(str(path))
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise NeurofedDataError(f"{path}: corrupt gzip ({exc}); re-export or recompress the scan.") from exc
    except Exception as exc:  # nibabel raises several types for non-NIfTI content
        raise NeurofedDataError(
            f"{path}: not a readable NIfTI file ({exc}); convert the scan to NIfTI (e.g. dcm2niix)."
        ) from exc
    try:
        data = np.asarray(image.dataobj, dtype=np.float32)
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise NeurofedDataError(f"{path}: corrupt gzip ({exc}); re-export or recompress the scan.") from exc
    except Exception as exc:  # truncated files raise EOFError / ValueError / OSError
        raise NeurofedDataError(
            f"{path}: truncated or damaged NIfTI, image data could not be read ({exc}); "
            "re-export the scan."
        ) from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise NeurofedDataError(
            f"{path}: 4D volume with {data.shape[3]} frames: pass a 3D T1w (e.g. extract one frame "
            "with fslroi or nibabel)."
        )
    if data.ndim != 3:
        raise NeurofedDataError(f"{path}: expected a 3D volume, got shape {data.shape}; pass a 3D T1w.")
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - finite.sum())
        raise NeurofedDataError(
            f"{path}: {bad} NaN/inf voxel(s); fix the conversion or replace them (e.g. np.nan_to_num)."
        )
    return data, np.asarray(image.affine, dtype=np.float64)
