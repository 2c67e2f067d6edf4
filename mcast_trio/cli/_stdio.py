"""Standard output and standard error as the process got them: closed
(``>&-``, ``2>&-``) or failing (``>/dev/full``).

:func:`install` runs first in :func:`mcast_trio.cli.main` (standard
library only, like :mod:`._signals`):

* a closed standard output or error (``sys.stdout``/``sys.stderr`` is
  None) is pointed at ``/dev/null``: nobody can read what the command
  prints, so the command does its work as if a reader had gone away
  (quietly, exit 0), never an ``AttributeError`` traceback;
* ``sys.stdout`` becomes a text stream whose failed writes (other than a
  broken pipe: a reader that went away) raise :class:`StdoutError`, an
  ``OSError`` that names standard output, so that the click group reports
  it in one line (exit 1) whatever wrote (``click.echo``, a JSON line, the
  stdout sink of :mod:`._output`, which raises it too).
"""

from __future__ import annotations

import io
import os
import sys

__all__ = ["StdoutError", "install", "stdout_error"]


class StdoutError(OSError):
    """A write to standard output failed (a full disk, an I/O error); not
    a broken pipe (a reader that went away)."""


def stdout_error(exc: OSError) -> StdoutError:
    """``exc`` (a failed write to standard output) as a :class:`StdoutError`."""
    if isinstance(exc, StdoutError):
        return exc
    return StdoutError(exc.errno, f"cannot write to standard output: {exc.strerror or exc}")


class _Stdout(io.TextIOWrapper):
    """``sys.stdout``, whose write errors say they are standard output's."""

    def write(self, text: str) -> int:
        try:
            return super().write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise stdout_error(exc) from None

    def flush(self) -> None:
        try:
            super().flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise stdout_error(exc) from None


def _devnull_on(fd: int, mode: str):
    """Point the closed file descriptor ``fd`` at /dev/null; a text stream on it."""
    try:
        os.fstat(fd)
    except OSError:
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
    return open(fd, mode, closefd=False, encoding="utf-8", errors="backslashreplace", buffering=1)


_replaced: list = []


def install() -> None:
    """Make standard output and error usable (see the module's docstring)."""
    if sys.stdout is None:
        sys.stdout = _devnull_on(1, "w")
    if sys.stderr is None:
        sys.stderr = _devnull_on(2, "w")
    stdout = sys.stdout
    if type(stdout) is io.TextIOWrapper and getattr(stdout, "buffer", None) is not None:
        try:
            stdout.flush()
            _replaced.append(stdout)  # kept: when collected, it would close the buffer shared with ours
            sys.stdout = _Stdout(stdout.buffer, encoding=stdout.encoding, errors=stdout.errors,
                                 line_buffering=stdout.line_buffering, write_through=stdout.write_through)
        except (OSError, ValueError):
            pass
