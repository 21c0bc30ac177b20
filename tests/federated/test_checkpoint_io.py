"""Checkpoints are read with ``weights_only=True``: a malicious pickle sent as a collaborator's checkpoint
does not run its code, and the error names the file."""

from __future__ import annotations

import pathlib

import lightning as L
import pytest
import torch
from federated_toys import ToyRegressor, site_data

from neurofed.federated import FederatedTrainer
from neurofed.federated.checkpoint_io import CheckpointError


class _Payload:
    """Unpickling this object calls ``Path.touch(marker)``: a stand-in for any code an attacker wants run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_malicious_checkpoint_does_not_run_on_load(tmp_path) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "collaborator.ckpt"
    torch.save({"state_dict": {"head.weight": torch.zeros(1, 4)}, "hyper_parameters": _Payload(marker)}, evil)

    L.seed_everything(0)
    trainer = FederatedTrainer(rounds=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                               default_root_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match=r"collaborator\.ckpt holds objects other than tensors"):
        trainer.test(ToyRegressor(), site_data(0), ckpt_path=str(evil))
    assert not marker.exists()

    torch.load(evil, weights_only=False)  # what loading it used to do: the code runs
    assert marker.exists()


def test_neurofeds_own_checkpoints_load_as_weights_only(tmp_path) -> None:
    L.seed_everything(0)
    trainer = FederatedTrainer(rounds=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                               default_root_dir=str(tmp_path))
    model = ToyRegressor()
    trainer.fit(model, site_data(0))
    for path in sorted(tmp_path.rglob("*.pt")) + sorted(tmp_path.rglob("*.ckpt")):
        torch.load(path, weights_only=True)  # round, local and Lightning files alike
    trainer.test(ToyRegressor(), site_data(0), ckpt_path="best")
    resumed = FederatedTrainer(rounds=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                               default_root_dir=str(tmp_path))
    resumed.fit(ToyRegressor(), site_data(0), ckpt_path="last")
    assert [h["round"] for h in resumed.history] == [3.0]
