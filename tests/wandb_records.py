"""Read what an offline W&B run recorded, from its ``.wandb`` file, as W&B's sync would.

The file is a LevelDB-style log (32 KiB blocks of CRC-framed chunks after a 7-byte ``:W&B`` header) of
``wandb.proto`` ``Record`` messages; recent wandb versions no longer ship a Python reader for it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

_BLOCK, _HEADER = 32768, 7
_FULL, _LAST = 1, 4


def records(path: str | Path) -> Iterator[Any]:
    """Every ``Record`` in a run's ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:
            break
        parts += data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(path: str | Path) -> dict[str, Any]:
    """Group, job type, name, config, history rows, summary, artifacts and media files of one offline run."""
    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "artifacts": []}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run |= {"group": record.run.run_group, "job_type": record.run.job_type, "name": record.run.display_name}
            run["config"] |= {_key(i): json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "config":
            run["config"] |= {_key(i): json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            run["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run["summary"] |= {_key(i): json.loads(i.value_json) for i in record.summary.update}
        elif kind == "artifact":
            a = record.artifact
            run["artifacts"].append({"type": a.type, "name": a.name, "aliases": list(a.aliases),
                                     "files": [e.path for e in a.manifest.contents]})
    run["media"] = sorted(str(p.relative_to(Path(path).parent / "files"))
                          for p in (Path(path).parent / "files" / "media").rglob("*") if p.is_file())
    return run
