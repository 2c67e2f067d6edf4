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
  stdout sink of :mod:`._output`, which raises it too);
* ``sys.stderr`` becomes a text stream that never waits and never fails:
  standard error is a command's log, not its output. A line that a full
  pipe cannot take at once, or that fails (``2>/dev/full``, a reader that
  went away), is dropped and counted (:func:`stderr_dropped`); the command
  goes on. Long-running commands send their status lines through the
  stderr sink of :mod:`._output` (a thread), which waits for a slow
  reader without stopping the receive task.
"""

from __future__ import annotations

import io
import os
import select
import stat
import sys

__all__ = ["StdoutError", "install", "stderr_dropped", "stdout_error"]


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


class _StderrRaw(io.RawIOBase):
    """File descriptor 2, written without waiting: on a pipe, a socket or a
    terminal each chunk (at most ``PIPE_BUF`` bytes, which a pipe with room
    for one more takes whole) is written only when ``poll`` says it can be
    now; what cannot be written at once, or fails, is dropped and counted.
    The file description's own flags are left alone (it may be shared with
    standard output)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self.dropped = 0
        try:
            mode = os.fstat(fd).st_mode
            self._poll = not (stat.S_ISREG(mode) or stat.S_ISBLK(mode))
        except OSError:
            self._poll = False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        try:
            return os.isatty(self._fd)
        except OSError:
            return False

    def _ready(self) -> bool:
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        return any(event & select.POLLOUT and not event & (select.POLLERR | select.POLLNVAL)
                   for _, event in poller.poll(0))

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        try:
            while view:
                if self._poll and not self._ready():
                    break
                view = view[os.write(self._fd, view[:select.PIPE_BUF]):]
        except OSError:
            pass
        if view:
            self.dropped += 1
        return size


def stderr_dropped() -> int:
    """Writes to ``sys.stderr`` dropped so far (not taken at once, or failed)."""
    raw = getattr(getattr(sys.stderr, "buffer", None), "raw", None)
    return raw.dropped if isinstance(raw, _StderrRaw) else 0


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
    stderr = sys.stderr
    if type(stderr) is io.TextIOWrapper:
        try:
            stderr.flush()
        except (OSError, ValueError):
            pass
        try:
            fd = stderr.fileno()
        except (OSError, ValueError):
            return
        _replaced.append(stderr)
        sys.stderr = io.TextIOWrapper(io.BufferedWriter(_StderrRaw(fd)), encoding=stderr.encoding,
                                      errors="backslashreplace", line_buffering=True, write_through=True)
