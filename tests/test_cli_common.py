"""The mcast-trio command's shared behaviour, run as a user runs it (a
subprocess): help, usage errors with the library's messages, exit codes."""

from __future__ import annotations

import subprocess



def run(cli, *args, timeout=60):
    return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_subcommands(mcast_trio_cli):
    result = run(mcast_trio_cli, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: mcast-trio" in result.stdout
    assert "Examples:" in result.stdout


def test_version(mcast_trio_cli):
    import mcast_trio

    result = run(mcast_trio_cli, "--version")
    assert result.returncode == 0 and mcast_trio.__version__ in result.stdout


def test_unknown_subcommand_is_a_usage_error(mcast_trio_cli):
    result = run(mcast_trio_cli, "no-such-command")
    assert result.returncode == 2
    assert "No such command" in result.stderr and "Traceback" not in result.stderr


SUBCOMMANDS = ["simulate", "replay", "listen", "record", "monitor", "decode", "info", "check", "plot", "probe",
               "bench", "demo"]


def test_every_subcommand_is_there_with_examples_in_its_help(mcast_trio_cli):
    listing = run(mcast_trio_cli, "--help").stdout
    for name in SUBCOMMANDS:
        assert f"  {name}" in listing, name
        result = run(mcast_trio_cli, name, "--help")
        assert result.returncode == 0, (name, result.stderr)
        assert "Examples:" in result.stdout and f"mcast-trio {name} " in result.stdout, name
