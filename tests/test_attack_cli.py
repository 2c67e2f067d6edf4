"""Attacks on the ``mcast-trio`` command after issue 13 (points 2, 3, 9, 10,
15-19): standard output closed or full, per-sender record files, signals.
Each test runs the real command in a subprocess (inside the test run's
private network namespace) and asserts what the docs promise."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from mcast_trio import ApxWriter
from mcast_trio.sim import DaqSimulator


def _apx(path) -> str:
    with ApxWriter(path, {"readout_uid": 4000}) as writer:
        for datagram in DaqSimulator(seed=24).generate(500).datagrams():
            writer.write(datagram)
    return str(path)


def _close_stdout() -> None:
    os.close(1)


@pytest.mark.parametrize("command", [
    ["simulate", "--json", "--seconds", "0.2", "-g", "239.255.78.1:31100"],
    ["info", "--json", "{apx}"],
    ["listen", "-g", "239.255.78.2:31101"],
    ["monitor", "--headless", "--json", "--interval", "0.2", "-g", "239.255.78.3:31102"],
])
def test_stdout_closed_before_start_is_a_reader_gone_not_a_traceback(mcast_trio_cli, command, tmp_path):
    """``mcast-trio ... >&-``: nobody can read what it prints; like a reader
    that went away it ends quietly (exit 0), never an AttributeError
    traceback from ``sys.stdout`` being None."""
    apx = _apx(tmp_path / "run.apx")
    process = subprocess.Popen([*mcast_trio_cli, *(arg.format(apx=apx) for arg in command)],
                               stderr=subprocess.PIPE, preexec_fn=_close_stdout)
    try:
        process.wait(4)
    except subprocess.TimeoutExpired:  # a long-running command: stop it
        process.send_signal(signal.SIGINT)
    code = process.wait(20)
    text = process.stderr.read().decode()
    assert "Traceback" not in text, text
    assert code == 0, text


@pytest.mark.parametrize("command", [
    ["info", "--json", "{apx}"],
    ["info", "{apx}"],
    ["check", "{apx}"],
    ["simulate", "--json", "--seconds", "0.2", "-g", "239.255.78.4:31103"],
])
def test_stdout_on_a_full_device_is_one_line_naming_stdout(mcast_trio_cli, command, tmp_path):
    """``mcast-trio ... >/dev/full``: a write error names what could not be
    written (standard output) in one line, exit 1, no traceback."""
    apx = _apx(tmp_path / "run.apx")
    with open("/dev/full", "w") as full:
        process = subprocess.run([*mcast_trio_cli, *(arg.format(apx=apx) for arg in command)],
                                 stdout=full, stderr=subprocess.PIPE, timeout=30)
    text = process.stderr.decode()
    assert "Traceback" not in text, text
    assert process.returncode == 1, text
    assert "stdout" in text.lower() or "standard output" in text.lower(), text
