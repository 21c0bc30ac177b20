"""A round is one commit: resume is bit-identical (shuffle order included) after a stop, a crash at any write
of a commit, or a full disk; leftovers are cleaned; the last committed round always stays intact."""

from __future__ import annotations

import errno
import io
import os

import lightning as L
import pytest
import torch
from federated_toys import ToyRegressor, assert_identical, site_data, state_of

from neurofed.federated import FedAdam, FederatedTrainer, FedMedian, FedProx
from neurofed.federated.checkpoint_io import CheckpointError, load
from neurofed.federated.commit import committed_rounds, round_dir
from neurofed.federated.errors import FederationStorageError
from neurofed.federated.results import read_json


def _fit(tmp_path, run_name: str, rounds: int, strategy_cls=FedAdam, ckpt_path: str | None = None, **data):
    L.seed_everything(0)
    model = ToyRegressor()  # a resumed run starts from a fresh model: everything comes from the checkpoint
    trainer = FederatedTrainer(rounds=rounds, strategy=strategy_cls(), accelerator="cpu", enable_progress_bar=False,
                               default_root_dir=str(tmp_path), run_name=run_name, lr_plateau_patience=1)
    trainer.fit(model, site_data(0, **data), ckpt_path=ckpt_path)
    return model, trainer, trainer.site.optimizer


def _assert_same_run(full, full_trainer, resumed, resumed_trainer) -> None:
    assert_identical(state_of(full), state_of(resumed))
    a, b = full_trainer.site.optimizer.state_dict(), resumed_trainer.site.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        assert_identical(a["state"][i], b["state"][i])
    assert full_trainer.state == resumed_trainer.state


@pytest.mark.parametrize("strategy_cls", [FedAdam, FedProx])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, strategy_cls):
    # generator_seed: the loader shuffles with its own generator, as BrainMRIDataModule's does
    full, full_trainer, _ = _fit(tmp_path, "full", 4, strategy_cls, generator_seed=5)
    _fit(tmp_path, "split", 2, strategy_cls, generator_seed=5)
    torch.manual_seed(12345)  # disturb the global RNG: the resumed run must not depend on it
    resumed, resumed_trainer, _ = _fit(tmp_path, "split", 4, strategy_cls, ckpt_path="last", generator_seed=5)

    assert [h["round"] for h in resumed_trainer.history] == [3.0, 4.0]
    _assert_same_run(full, full_trainer, resumed, resumed_trainer)
    sa, sb = full_trainer.strategy.state_dict(), resumed_trainer.strategy.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k]
    for h_full, h_res in zip(full_trainer.history[2:], resumed_trainer.history):
        assert h_full["val/pooled/loss"] == h_res["val/pooled/loss"] and h_full["train/site/loss"] == h_res["train/site/loss"]

    # what a committed round holds: the shared record and the site's own
    assert committed_rounds(tmp_path / "split", 0) == (4, 3)
    shared = load(round_dir(tmp_path / "split", 0, 4) / "round.pt")
    assert shared["round"] == 4 and set(shared["global"]) <= set(full.state_dict()) and len(shared["history"]) == 4
    local = load(round_dir(tmp_path / "split", 0, 4) / "local.pt")
    assert {"model", "optimizer", "rng", "global_step", "round"} <= set(local)
    assert not round_dir(tmp_path / "split", 0, 2).exists()  # older rounds are pruned, the previous one kept

    history = read_json(tmp_path / "split" / "history.json")
    assert [h["round"] for h in history] == [1.0, 2.0, 3.0, 4.0]
    assert [h["val/pooled/loss"] for h in history] == [h["val/pooled/loss"] for h in full_trainer.history]


def test_the_loaders_own_shuffle_generator_matters_here(tmp_path):
    # Without reseeding the loader's generator the resumed run would replay pass 1's order: show the orders differ.
    _, a, _ = _fit(tmp_path, "a", 2, generator_seed=5)
    assert a.history[0]["train/site/loss"] != a.history[1]["train/site/loss"]


class _Crash(BaseException):
    """A kill: not an Exception, so nothing on the way catches it."""


