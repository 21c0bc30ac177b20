"""Deadlines of the tests, stretched on a busy machine by one mechanism.

Many tests start real processes: each imports torch and Lightning (a few seconds on an idle 2-core machine,
20–30 s when other work shares the cores) before a federation starts counting its own ``timeout_s``. So no
wait in the tests is a bare constant:

- a federation's ``timeout_s`` in a test is ``scaled(x)``, long enough for every site to start on a busy
  machine (tests that wait for a timeout on purpose keep a small one and bound the wait by it);
- a wait for processes is ``scaled(STARTUP_S + the work + the federation's timeouts)``;
- "it failed within its timeout" is asserted as ``elapsed < timeout_s + scaled(margin)``.

``scaled`` multiplies by ``NEUROFED_TEST_TIMEOUT_SCALE`` (default 1) or, when larger, by the machine's load:
the one-minute load average per core. A scientist's shared workstation then needs no setting; a CI runner
that is slower than its load shows sets the variable.
"""

from __future__ import annotations

import os

__all__ = ["STARTUP_S", "scale", "scaled"]

#: Seconds a child process may take, on an idle machine, to start Python and import torch and Lightning.
STARTUP_S = 60.0


def scale() -> float:
    """The factor every deadline is stretched by now (at least 1)."""
    setting = float(os.environ.get("NEUROFED_TEST_TIMEOUT_SCALE") or 1.0)
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        load = 1.0
    return max(1.0, setting, load)


def scaled(seconds: float) -> float:
    """``seconds`` on an idle machine, stretched for this one (see the module docstring)."""
    return seconds * scale()
