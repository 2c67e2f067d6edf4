"""SIGINT and SIGTERM from the first instant of ``mcast-trio``.

:func:`install` is the first thing :func:`mcast_trio.cli.main` does, before
click, rich and the subcommands are imported (and before anything opens):
from then on a signal is recorded, never a ``KeyboardInterrupt`` traceback
in the middle of an import, never a kill by SIGTERM. What happens to a
recorded signal depends on the command:

* a command that runs until stopped (it calls :func:`._common.run`): the
  signal stops it as soon as it has started, and it exits 0 with its
  summary; inside ``trio.run``, trio's signal receiver takes over
  (:func:`._common.run`, :func:`._common.stop_on_signals`);
* any other command (``decode``, ``info``, ...): :func:`interruptible` turns
  the signal into ``KeyboardInterrupt`` (click: ``Aborted!``, exit 1), at
  once if one came during start-up.

This module imports nothing but the standard library's ``signal``: it is
imported before the heavy modules.
"""

from __future__ import annotations

import signal

__all__ = ["STOP_SIGNALS", "exiting", "install", "interruptible", "raising", "received"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: The stop signals received so far (signal numbers, in order).
received: list[int] = []
_raise = False


def _handler(signum, frame) -> None:
    received.append(signum)
    if _raise:
        raise KeyboardInterrupt


def install(before: list[int] | None = None) -> None:
    """Record SIGINT and SIGTERM from now on, without raising; ``before``:
    the signals an earlier handler recorded (the console script's), whose
    handler this one replaces."""
    global _raise
    _raise = False
    received.clear()
    for signum in STOP_SIGNALS:
        try:
            signal.signal(signum, _handler)
        except ValueError:  # not the main thread (main() called from a thread): leave them
            return
    if before:  # no longer appended to: its handler is replaced
        received[:0] = before


def interruptible() -> None:
    """From now on a stop signal raises ``KeyboardInterrupt`` (for commands
    that do not run until stopped); raise it now if one came already."""
    global _raise
    _raise = True
    if received:
        raise KeyboardInterrupt


def raising() -> bool:
    """Whether a stop signal raises ``KeyboardInterrupt`` (see :func:`interruptible`)."""
    return _raise


def exiting() -> None:
    """The command has ended (its summary printed, its files closed), the
    process is about to exit: ignore SIGINT and SIGTERM from now on.
    Python's finalization restores the default handlers of the signals it
    handled, so a second SIGTERM a moment after the first would otherwise
    kill the process (exit -15) after it did everything right; an ignored
    signal stays ignored. Only for a process that ends now (``python -m
    mcast_trio.cli``, the console script), never for :func:`main` called
    in a program that goes on."""
    for signum in STOP_SIGNALS:
        try:
            signal.signal(signum, signal.SIG_IGN)
        except ValueError:  # not the main thread
            return
