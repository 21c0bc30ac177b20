"""Fixtures of the federated tests; the toy model and data live in federated_toys.py (importable by child processes)."""

from __future__ import annotations

import pytest


@pytest.fixture
def toy_trainer_kwargs(tmp_path):
    return dict(accelerator="cpu", devices=1, logger=True, default_root_dir=str(tmp_path), enable_progress_bar=False)


