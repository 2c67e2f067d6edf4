"""``mcast-trio``: the command-line tools for a DAQ shift.

One program with subcommands (``mcast-trio --help``): ``simulate``,
``replay``, ``listen``, ``record``, ``monitor``, ``decode``, ``info``,
``check``, ``plot``, ``probe``, ``bench`` and ``demo``. Built on the library's
public API with click (command line) and rich (terminal), which come with the
``cli`` extra: ``pip install 'mcast_trio[cli]'``.

Exit codes: 0 success (also after Ctrl-C or SIGTERM ended a command that runs
until stopped, at any moment: signals are handled from the first instant of
:func:`main`, before the heavy imports), 1 failure (a busy port, a missing or damaged file, ...), 2
usage (an invalid option; the message names it, as the library does).
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None, *, signals_before: list[int] | None = None) -> int:
    """Run ``mcast-trio`` with ``argv`` (default: the process arguments);
    return the exit code.

    It installs the process's SIGINT and SIGTERM handlers first (module
    ``_signals``), and makes a closed standard output or error usable
    (module ``_stdio``), before the heavy imports. ``signals_before``: the stop
    signals the console script (``_mcast_trio_launch``, which takes them over
    before the ``mcast_trio`` package is imported) received until now.
    """
    from . import _signals, _stdio

    _signals.install(signals_before)
    _stdio.install()
    try:
        import click  # noqa: F401
        import rich  # noqa: F401
    except ImportError as exc:
        print(f"mcast-trio: error: the command-line tools need the 'cli' extra ({exc.name} is missing):"
              " pip install 'mcast_trio[cli]'", file=sys.stderr)
        return 1
    from ._app import cli

    try:
        cli.main(args=argv, prog_name="mcast-trio", standalone_mode=True)
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
