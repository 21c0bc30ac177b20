"""Reading checkpoints with errors that name the file; writing goes through :mod:`neurofed.atomic`.

Every checkpoint is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers
only. A checkpoint is often a file someone else sent (a collaborator's model for ``--ckpt_path``), and a
full unpickler runs whatever code the file names; this one refuses it with an error naming the file.
"""

from __future__ import annotations

import os
import pickle
import re
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
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused is None:
            raise CheckpointError(f"checkpoint {p} is corrupt or not a torch checkpoint ({_last_line(e)}); delete it "
                                  "or point ckpt_path at an earlier round") from e
        raise CheckpointError(
            f"checkpoint {p} holds objects other than tensors, numbers and containers ({refused.group(1)}), which are "
            "never unpickled: loading them could run code the file names. Load only checkpoints written by neurofed "
            "or Lightning from a source you trust"
        ) from e
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {p} is corrupt or not a torch checkpoint ({type(e).__name__}: {e}); "
            "delete it or point ckpt_path at an earlier round"
        ) from e


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and "pytorch.org" not in line]
    return lines[-1] if lines else type(error).__name__
