"""Standard output as a sink: what the printing subcommands write goes
through a :class:`~mcast_trio.Sink` (a bounded queue and a writer thread),
so a reader that stalls never stops the receive task; a reader that goes
away ends the command quietly (exit 0).

The writer thread writes with ``os.write`` on file descriptor 1 (blocking,
so standard error, which shares the open file description when both go to
a terminal, stays blocking too), never through ``sys.stdout``: a thread
stuck in a write to a pipe nobody reads then holds no lock that the
interpreter needs at exit.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import asynccontextmanager

from .. import open_sink
from ._common import _jsonable
from ._stdio import StdoutError, stdout_error

__all__ = ["json_line", "open_stdout", "open_stderr", "reader_gone", "is_reader_gone", "is_stdout_error"]

#: Seconds the writer gets, at exit, to write what is still queued.
CLOSE_TIMEOUT = 2.0


def json_line(record: dict) -> str:
    """One JSON line, as :func:`~mcast_trio.cli._common.emit_json` prints it."""
    return json.dumps(record, separators=(",", ":"), default=_jsonable) + "\n"


def _write_fd(fd: int):
    def write(text: str) -> None:
        view = memoryview(text.encode("utf-8", "backslashreplace"))
        try:
            while view:
                view = view[os.write(fd, view):]
        except BrokenPipeError:
            raise
        except OSError as exc:  # a full disk, an I/O error: say it is standard output's
            raise stdout_error(exc) from None
    return write


@asynccontextmanager
async def open_stdout(capacity: int, *, overflow: str = "drop_newest", close_timeout: float = CLOSE_TIMEOUT):
    """A sink writing text to standard output; ``offer(text, weight)``."""
    sys.stdout.flush()
    async with open_sink(_write_fd(sys.stdout.fileno()), capacity=capacity, name="stdout", overflow=overflow,
                         close_timeout=close_timeout) as sink:
        yield sink


def _write_raw(fd: int):
    def write(text: str) -> None:
        view = memoryview(text.encode("utf-8", "backslashreplace"))
        while view:
            view = view[os.write(fd, view):]
    return write


@asynccontextmanager
async def open_stderr(capacity: int, *, close_timeout: float = CLOSE_TIMEOUT):
    """A sink writing text to standard error (status lines, notes);
    ``offer(text)``. Standard error is a command's log, not its output: a
    stalled reader never stops the task that offers (the lines it cannot
    take are dropped and counted), and a failed one (a reader that went
    away) only ends the sink: every later line is dropped and counted
    (``statistics().dropped``), the command goes on."""
    sys.stderr.flush()
    async with open_sink(_write_raw(sys.stderr.fileno()), capacity=capacity, name="stderr",
                         close_timeout=close_timeout) as sink:
        yield sink


def is_reader_gone(exc: BaseException | None) -> bool:
    """Whether ``exc`` is (or groups only) a broken pipe."""
    if isinstance(exc, BrokenPipeError):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(is_reader_gone(e) for e in exc.exceptions)
    return False


def is_stdout_error(exc: BaseException | None) -> StdoutError | None:
    """The :class:`~._stdio.StdoutError` that ``exc`` is (or groups, with
    nothing but broken pipes beside it), else None."""
    if isinstance(exc, StdoutError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [is_stdout_error(e) for e in exc.exceptions]
        if all(f is not None or is_reader_gone(e) for f, e in zip(found, exc.exceptions)):
            return next((f for f in found if f is not None), None)
    return None


def reader_gone() -> None:
    """The reader of standard output went away: point file descriptor 1 at
    /dev/null so that later writes (and the flush at exit) go nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
