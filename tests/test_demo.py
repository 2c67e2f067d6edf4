"""The headless demo script ``mcast-trio-demo`` as a user runs it: the installed console script,
in a subprocess, with real datagrams on loopback."""

from __future__ import annotations

import re
import pathlib
import subprocess
import sys

import pytest

from mcast_trio.testing import isolation_problem

_PROBLEM = isolation_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


def _demo_command() -> list[str]:
    # The console script installed beside this interpreter (`make demo` runs `mcast-trio demo`,
    # the same DAQ loop with the live monitor: tests/test_cli_monitor.py).
    script = pathlib.Path(sys.executable).parent / "mcast-trio-demo"
    assert script.is_file(), f"the console script {script} is not installed"
    return [str(script)]


def test_demo_says_its_malformed_datagrams_are_injected_on_purpose(tmp_path):
    proc = subprocess.run(_demo_command() + ["--seconds", "2", "--rate", "5000", "--garbage-every", "500"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "on purpose, the DAQ adds one garbage datagram after every 500 readouts" in out
    total = re.search(r"total: ([\d,]+) datagrams, ([\d,]+) readouts, .* lost (\d+), malformed (\d+)", out)
    assert total, out
    readouts, lost, malformed = int(total[2].replace(",", "")), int(total[3]), int(total[4])
    assert readouts > 5000
    # The garbage comes on top of the readouts: nothing is lost on loopback.
    assert lost == 0
    injected = re.search(r"malformed: (\d+) received, (\d+) injected on purpose", out)
    assert injected, out
    assert int(injected[1]) == malformed
    # Every injected datagram arrives, except perhaps the last few in flight.
    assert 0 <= int(injected[2]) - malformed <= 2
    assert malformed >= readouts // 500 - 1
