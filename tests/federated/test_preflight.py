"""``neurofed federation check`` at three sites on loopback: a table of what works, exit 0 or 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from timeouts import STARTUP_S, scaled

from neurofed.federated.simulate import free_port

pytestmark = pytest.mark.slow


def _check(tmp_path, secrets: list[bool]) -> list[tuple[int, str]]:
    (tmp_path / "secret").write_text("s" * 40)
    port, timeout = str(free_port()), scaled(20)
    procs = []
    for k, has_secret in enumerate(secrets):
        cmd = [sys.executable, "-m", "neurofed", "federation", "check", "--config", "configs/federated_brain_age.yaml",
               "--site_rank", str(k), "--port", port, "--timeout_s", str(timeout)]
        if has_secret:
            cmd += ["--secret_file", str(tmp_path / "secret")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    # the checks import neurofed, meet within timeout_s, then prove the secret: a failing one waits out its timeout
    return [(p.wait(scaled(STARTUP_S) + 2 * timeout), p.stdout.read()) for p in procs]


def test_three_sites_with_the_secret_pass_every_check(tmp_path):
    for code, out in _check(tmp_path, [True, True, True]):
        assert code == 0, out
        assert "FAIL" not in out and "secret proven" in out and "settings agree" in out


def test_a_site_without_the_secret_fails_the_check_everywhere_and_is_named(tmp_path):
    results = _check(tmp_path, [True, True, False])
    assert [code for code, _ in results] == [2, 2, 2]
    for k in (0, 1):
        assert "FAIL  handshake" in results[k][1] and "seat 2" in results[k][1]
    assert "peers" in results[2][1] and "ok    peers" in results[2][1]
