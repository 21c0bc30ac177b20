"""Loading one NIfTI volume with checks that explain what is wrong.

nibabel's own errors ("Unexpected end of file", "Error -3 while decompressing")
do not say which of thousands of files failed nor how to fix it; every failure
here raises :class:`NeurofedDataError` naming the file, the remedy and a short
``reason`` that reports count by. CIFTI-2 files (grayordinates, not volumes)
are named as such, since "expected a 3D volume, got shape (1, 1, 1, 1, 120,
91282)" does not tell anyone they passed a ``.dtseries.nii``.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from neurofed.data.nonfinite import zero_nonfinite_background
from neurofed.data.validation import NeurofedDataError

_GZIP_MAGIC = b"\x1f\x8b"
#: File name endings of the CIFTI-2 file types.
CIFTI_EXTENSIONS = (
    ".dtseries.nii", ".dscalar.nii", ".dlabel.nii", ".dconn.nii", ".ptseries.nii", ".pscalar.nii",
    ".plabel.nii", ".pconn.nii", ".pdconn.nii", ".dpconn.nii", ".fibersamp.nii",
)
#: NIfTI intent codes 3000-3099 are CIFTI's (NIFTI_INTENT_CONNECTIVITY_*).
_CIFTI_INTENTS = range(3000, 3100)


def _cifti_error(path: Path, how: str) -> NeurofedDataError:
    return NeurofedDataError(
        f"{path}: CIFTI-2 file ({how}): surface/grayordinate data, not a 3D volume; pass the T1w volume "
        "(sub-X[_ses-Y]_T1w.nii.gz) instead.",
        reason="CIFTI-2 file",
    )


def _cause(exc: BaseException, path: Path) -> str:
    """nibabel's message without the full path, which the message already starts with."""
    return str(exc).replace(str(path), path.name)


def header_version(path: str | Path) -> str:
    """``"NIfTI-1"``, ``"NIfTI-2"`` or ``""`` (unknown), from the header size in the first 4 bytes."""
    try:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rb") as fh:
            head = fh.read(4)
    except (OSError, EOFError, zlib.error):
        return ""
    if len(head) < 4:
        return ""
    sizes = {struct.unpack("<i", head)[0], struct.unpack(">i", head)[0]}
    return "NIfTI-2" if 540 in sizes else "NIfTI-1" if 348 in sizes else ""


def load_volume(path: str | Path, notes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(data, affine)``: a float32 3D array and its 4x4 voxel-to-world affine.

    NaN/inf outside the field of view becomes 0 (see :mod:`neurofed.data.nonfinite`); a note saying how many
    voxels is appended to ``notes`` when given.
    """
    path = Path(path)
    if not path.is_file():
        raise NeurofedDataError(f"{path}: file not found; check the path or re-export the scan.",
                                reason="missing file")
    if path.name.endswith(CIFTI_EXTENSIONS):
        raise _cifti_error(path, f"{''.join(path.suffixes[-2:])} file name")
    if path.stat().st_size == 0:
        raise NeurofedDataError(
            f"{path}: empty (0-byte) file; the copy or conversion was interrupted, re-export the scan.",
            reason="empty file",
        )
    if path.name.endswith(".gz"):
        with open(path, "rb") as fh:
            if fh.read(2) != _GZIP_MAGIC:
                raise NeurofedDataError(
                    f"{path}: corrupt gzip (no gzip header); recompress it with gzip or rename it to .nii.",
                    reason="corrupt gzip",
                )
    try:
        image = nib.load(str(path))
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise NeurofedDataError(f"{path}: corrupt gzip ({_cause(exc, path)}); re-export or recompress the scan.",
                                reason="corrupt gzip") from exc
    except Exception as exc:  # nibabel raises several types for non-NIfTI content
        version = header_version(path)
        kind = f"{version} header, but not readable" if version else "not a readable NIfTI file"
        raise NeurofedDataError(
            f"{path}: {kind} ({_cause(exc, path)}); convert the scan to NIfTI (e.g. dcm2niix).", reason="not NIfTI"
        ) from exc
    if isinstance(image, nib.Cifti2Image):
        raise _cifti_error(path, "CIFTI-2 header extension")
    if int(image.header.get("intent_code", 0)) in _CIFTI_INTENTS:
        raise _cifti_error(path, f"{header_version(path) or 'NIfTI'} header with a CIFTI intent code")
    try:
        data = np.asarray(image.dataobj, dtype=np.float32)
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise NeurofedDataError(f"{path}: corrupt gzip ({_cause(exc, path)}); re-export or recompress the scan.",
                                reason="corrupt gzip") from exc
    except Exception as exc:  # truncated files raise EOFError / ValueError / OSError
        raise NeurofedDataError(
            f"{path}: truncated or damaged NIfTI, image data could not be read ({_cause(exc, path)}); "
            "re-export the scan.",
            reason="truncated",
        ) from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise NeurofedDataError(
            f"{path}: 4D volume with {data.shape[3]} frames: pass a 3D T1w (e.g. extract one frame "
            "with fslroi or nibabel).",
            reason="4D volume",
        )
    if data.ndim != 3:
        raise NeurofedDataError(f"{path}: expected a 3D volume, got shape {data.shape}; pass a 3D T1w.",
                                reason="not 3D")
    data, zeroed = zero_nonfinite_background(data, path)
    if zeroed and notes is not None:
        notes.append(f"{path}: {zeroed} NaN/inf background voxel(s) outside the field of view set to 0")
    return data, np.asarray(image.affine, dtype=np.float64)
