"""The ``mcast-trio`` console script's entry point.

It takes over SIGINT and SIGTERM before anything else is imported, then runs
:func:`mcast_trio.cli.main`. Importing the ``mcast_trio`` package (numpy,
trio, the compiled extensions) takes a few tenths of a second, and the
command's own code cannot run before it: a module of the package would be
too late, so this one stands outside. A stop signal received meanwhile is
recorded and handed over: the command stops as soon as it has started and
exits 0 with its summary (``mcast_trio.cli._signals``).
``python -m _mcast_trio_launch`` is the same as ``mcast-trio``.
"""

import signal

_received: list = []


def _record(signum, frame) -> None:
    _received.append(signum)


def main() -> int:
    """Run ``mcast-trio`` with the process arguments; return the exit code."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _record)
    from mcast_trio.cli import _signals, main as cli_main

    code = cli_main(signals_before=_received)
    _signals.exiting()  # a stop signal while the process exits: ignored, exit code kept
    return code


if __name__ == "__main__":
    raise SystemExit(main())
