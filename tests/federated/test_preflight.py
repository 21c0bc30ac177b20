"""``neurofed federation keygen / roster / secret / check`` at three sites on loopback: the set-up commands,
then a table of what works, exit 0 or 2."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import subprocess
import sys

import pytest
from timeouts import STARTUP_S, scaled

from neurofed.cli import main
from neurofed.federated.identity import Roster, SiteIdentity
from neurofed.federated.simulate import free_port

pytestmark = pytest.mark.slow

NAMES = ["ixi", "sald", "camcan"]


def _neurofed(*args: str) -> tuple[int, str]:
    """The set-up commands in this process (the same entry point as the console script)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(["federation", *args])
    except SystemExit as e:
        return 2, str(e)
    return code, out.getvalue()


def _set_up(tmp_path) -> None:
    for name in NAMES:
        code, out = _neurofed("keygen", "--name", name, "--out", str(tmp_path / f"{name}.key"))
        assert code == 0 and "ed25519" in out, out
    pubs = [arg for n in NAMES for arg in ("--pub", str(tmp_path / f"{n}.pub"))]
    code, out = _neurofed("roster", "--out", str(tmp_path / "roster.txt"), *pubs)
    assert code == 0 and "3 seats (ixi, sald, camcan)" in out, out
    assert _neurofed("secret", "--out", str(tmp_path / "secret"))[0] == 0


def _check(tmp_path, keys: list[str]) -> list[tuple[int, str]]:
    port, timeout = str(free_port()), scaled(20)
    procs = []
    for k, key in enumerate(keys):
        cmd = [sys.executable, "-m", "neurofed", "federation", "check", "--config", "configs/federated_brain_age.yaml",
               "--site_rank", str(k), "--port", port, "--timeout_s", str(timeout), "--key_file", str(tmp_path / key),
               "--roster_file", str(tmp_path / "roster.txt"), "--secret_file", str(tmp_path / "secret")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    # the checks import neurofed, meet within timeout_s, then prove the secret: a failing one waits out its timeout
    return [(p.wait(scaled(STARTUP_S) + 2 * timeout), p.stdout.read()) for p in procs]


def test_the_set_up_commands_write_private_keys_and_a_roster_that_match(tmp_path):
    _set_up(tmp_path)
    roster = Roster.load(tmp_path / "roster.txt")
    for k, name in enumerate(NAMES):
        assert roster.name(k) == name and SiteIdentity.load(tmp_path / f"{name}.key").public == roster.key(k)
        assert stat.S_IMODE(os.stat(tmp_path / f"{name}.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "secret").st_mode) == 0o600
    assert len(bytes.fromhex((tmp_path / "secret").read_text().strip())) == 32
    code, out = _neurofed("keygen", "--name", "ixi", "--out", str(tmp_path / "ixi.key"))
    assert code != 0 and "never overwritten" in out


def test_three_sites_with_their_keys_pass_every_check(tmp_path):
    _set_up(tmp_path)
    for code, out in _check(tmp_path, [f"{n}.key" for n in NAMES]):
        assert code == 0, out
        assert "FAIL" not in out and "identities proven" in out and "settings agree" in out


def test_a_site_with_another_seats_key_fails_the_check_everywhere_and_is_named(tmp_path):
    _set_up(tmp_path)
    results = _check(tmp_path, ["ixi.key", "sald.key", "ixi.key"])  # seat 2 (camcan) holds ixi's key
    assert [code for code, _ in results] == [2, 2, 2]
    assert "FAIL  identity" in results[2][1] and "is not the key the roster lists for seat 2" in results[2][1]
    for k in (0, 1):
        assert "FAIL  handshake" in results[k][1] and "seat 2 (camcan)" in results[k][1], results[k][1]
