"""Bad values are refused with one line and exit code 2, before any port opens or any training starts."""

from __future__ import annotations

import socket

import pytest
from test_cli import _tiny_args

from neurofed.cli import main


def _messages(stderr: str) -> list[str]:
    """Lines of stderr other than progress bars (preprocessing shows one before some checks run)."""
    return [line for line in stderr.strip().splitlines() if "%|" not in line and line.strip()]


@pytest.mark.parametrize(("override", "expected"), [
    (["--trainer.rounds", "0"], "rounds (0)"),
    (["--trainer.local_epochs", "0"], "local_epochs (0)"),
    (["--data.batch_size", "0"], "batch_size must be at least 1"),
    (["--trainer.federation.num_sites", "0"], "num_sites=0"),
    (["--trainer.federation.timeout_s", "0.5"], "timeout_s must be at least 1 second"),
    (["--trainer.federation.port", "70000"], "port must be in 1..65535"),
    (["--trainer.sites_per_round", "3", "--trainer.federation.num_sites", "2"], "sites_per_round must be in 1..num_sites=2"),
    (["--ckpt_path", "last"], "nothing to resume"),
    (["--trainer.federation.address", "10.1.2.3", "--trainer.federation.num_sites", "2"],
     "reachable from other machines, but secret_file"),
    # loopback address, but listening on every interface: exposed, so authentication is required as well
    (["--trainer.federation.bind_address", "0.0.0.0", "--trainer.federation.num_sites", "2"],
     "listens on 0.0.0.0, reachable from other machines, but secret_file (or $NEUROFED_FEDERATION_SECRET), key_file"),
])
def test_bad_values_are_one_line_and_exit_2(tmp_path, tiny_bids, capsys, monkeypatch, override, expected):
    monkeypatch.delenv("NEUROFED_FEDERATION_SECRET", raising=False)
    opened = []
    real_socket = socket.socket.bind
    monkeypatch.setattr(socket.socket, "bind", lambda self, addr: opened.append(addr) or real_socket(self, addr))
    code = main(["fit", "--config", "configs/brain_age_cpu.yaml", *_tiny_args(tmp_path, [tiny_bids]), *override])
    err = _messages(capsys.readouterr().err)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("neurofed: error: ") and expected in err[0], err
    assert opened == []  # no port was opened


def test_a_missing_checkpoint_for_predict(tmp_path, tiny_bids, capsys):
    code = main(["predict", "--config", "configs/brain_age_cpu.yaml", *_tiny_args(tmp_path, [tiny_bids]),
                 "--ckpt_path", str(tmp_path / "nope.ckpt")])
    err = _messages(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and "nope.ckpt" in err[0] and "does not exist" in err[0]