class _Round3Writes:
    """Wraps ``os.replace`` (how every atomic write ends) and numbers the writes of round 3's commit."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.real, self.crash_at, self.seen, self.active = os.replace, crash_at, [], False

    def __call__(self, src, dst, *args, **kwargs):
        text = str(dst)
        if f"rounds{os.sep}00003" in text:
            self.active = True
        if f"rounds{os.sep}00004" in text:
            self.active = False
        if self.active:
            if len(self.seen) == self.crash_at:
                open(str(src) + ".orphan.tmp", "wb").close()  # what a killed writer leaves behind
                raise _Crash
            self.seen.append(os.path.basename(text))
        return self.real(src, dst, *args, **kwargs)


@pytest.mark.parametrize("crash_at", range(7))
def test_a_crash_at_any_write_of_a_commit_resumes_bit_identical(tmp_path, monkeypatch, crash_at):
    counter = _Round3Writes()
    monkeypatch.setattr(os, "replace", counter)
    full, full_trainer, _ = _fit(tmp_path, "full", 4, generator_seed=5)
    monkeypatch.setattr(os, "replace", counter.real)
    # Round 3 of this seeded run improves, so its commit has every write point, in this order: the round's
    # files, the pointer, the published best models, then the run's history.
    assert counter.seen == ["round.pt", "local.pt", "best.ckpt", "committed", "best.ckpt", "best.ckpt", "history.json"]

    monkeypatch.setattr(os, "replace", _Round3Writes(crash_at))
    with pytest.raises(_Crash):
        _fit(tmp_path, "crash", 4, generator_seed=5)
    monkeypatch.setattr(os, "replace", counter.real)
    assert committed_rounds(tmp_path / "crash", 0)[0] == (3 if crash_at > counter.seen.index("committed") else 2)
    resumed, resumed_trainer, _ = _fit(tmp_path, "crash", 4, ckpt_path="last", generator_seed=5)
    _assert_same_run(full, full_trainer, resumed, resumed_trainer)
    assert [p for p in (tmp_path / "crash").rglob("*") if p.name.endswith(".tmp")] == []
    assert resumed_trainer.best_model_path and load(resumed_trainer.best_model_path)["epoch"] == full_trainer.state.best_round


class FillingDisk(io.RawIOBase):
    """A file on a disk with ``room`` bytes left: writes succeed until the disk is full, then fail with ENOSPC."""

    def __init__(self, inner, room: int) -> None:
        self.inner, self.room = inner, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.inner.write(data)


@pytest.mark.parametrize("where", ["open", "inside torch.save"])
def test_disk_full_is_one_error_keeps_the_last_round_and_resumes(tmp_path, monkeypatch, where):
    full, full_trainer, _ = _fit(tmp_path, "full", 4, generator_seed=5)
    import neurofed.atomic as atomic

    real = atomic.atomic_write

    def full_disk(path, write):
        if "00003" not in str(path):
            return real(path, write)
        if where == "open":
            raise OSError(errno.ENOSPC, "No space left on device")
        # the disk fills while torch.save streams the round: torch raises RuntimeError from its zip writer
        return real(path, lambda f: write(FillingDisk(f, room=600)))

    monkeypatch.setattr(atomic, "atomic_write", full_disk)
    with pytest.raises(FederationStorageError, match=r"no space left in .*rounds to commit round 3 .* MB\); "
                                                     r"round 2 is still the last committed one"):
        _fit(tmp_path, "disk", 4, generator_seed=5)
    monkeypatch.setattr(atomic, "atomic_write", real)
    assert committed_rounds(tmp_path / "disk", 0)[0] == 2 and not round_dir(tmp_path / "disk", 0, 3).exists()
    resumed, resumed_trainer, _ = _fit(tmp_path, "disk", 4, ckpt_path="last", generator_seed=5)
    _assert_same_run(full, full_trainer, resumed, resumed_trainer)


def test_resume_refuses_mismatched_records_and_a_run_without_rounds(tmp_path):
    _fit(tmp_path, "run", 1)
    path = round_dir(tmp_path / "run", 0, 1) / "round.pt"
    shared = load(path)
    shared["round"] = 7
    torch.save(shared, path)
    with pytest.raises(CheckpointError, match="local record is from round 1 but the shared one from round 7"):
        _fit(tmp_path, "run", 3, ckpt_path="last")
    with pytest.raises(CheckpointError, match="nothing to resume"):
        _fit(tmp_path, "empty", 3, ckpt_path="last")


@pytest.mark.parametrize(("strategy_cls", "field", "old", "new"), [
    (FedMedian, "strategy", "FedAdam(", "FedMedian()"),
    (lambda: FedAdam(eta=0.5), "strategy", "eta=0.01", "eta=0.5"),
])
def test_a_resume_that_changes_the_strategy_or_its_settings_is_refused(tmp_path, strategy_cls, field, old, new):
    _fit(tmp_path, "run", 2)  # FedAdam with its defaults
    with pytest.raises(CheckpointError, match=f"was trained with {field} ") as error:
        _fit(tmp_path, "run", 4, strategy_cls, ckpt_path="last")
    assert old in str(error.value) and new in str(error.value) and "--trainer.run_name" in str(error.value)
    assert committed_rounds(tmp_path / "run", 0) == (2, 1)  # nothing of the refused resume was written
    _, trainer, _ = _fit(tmp_path, "run", 3, ckpt_path="last")  # more rounds, same settings: a resume
    assert [h["round"] for h in trainer.history] == [3.0]


def test_a_private_run_may_change_its_dp_sgd_settings_on_resume_but_not_stop_being_private(tmp_path):
    from neurofed.federated.resume import refuse_changed_settings

    run = tmp_path / "run"
    _fit(tmp_path, "run", 2)
    committed = committed_rounds(run, 0)
    stored = load(round_dir(run, 0, committed[0]) / "round.pt")["settings"]
    private = {**stored, "sample-level privacy": "DPSGD(noise_multiplier=0.8)"}
    _rewrite_settings(run, committed[0], private)
    refuse_changed_settings(run, 0, committed, {**private, "sample-level privacy": "DPSGD(noise_multiplier=4.0)"})
    with pytest.raises(CheckpointError, match="was trained with sample-level privacy 'DPSGD"):
        refuse_changed_settings(run, 0, committed, {**private, "sample-level privacy": "None"})
    _rewrite_settings(run, committed[0], stored)
    with pytest.raises(CheckpointError, match="was trained with sample-level privacy 'None'"):
        refuse_changed_settings(run, 0, committed, private)


def _rewrite_settings(run, round, settings):
    path = round_dir(run, 0, round) / "round.pt"
    record = load(path)
    record["settings"] = settings
    torch.save(record, path)
