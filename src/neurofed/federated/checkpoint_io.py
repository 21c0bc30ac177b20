"""Reading checkpoints with errors that name the file; writing goes through :mod:`neurofed.atomic`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["CheckpointError", "load"]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or cannot be read."""


def load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by :func:`neurofed.atomic.atomic_save`, with an error naming the file on failure."""
    import torch  # here, so that reading run folders (``neurofed status``) never imports it

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist; check ckpt_path (or the run's checkpoint folder)")
    try:
        return torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {p} is corrupt or not a torch checkpoint ({type(e).__name__}: {e}); "
            "delete it or point ckpt_path at an earlier round"
        ) from e
