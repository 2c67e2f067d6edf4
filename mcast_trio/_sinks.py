"""Sinks: outputs fed through a bounded queue by a writer thread of their own.

The rule every output follows (stdout, files, later ZeroMQ and HTTP): the
task that receives never waits on an output. It hands each item to
:meth:`Sink.offer`, which never blocks: the item goes into a bounded queue,
or, when the queue is full, it is refused and counted. One long-lived
thread per sink takes the items in order and does the blocking work
(``write``, ``flush``, ``fsync``), so a stalled pipe or disk stops that
output only, and what it could not take is counted in
:meth:`Sink.statistics`.

Closing (:meth:`Sink.close`, or leaving :func:`open_sink`) puts a sentinel
behind the queued items and waits a bounded time for the thread to write
them; a thread stuck in a write that never returns (a reader that stopped
reading) is abandoned (a daemon thread never holds up the exit of the
process), and what it still held is counted as discarded.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from . import _validate
from ._counters import counters_for

__all__ = ["Sink", "SinkStatistics", "open_sink"]


@dataclass(frozen=True)
class SinkStatistics:
    """A snapshot of a sink's counters (:meth:`Sink.statistics`).

    Counts are in the *weight* the producer gave each item (readouts for
    the recorder, lines for a printer; 1 per item by default), so that
    ``offered == written + dropped + discarded + queued`` at any moment.

    Attributes:
        offered: weight offered to :meth:`Sink.offer`.
        written: weight the writer thread has written.
        dropped: weight refused because the queue was full (or the sink
            was already closed or failed).
        discarded: weight accepted but never written: the writer failed
            (the error is in ``error``) or was abandoned at close.
        queued: weight in the queue now, including the item being written.
        queued_bytes: bytes (the ``size`` given to :meth:`Sink.offer`) in
            the queue now.
        peak: the largest ``queued`` seen.
        capacity: the queue's bound in weight.
        max_bytes: the queue's bound in bytes (None: no byte bound).
        error: the writer's error (``"OSError: ..."``), None while it works.
        closed: :meth:`Sink.close` was called.
    """

    offered: int = 0
    written: int = 0
    dropped: int = 0
    discarded: int = 0
    queued: int = 0
    queued_bytes: int = 0
    peak: int = 0
    capacity: int = 0
    max_bytes: int | None = None
    error: str | None = None
    closed: bool = False


_SinkCounters = counters_for(SinkStatistics)

_STOP = object()


class Sink:
    """One output behind a bounded queue, written by its own thread.

    Args:
        write: ``write(item)``, called in the writer thread with each item
            in the order offered; it may block. An exception it raises ends
            the sink: it is kept in :attr:`error`, the items still queued
            are discarded (counted) and later offers are refused.
        capacity: the queue's bound, in weight (see :meth:`offer`); an item
            is refused when it would take the queue past it, unless the
            queue is empty (an item heavier than the bound still goes
            through alone).
        max_bytes: an optional second bound, in the ``size`` of the items.
        flush: optional ``flush()``, called in the writer thread whenever
            the queue has been emptied (one flush for a run of items).
        close: optional ``close()``, called in the writer thread when it
            ends (after the last write, or after an error).
        on_error: optional ``on_error(exc)``, called in the writer thread
            when ``write``/``flush``/``close`` failed.
        overflow: what a full queue does with an offer: ``"drop_newest"``
            (the default) refuses it, ``"drop_oldest"`` makes room by
            dropping the oldest items not yet being written (for outputs
            where the latest item matters most, like a status report).
            Either way the weight dropped is counted in ``dropped``.
        name: the thread's name (for debugging).

    Attributes:
        error: the exception that ended the writer (from ``write``,
            ``flush`` or ``close``), None while it works.

    Raises:
        ValueError: ``capacity`` or ``max_bytes`` is out of range.
        TypeError: ``write`` (or ``flush``/``close``/``on_error``) is not
            callable.
    """

    def __init__(self, write: Callable[[Any], Any], *, capacity: int, max_bytes: int | None = None,
                 flush: Callable[[], Any] | None = None, close: Callable[[], Any] | None = None,
                 on_error: Callable[[BaseException], Any] | None = None, overflow: str = "drop_newest",
                 name: str = "sink") -> None:
        for arg, value in (("write", write), ("flush", flush), ("close", close), ("on_error", on_error)):
            if (value is not None or arg == "write") and not callable(value):
                raise TypeError(f"{arg}={value!r} is not callable; allowed: a function"
                                + (" or None" if arg != "write" else ""))
        _validate.check_int("capacity", capacity, 1, 1 << 40)
        _validate.check_choice("overflow", overflow, ("drop_newest", "drop_oldest"), what="an overflow policy")
        self._drop_oldest = overflow == "drop_oldest"
        if max_bytes is not None:
            _validate.check_int("max_bytes", max_bytes, 1, 1 << 50)
        self._write = write
        self._flush = flush
        self._close = close
        self._on_error = on_error
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._items: collections.deque = collections.deque()
        self._counters = _SinkCounters()
        self._counters.capacity = capacity
        self._counters.max_bytes = max_bytes
        self._stopped = False  # closed or failed: offers are refused
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def offer(self, item: Any, weight: int = 1, size: int = 0) -> bool:
        """Queue ``item`` for the writer without waiting; True if taken.

        ``weight`` is what the item counts for in the statistics and the
        ``capacity`` (e.g. the number of readouts in it), ``size`` what it
        counts for in ``max_bytes``. A refused item is counted in
        ``dropped``.
        """
        c = self._counters
        with self._lock:
            c.offered += weight
            if self._stopped:
                c.dropped += weight
                return False
            if c.queued and not self._fits(weight, size):
                if self._drop_oldest:
                    items = self._items
                    while len(items) > 1 and not self._fits(weight, size):
                        _, old_weight, old_size = items[1]  # items[0] may be being written
                        del items[1]
                        c.queued -= old_weight
                        c.queued_bytes -= old_size
                        c.dropped += old_weight
                if not self._fits(weight, size):
                    c.dropped += weight
                    return False
            self._items.append((item, weight, size))
            c.queued += weight
            c.queued_bytes += size
            if c.queued > c.peak:
                c.peak = c.queued
            self._wake.notify()
        return True

    def _fits(self, weight: int, size: int) -> bool:
        c = self._counters
        return c.queued + weight <= c.capacity and (c.max_bytes is None or c.queued_bytes + size <= c.max_bytes)

    def statistics(self) -> SinkStatistics:
        """A consistent snapshot of the counters (:class:`SinkStatistics`)."""
        with self._lock:
            error = self.error
            return self._counters.snapshot(
                error=None if error is None else f"{type(error).__name__}: {error}")

    @property
    def running(self) -> bool:
        """Whether the writer thread is still alive."""
        return self._thread.is_alive()

    def close(self, timeout: float | None = 5.0) -> bool:
        """Let the writer write what is queued, then end; wait at most
        ``timeout`` seconds (None: no bound). Returns True if the writer
        ended; if not (stuck in a write), what it still holds is counted
        as discarded and the thread is left behind (a daemon thread).
        Blocking: from trio, use :meth:`aclose`."""
        self._begin_close()
        self._thread.join(timeout)
        return self._abandon_if_alive()

    async def aclose(self, timeout: float = 5.0) -> bool:
        """:meth:`close` for trio: waits in a worker thread, at most
        ``timeout`` seconds.

        Cancellation: shielded; the wait is bounded by ``timeout``, so a
        cancelled caller still gives the writer its chance to finish.
        """
        self._begin_close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(timeout + 1.0):
                await trio.to_thread.run_sync(self._thread.join, timeout, abandon_on_cancel=True)
        return self._abandon_if_alive()

    def _begin_close(self) -> None:
        with self._lock:
            if not self._counters.closed:
                self._counters.closed = True
                self._stopped = True
                self._items.append((_STOP, 0, 0))
                self._wake.notify()

    def _abandon_if_alive(self) -> bool:
        if not self._thread.is_alive():
            return True
        with self._lock:
            c = self._counters
            c.discarded += c.queued
            c.queued = c.queued_bytes = 0
            self._items.clear()
        return False

    # -- the writer thread ------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
            self._stopped = True
            c = self._counters
            c.discarded += c.queued
            c.queued = c.queued_bytes = 0
            self._items.clear()
        if self._on_error is not None:
            try:
                self._on_error(exc)
            except Exception:  # noqa: BLE001 - a callback must not kill the writer's cleanup
                pass

    def _run(self) -> None:
        c = self._counters
        items = self._items
        try:
            while True:
                with self._lock:
                    while not items:
                        self._wake.wait()
                    item, weight, size = items[0]  # stays queued until written
                if item is _STOP:
                    return
                try:
                    self._write(item)
                except BaseException as exc:  # noqa: BLE001 - kept, reported by statistics/error
                    self._fail(exc)
                    return
                with self._lock:
                    if items and items[0][0] is item:
                        items.popleft()
                        c.written += weight
                        c.queued -= weight
                        c.queued_bytes -= size
                    empty = not items or items[0][0] is _STOP
                if empty and self._flush is not None:
                    try:
                        self._flush()
                    except BaseException as exc:  # noqa: BLE001
                        self._fail(exc)
                        return
        finally:
            if self._close is not None:
                try:
                    self._close()
                except BaseException as exc:  # noqa: BLE001
                    self._fail(exc)


@asynccontextmanager
async def open_sink(write: Callable[[Any], Any], *, capacity: int, max_bytes: int | None = None,
                    flush: Callable[[], Any] | None = None, close: Callable[[], Any] | None = None,
                    overflow: str = "drop_newest", name: str = "sink", close_timeout: float = 5.0,
                    on_error: Callable[[BaseException], Any] | None = None) -> AsyncIterator[Sink]:
    """A :class:`Sink` for trio code, closed (bounded wait) on the way out.

    The sink it yields has one more method, ``await sink.wait_failed()``,
    which returns once the writer has failed (its exception is then in
    ``sink.error``): start it in a task that stops the work, e.g. a reader
    that went away (``BrokenPipeError``) or a full disk. ``on_error`` (if
    given) is called in the trio thread, like ``wait_failed`` returning.

    Cancellation: leaving the block closes the sink (see
    :meth:`Sink.aclose`: shielded, at most ``close_timeout`` seconds).
    """
    _validate.check_number("close_timeout", close_timeout, 0, 3600, allowed="seconds in 0..3600")
    token = trio.lowlevel.current_trio_token()
    failed = trio.Event()

    def in_trio(exc: BaseException) -> None:
        failed.set()
        if on_error is not None:
            on_error(exc)

    def from_thread(exc: BaseException) -> None:
        try:
            token.run_sync_soon(in_trio, exc)
        except trio.RunFinishedError:
            pass

    sink = Sink(write, capacity=capacity, max_bytes=max_bytes, flush=flush, close=close,
                on_error=from_thread, overflow=overflow, name=name)

    async def wait_failed() -> None:
        await failed.wait()

    sink.wait_failed = wait_failed  # type: ignore[attr-defined]
    try:
        yield sink
    finally:
        await sink.aclose(close_timeout)
