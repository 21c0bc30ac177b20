"""Atomic writes survive a crash mid-write; checkpoint reads name the file."""

from __future__ import annotations

import pytest
import torch

from neurofed.atomic import atomic_save, atomic_write_text
from neurofed.federated.checkpoint_io import CheckpointError, load


def test_save_and_load_round_trip_creates_parents(tmp_path) -> None:
    path = tmp_path / "run" / "round_0003.ckpt"
    atomic_save({"w": torch.arange(4), "round": 3}, path)
    obj = load(path)
    assert obj["round"] == 3 and obj["w"].tolist() == [0, 1, 2, 3]
    text = tmp_path / "deep" / "er" / "config.yaml"
    atomic_write_text(text, "a: 1\n")
    assert text.read_text() == "a: 1\n"


def test_crash_mid_write_keeps_previous_file_and_no_temp(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    atomic_save({"round": 1}, path)
    before = path.read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PARTIAL" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"round": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    monkeypatch.undo()
    assert load(path)["round"] == 1


def test_load_names_missing_and_corrupt_files(tmp_path) -> None:
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError, match="nope.ckpt.*does not exist"):
        load(missing)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.ckpt.*corrupt"):
        load(bad)
