"""``mcast-trio record OUT.apx``: record everything received to ``.apx``.

Readout mode (the default): a receive task (:func:`~mcast_trio.serve_receiver`
with a :class:`~mcast_trio.ReadoutChunk` channel of our own) and a forwarding
loop (this command's main task) in one nursery, and two writers, each a
:class:`~mcast_trio.Sink` (a bounded queue and a thread of its own). The
forwarding loop never waits: it offers each chunk (the well-formed readouts
of one receive batch) to the ``.apx`` writer, which hands its records to
:class:`~mcast_trio.ApxWriter` with ``flush="batch"`` (one ``write`` per
chunk). The receiver runs with ``overflow="block"``: it waits for the
forwarding loop only, never for the disk. A disk that does not keep up
fills the writer's queue (``--queue-size`` readouts); beyond, readouts are
dropped and counted (``queue_dropped``). So a killed recorder (SIGKILL)
loses at most what is queued: ``--queue-size`` readouts (one receive batch,
at most 256 readouts, when that is more), plus the batches being handed
over from the receiver (at most 4, of at most 256 readouts each).
Malformed datagrams are counted by the receiver and handed over by its
``on_malformed`` hook to the capture writer, a second sink (at most 4096 datagrams or 16 MiB queued;
beyond, dropped and counted as ``capture_dropped``), which writes them
whether or not readouts arrive.

Senders: each readout chunk says which sender each of its readouts came
from (:meth:`~mcast_trio.ReadoutChunk.by_source`; the receive pipeline
keeps one decoding carry chain per sender and knows them).
Each sender's readouts go to files of their own: the first sender's to
``OUT.apx``, the second's to ``OUT-sender2.apx``, and so on (with rotation
``OUT-sender2-0001.apx``, ...), so that a hit split across two readouts is
only ever joined with its own sender's next readout when decoded. Each file
created once its sender is known names it in its header (``recorder`` ->
``sender``, ``"host:port"``; the first file is created before any readout
arrives, so its first segment's header says ``null``); the summary maps
each sender to its files (``senders``). At most 64 senders get files;
readouts of more are counted (``unrecorded``). A further sender's name
taken by a file of an earlier run is skipped (``OUT-sender2-0001.apx``,
..., said on stderr), never replaced, and never ends the recording.

Status lines (``--status``) and notes go to standard error through a sink
of their own (:func:`._output.open_stderr`): a stalled or vanished stderr
neither stops the receiver nor ends the recording; the lines it did not
take are counted (``log_dropped``). Readouts received after ``--count``
was reached are counted (``past_count``).

A write error (a full or read-only disk) ends the recording: the receiver
stops, the summary is printed, then one line naming the file, exit 1.

``--messages``: a message-mode receiver (``--framing raw`` to take every
datagram as it is); a payload that is a well-formed serialized readout goes
to the ``.apx``, anything else to the capture file beside it (format below).

Stopping: ``--count``, ``--seconds``, Ctrl-C or SIGTERM stop the receive task
only; the writers then write every chunk the receiver had already delivered
(waiting at most 30 s for a stalled disk; what is left is counted as
``queue_discarded``), flush and close the files; the summary is printed and
the exit code is 0.

Capture file (``STEM.capture``, created at the first non-readout payload;
``OUT.capture`` when OUT itself is named ``STEM.capture``):
the 8 bytes ``MCTCAP01``, then per datagram a 30-byte little-endian header
``<QIH16s``: arrival time (u64 ns since the epoch, taken when the recorder
handled it), payload length (u32), source port (u16), source address (16
bytes: IPv6, or IPv4 mapped as ``::ffff:a.b.c.d``; zeros if unknown), then
the payload. A payload that is not bytes (``--framing mcl`` decodes
msgpack) is stored as its JSON text.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import ipaddress
import json
import os
import pathlib
import socket
import struct
import sys
import threading
import time

import click
import numpy as np
import trio

from .. import (
    ApxWriter,
    AstroPix4Readout,
    MalformedReadout,
    ReadoutChunk,
    __version__,
    serve_receiver,
)
from .._format import parse_readout_header
from .._sinks import open_sink
from ._common import TOO_DEEP, emit_json, fail, network_options, run, stop_on_signals, strict_json
from ._output import open_stderr
from ._stdio import stderr_dropped
from ._common import COUNT, QUEUE, SECONDS, SECONDS_OR_NEVER, ByteSize, Number, OutputFile, parse_size  # option types

__all__ = ["COMMANDS", "record", "parse_size", "CAPTURE_MAGIC", "CAPTURE_HEADER"]

CAPTURE_MAGIC = b"MCTCAP01"
#: Per-datagram header of a capture file: arrival ns, length, port, address.
CAPTURE_HEADER = struct.Struct("<QIH16s")

def _address_bytes(address) -> tuple[int, bytes]:
    """(port, 16-byte address) of a sender address tuple."""
    try:
        host, port = address[0], int(address[1])
        ip = ipaddress.ip_address(str(host).split("%")[0])
    except (TypeError, ValueError, IndexError):
        return 0, bytes(16)
    if ip.version == 4:
        ip = ipaddress.IPv6Address("::ffff:" + str(ip))
    return port, ip.packed


@dataclasses.dataclass
class _Totals:
    readouts: int = 0
    captured: int = 0
    captured_bytes: int = 0


#: Senders that get files of their own; the readouts of more senders are
#: dropped and counted (``unrecorded``).
MAX_SENDERS = 64


def _sender_text(source) -> str:
    if source is None:
        return "?"
    host, port = source[0], source[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class _Recorder:
    """Everything written: the first sender's files (``OUT.apx``, or
    ``OUT-0001.apx``, ... when rotating; and the capture file), and one set
    of files per further sender (``OUT-sender2.apx``, ...), so that each
    file holds one sender's stream (a split hit continues in its sender's
    next readout, never in another's).

    Written by two sink threads (the ``.apx`` writer and the capture
    writer): every method holds :attr:`lock`."""

    def __init__(self, out: pathlib.Path, header: dict, **options) -> None:
        self.first = _Segments(out, header, **options)
        self.header = header
        self.options = options
        self.streams: dict = {}  # source -> _Segments
        self.lock = threading.Lock()
        self.totals = _Totals()
        self.unrecorded = 0  # readouts of senders past MAX_SENDERS
        self.say = lambda text: click.echo(text, err=True)  # a note on stderr (record: its stderr sink)

    def ensure_open(self) -> None:
        """Open the first file unless open (the capture writer may come
        first: a malformed datagram right after the join)."""
        with self.lock:
            if self.first.number == 0:
                self.first.open_next()

    @property
    def all_segments(self) -> list:
        return [self.first, *(seg for seg in self.streams.values() if seg is not self.first)]

    @property
    def files(self) -> list[str]:
        return [name for seg in self.all_segments for name in seg.files]

    @property
    def captures(self) -> list[str]:
        return self.first.captures

    @property
    def bytes_written(self) -> int:
        return sum(seg.bytes_written for seg in self.all_segments)

    def senders(self) -> dict:
        """``{"host:port": [files]}``."""
        return {seg.sender or "?": list(seg.files) for seg in self.all_segments if seg.sender or seg.files}

    def _stream(self, source):
        seg = self.streams.get(source)
        if seg is not None:
            return seg
        if not self.streams:
            seg = self.first
        elif len(self.streams) >= MAX_SENDERS:
            return None
        else:
            stem = self.first.stem
            out = stem.with_name(f"{stem.name}-sender{len(self.streams) + 1}{self.first.suffix}")
            seg = _Segments(out, self.header, **self.options)
            seg.take_free_name = True  # a stale file of an earlier run never ends this one
        seg.sender = _sender_text(source)
        if seg.number == 0:
            seg.open_next()
            if seg.numbered and seg.files:
                self.say(f"record: {out} exists; sender {seg.sender} is recorded to {seg.files[0]}")
        self.streams[source] = seg
        return seg

    def write_item(self, item) -> None:
        """The ``.apx`` sink's writer: a chunk's records and their senders,
        or a list of messages (``--messages``)."""
        with self.lock:
            if isinstance(item, list):
                captured = False
                for message in item:
                    payload = _payload_bytes(message.payload)
                    seg = self._stream(message.address) if _is_readout(payload) else None
                    if seg is not None and seg.write_readout(payload):
                        self.totals.readouts += 1
                    elif seg is None and _is_readout(payload):
                        self.unrecorded += 1
                    else:
                        self._capture(payload, message.address, time.time_ns())
                        captured = True
                if captured and self.first.capture is not None:
                    self.first._named(self.first.capture.flush, self.first.capture_path)
                return
            data, lengths, senders = item
            if len(senders) == 1:
                groups = [(senders[0][0], data, lengths)]
            else:
                ends = np.cumsum(lengths)
                view = memoryview(data)
                groups = []
                for source, index in senders:
                    parts = [view[int(ends[i]) - int(lengths[i]):int(ends[i])] for i in index.tolist()]
                    groups.append((source, b"".join(parts), lengths[index]))
            for source, part, part_lengths in groups:
                seg = self._stream(source)
                if seg is None:
                    self.unrecorded += len(part_lengths)
                    continue
                seg.write_records(part, part_lengths)
                self.totals.readouts += len(part_lengths)

    def capture_item(self, item) -> None:
        """The capture sink's writer: one malformed datagram."""
        payload, source, arrival_ns = item
        with self.lock:
            self._capture(payload, source, arrival_ns)

    def flush_capture(self) -> None:
        with self.lock:
            seg = self.first
            if seg.capture is not None:
                seg._named(seg.capture.flush, seg.capture_path)

    def _capture(self, payload: bytes, source, arrival_ns: int) -> None:
        self.first.write_capture(payload, source, arrival_ns)
        self.totals.captured += 1
        self.totals.captured_bytes += len(payload)

    def close_all(self) -> None:
        """Close every file (the ``.apx`` writer's last act); after a
        failure the flush that fails again is not reported twice."""
        with self.lock:
            error = None
            for seg in self.all_segments:
                try:
                    seg.close()
                except OSError as exc:
                    if not seg.failed and error is None:
                        error = exc
            if error is not None:
                raise error


class _Segments:
    """The output files of one sender: one ``.apx`` (and, when needed, one
    capture file) at a time, rotated by size or age, never replacing an
    existing file (every file is created with ``O_EXCL``; a taken name is
    skipped). An ``OSError`` of a write names the file (``exc.filename``).
    Used under :attr:`_Recorder.lock`."""

    def __init__(self, out: pathlib.Path, header: dict, *, rotate_size: int | None, rotate_time: float | None,
                 fsync: bool) -> None:
        self.out = out
        self.suffix = out.suffix or ".apx"
        self.stem = out.with_suffix("") if out.suffix else out
        self.header = header
        self.rotate_size = rotate_size
        self.rotate_time = rotate_time
        self.rotating = rotate_size is not None or rotate_time is not None
        self.fsync = fsync
        self.number = 0
        self.writer: ApxWriter | None = None
        self.capture = None
        self.capture_path: pathlib.Path | None = None
        self.files: list[str] = []
        self.captures: list[str] = []
        self.bytes_closed = 0
        self.opened_at = 0.0
        self.failed = False
        self.sender: str | None = None  # "host:port", once known (in the headers opened after)
        #: A taken name is skipped (numbered like rotation) instead of failing
        #: (a further sender's files: a stale file must not end the recording).
        self.take_free_name = False
        self.numbered = False

    def _base(self) -> str:
        return f"{self.stem}-{self.number:04d}" if self.rotating or self.numbered else str(self.stem)

    def open_next(self) -> None:
        self.close()
        while True:
            self.number += 1
            path = pathlib.Path(self._base() + self.suffix)
            header = dict(self.header)
            header["recorder"] = dict(header["recorder"], segment=self.number,
                                      segment_start=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                                      sender=self.sender)
            capture = pathlib.Path(self._base() + ".capture")
            if capture == path:  # OUT named STEM.capture: its capture file is STEM.capture.capture
                capture = pathlib.Path(self._base() + self.suffix + ".capture")
            try:
                if capture.exists():  # created later, at the first non-readout payload
                    raise FileExistsError(capture)
                self.writer = self._named(ApxWriter, path, path, header, flush="batch", fsync=self.fsync,
                                          mode="xb", buffer_size=1 << 20)
            except FileExistsError as exc:
                if not self.rotating and not self.numbered and self.take_free_name:
                    self.numbered, self.number = True, 0  # the next free name: STEM-0001.apx, ...
                    continue
                if exc.args and exc.args[0] == capture and not self.rotating and not self.numbered:
                    raise fail(f"{capture}: exists; record never replaces a file") from None
                if not self.rotating and not self.numbered:
                    raise fail(f"{path}: exists; record never replaces a file") from None
                continue  # a name taken (by another recorder?): the next number
            except OSError:
                # The header could not be written (a full disk): no file that
                # holds not even a header is left (O_EXCL: this one is ours).
                try:
                    path.unlink()
                except OSError:
                    pass
                raise
            break
        self.files.append(str(path))
        self.capture_path = capture
        self.opened_at = time.monotonic()

    def close(self) -> None:
        writer, capture = self.writer, self.capture
        self.writer = self.capture = None
        try:
            if writer is not None:
                self.bytes_closed += writer.bytes_written
                self._named(writer.close, writer.path)
        finally:
            if capture is not None:
                self._named(capture.close, capture.name)

    def _named(self, function, path, *args, **kwargs):
        """``function(*args, **kwargs)``; an ``OSError`` names ``path``."""
        try:
            return function(*args, **kwargs)
        except OSError as exc:
            self.failed = True
            if not exc.filename:
                exc.filename = str(path)
            raise

    @property
    def bytes_written(self) -> int:
        current = self.writer.bytes_written if self.writer is not None else 0
        return self.bytes_closed + current

    def _due_by_time(self) -> bool:
        return self.rotate_time is not None and time.monotonic() - self.opened_at >= self.rotate_time

    def write_records(self, data, lengths: np.ndarray) -> None:
        """Write serialized records (back to back in ``data``), rotating
        before a record that would take the file past ``rotate_size``."""
        if self._due_by_time():
            self.open_next()
        view = memoryview(data)
        ends = np.cumsum(lengths)
        start = 0  # index of the first record not yet written
        while start < len(lengths):
            stop = len(lengths)
            if self.rotate_size is not None:
                base = int(ends[start - 1]) if start else 0
                room = self.rotate_size - self.writer.bytes_written
                fits = int(np.searchsorted(ends[start:] - base, room, side="right"))
                if fits == 0:
                    if self.writer.records_written:
                        self.open_next()
                        continue
                    fits = 1  # a record larger than the limit gets a file of its own
                stop = start + fits
            first = int(ends[start - 1]) if start else 0
            # Checked together and written in one call (ApxWriter.write_records).
            self._named(self.writer.write_records, self.writer.path, view[first:int(ends[stop - 1])],
                        lengths[start:stop])
            start = stop

    def write_readout(self, payload: bytes) -> bool:
        """Write ``payload`` if it is a well-formed serialized readout (the
        writer checks); False if it is not (nothing written)."""
        if payload[:3] != b"\xfe\xdc\xba":
            return False
        try:
            self.write_records(payload, np.array([len(payload)], np.int64))
        except MalformedReadout:
            return False
        return True

    def write_capture(self, payload: bytes, address, arrival_ns: int) -> None:
        if self.number == 0:
            self.open_next()
        if self._due_by_time():
            self.open_next()
        if self.capture is None:
            self.capture = self._named(open, self.capture_path, self.capture_path, "xb")
            self.captures.append(str(self.capture_path))
            self._named(self.capture.write, self.capture_path, CAPTURE_MAGIC)
        port, host = _address_bytes(address)
        self._named(self.capture.write, self.capture_path,
                    CAPTURE_HEADER.pack(arrival_ns, len(payload), port, host) + payload)


async def _receive(scope: trio.CancelScope, options: dict, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The receive task, inside ``scope`` (what stops it: a signal, --count,
    --seconds); ``serve_receiver`` closes the channel when it ends."""
    with scope:
        await serve_receiver(**options, task_status=task_status)


async def _timer(seconds: float, scope: trio.CancelScope) -> None:
    await trio.sleep(seconds)
    scope.cancel()


async def _status(every: float, service, segments: _Recorder, disk, capture, log) -> None:
    """A status line on stderr (the ``log`` sink) every ``every`` seconds,
    data or not."""
    while True:
        await trio.sleep(every)
        log.offer(_status_line(service.statistics(), segments, disk.statistics(), capture.statistics()) + "\n")


def _payload_bytes(payload) -> bytes:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    try:
        return json.dumps(strict_json(payload), default=repr).encode()
    except RecursionError:
        return json.dumps(TOO_DEEP).encode()


#: Malformed datagrams (and their bytes) waiting for the capture file; beyond,
#: they are dropped and counted (``capture_dropped``).
CAPTURE_QUEUE = 4096
CAPTURE_QUEUE_BYTES = 16 << 20
#: Receive batches (at most 256 readouts each) between the receive task and
#: the forwarding loop.
HANDOVER_BATCHES = 4
#: Seconds the writers get at exit to write what is queued (a disk that
#: takes longer: the rest is counted as discarded).
CLOSE_TIMEOUT = 30.0
#: Lines (status lines, notes) waiting for standard error; beyond, dropped
#: and counted (``log_dropped``): a stalled stderr never stops the receiver.
LOG_QUEUE = 64


async def _record(network, out, framing, messages, rotate_size, rotate_time, count, seconds, fsync, as_json,
                  queue, status_every, queue_size=16384) -> None:
    header = {"readout_uid": 4000, "recorder": {
        "program": "mcast-trio record", "mcast_trio_version": __version__, "host": socket.gethostname(),
        "group": network.group, "port": network.port, "interface": None if network.interface is None
        else str(network.interface), "source": network.source, "framing": framing, "messages": messages,
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": [os.path.basename(sys.argv[0]) if sys.argv else "mcast-trio", *sys.argv[1:]],
    }}
    segments = _Recorder(out, header, rotate_size=rotate_size, rotate_time=rotate_time, fsync=fsync)
    network_options = network.receiver_options()
    # Batches between the receive task and the forwarding loop: a few at
    # most (the loop never waits, the receiver waits for it): what waits for
    # the disk waits in the writer's queue, bounded by --queue-size.
    send, receive = trio.open_memory_channel(min(queue, HANDOVER_BATCHES))
    rx_scope = trio.CancelScope()
    started = time.monotonic()
    service = None
    taken = 0  # readouts (messages) handed to the .apx writer
    past_count = 0  # readouts received after --count was reached (the receiver stops a batch or so later)
    try:
        # The writers are threads behind bounded queues: the receive task and
        # this task never wait for the disk; a full queue drops and counts.
        async with open_sink(segments.write_item, capacity=queue_size, close=segments.close_all,
                             name="record .apx", close_timeout=CLOSE_TIMEOUT,
                             on_error=lambda exc: rx_scope.cancel()) as disk, \
                open_sink(segments.capture_item, capacity=CAPTURE_QUEUE, max_bytes=CAPTURE_QUEUE_BYTES,
                          flush=segments.flush_capture, name="record capture", close_timeout=CLOSE_TIMEOUT,
                          on_error=lambda exc: rx_scope.cancel()) as capture, \
                open_stderr(LOG_QUEUE) as log:
            # Status lines and notes: stderr is the log, not the output (a
            # stalled or vanished reader neither stops nor ends the recording).
            segments.say = lambda text: log.offer(text + "\n")

            def on_malformed(payload, source) -> None:
                capture.offer((payload, source, time.time_ns()), size=len(payload))

            # overflow="block": the receive task waits for the forwarding loop
            # below (which never waits), so no chunk is lost between them.
            options = dict(group=network.group, port=network.port, send_channel=send, overflow="block",
                           readout_class=None if messages else AstroPix4Readout,
                           framing=framing, on_malformed=on_malformed, **network_options)
            async with trio.open_nursery() as nursery:
                await nursery.start(stop_on_signals, rx_scope)
                service = await nursery.start(_receive, rx_scope, options)
                segments.ensure_open()  # the header, once the group is joined: scripts wait for it
                log.offer(f"recording {network.group}:{network.port} to {segments.files[0]}\n")
                if seconds is not None:
                    nursery.start_soon(_timer, seconds, rx_scope)
                if status_every:
                    nursery.start_soon(_status, status_every, service, segments, disk, capture, log)
                async with receive:
                    async for item in receive:
                        if count is not None and taken >= count:
                            # drained and discarded: --count readouts are taken
                            past_count += len(item.lengths) if isinstance(item, ReadoutChunk) else \
                                sum(1 for message in item if _is_readout(message.payload))
                            continue
                        if isinstance(item, ReadoutChunk):
                            senders = item.by_source()
                            lengths = item.lengths
                            if count is not None and taken + len(lengths) >= count:
                                lengths = lengths[:count - taken]
                                rx_scope.cancel()
                            data = item.data if len(lengths) == len(item.lengths) else \
                                memoryview(item.data)[:int(lengths.sum())]
                            if len(lengths) < len(item.lengths):  # --count reached
                                senders = [(source, None if index is None else index[index < len(lengths)])
                                           for source, index in senders]
                                senders = [g for g in senders if g[1] is None or len(g[1])] if len(senders) > 1 \
                                    else senders
                            past_count += len(item.lengths) - len(lengths)
                            disk.offer((data, lengths, senders), weight=len(lengths))
                            taken += len(lengths)
                        else:
                            # Messages: --count counts those that are readouts.
                            n = 0
                            for k, message in enumerate(item):
                                if _is_readout(message.payload):
                                    n += 1
                                    if count is not None and taken + n >= count:
                                        item = item[:k + 1]
                                        rx_scope.cancel()
                                        break
                            disk.offer(item, weight=len(item))
                            taken += n
                nursery.cancel_scope.cancel()  # the signal listener, the status lines
    finally:
        if service is None:
            segments.close_all()
    elapsed = time.monotonic() - started
    disk_stats, capture_stats, log_stats = disk.statistics(), capture.statistics(), log.statistics()
    segments.say = lambda text: click.echo(text, err=True)
    _summary(service.statistics(), segments, disk_stats, capture_stats, elapsed, as_json,
             log_stats.dropped + log_stats.discarded + stderr_dropped(), past_count)
    error = disk.error or capture.error
    if error is not None:
        if isinstance(error, OSError):
            where = error.filename or segments.files[-1]
            text = error.strerror or str(error)
            raise fail(f"{where}: {text}; recording stopped, the summary above counts what was written")
        raise error


def _is_readout(payload) -> bool:
    """Whether ``payload`` is a well-formed serialized readout (as the
    ``.apx`` writer checks it)."""
    return (isinstance(payload, (bytes, bytearray, memoryview)) and bytes(payload[:3]) == b"\xfe\xdc\xba"
            and parse_readout_header(bytes(payload))[0] == 0)


def _status_line(stats, segments: _Recorder, disk, capture) -> str:
    return (f"{segments.totals.readouts} readouts written, {segments.bytes_written} bytes, "
            f"{len(segments.files)} files; received {stats.readouts}, taken {disk.offered}, queued {disk.queued}, "
            f"queue dropped {disk.dropped}, capture dropped {capture.dropped}; lost {stats.lost}, "
            f"malformed {stats.malformed}, dropped {stats.dropped}")


def _summary(stats, segments: _Recorder, disk, capture, elapsed: float, as_json: bool, log_dropped: int = 0,
             past_count: int = 0) -> None:
    totals = segments.totals
    summary = {
        "readouts_written": totals.readouts,
        "bytes_written": segments.bytes_written,
        "files": segments.files,
        "senders": segments.senders(),
        "unrecorded": segments.unrecorded,
        "captured": totals.captured,
        "captured_bytes": totals.captured_bytes,
        "capture_files": segments.captures,
        "seconds": round(elapsed, 6),
        "datagrams": stats.datagrams,
        "bytes": stats.bytes,
        "readouts": stats.readouts,
        "messages": stats.messages,
        "hits": stats.hits,
        "lost": stats.lost,
        "duplicates": stats.duplicates,
        "reordered": stats.reordered,
        "restarts": stats.restarts,
        "malformed": stats.malformed,
        "truncated": stats.truncated,
        "dropped": stats.dropped,
        "kernel_drops": stats.kernel_drops,
        "discarded": stats.discarded,
        "queue_dropped": disk.dropped,
        "queue_discarded": disk.discarded,
        "queue_peak": disk.peak,
        "capture_dropped": capture.dropped,
        "capture_discarded": capture.discarded,
        "log_dropped": log_dropped,
        "past_count": past_count,
        "write_error": disk.error or capture.error,
        "last_error": stats.last_error,
    }
    if as_json:
        emit_json(summary)
        return
    rate = totals.readouts / elapsed if elapsed > 0 else 0.0
    click.echo(
        f"recorded {totals.readouts} readouts ({stats.hits} hits), {segments.bytes_written} bytes in "
        f"{len(segments.files)} file(s) in {elapsed:.1f} s ({rate:.0f} readouts/s); received "
        f"{stats.datagrams} datagrams; lost {stats.lost}, malformed {stats.malformed}, dropped {stats.dropped}, "
        f"kernel drops {stats.kernel_drops}, discarded at close {stats.discarded}, queue dropped {disk.dropped} (the disk did not keep up), "
        f"discarded {disk.discarded}, captured {totals.captured}, capture dropped {capture.dropped}", err=True)
    several = len(segments.streams) > 1
    for seg in segments.all_segments:
        for name in seg.files:
            click.echo(f"  {name}" + (f" (sender {seg.sender})" if several else ""), err=True)
    for name in segments.captures:
        click.echo(f"  {name}", err=True)
    if past_count:
        click.echo(f"  {past_count} readouts received after --count was reached, not recorded", err=True)
    if log_dropped:
        click.echo(f"  {log_dropped} status lines or notes not printed (standard error did not take them)",
                   err=True)
    if segments.unrecorded:
        click.echo(f"  {segments.unrecorded} readouts of senders past the first {MAX_SENDERS} not recorded",
                   err=True)


@click.command()
@click.argument("out", type=OutputFile(), metavar="OUT.apx")
@network_options()
@click.option("--framing", type=click.Choice(["raw", "native", "mcl", "auto"]), default="raw", show_default=True,
              help="How datagrams are framed (raw: astropix-analysis' readouts as they are).")
@click.option("--messages", is_flag=True,
              help="Receive messages, not readouts: readout payloads go to the .apx, anything else (and "
                   "malformed datagrams, with --framing raw) to STEM.capture.")
@click.option("--rotate-size", type=ByteSize(), default=None, metavar="SIZE",
              help="Start a new file before one would grow past SIZE (100MB, 1GB, 512MiB, bytes).")
@click.option("--rotate-time", type=SECONDS, default=None, metavar="SECONDS",
              help="Start a new file with the first readout after SECONDS.")
@click.option("--count", "-n", type=COUNT, default=None, help="Stop after N readouts.")
@click.option("--seconds", "-t", type=SECONDS, default=None,
              help="Stop after SECONDS.")
@click.option("--fsync", is_flag=True, help="fsync after every written batch (power-loss safe, slower).")
@click.option("--queue", type=QUEUE, default=1024, show_default=True,
              help="Receive batches handed over from the receiver at once (at most 4 are used: what "
                   "waits for the disk waits in the writer's queue, --queue-size).")
@click.option("--queue-size", type=Number(1, 1 << 24, integer=True), default=16384, show_default=True,
              metavar="N",
              help="Readouts waiting for the disk at most (one receive batch, up to 256, when N is "
                   "smaller); beyond, they are dropped and counted (queue dropped). A killed recorder "
                   "(SIGKILL) loses at most these, plus the 4 receive batches (of at most 256) being "
                   "handed over.")
@click.option("--status", "status_every", type=SECONDS_OR_NEVER, default=0, metavar="SECONDS",
              help="Print a status line on stderr every SECONDS (0: never).")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as one JSON line on stdout.")
def record(network, out, framing, messages, rotate_size, rotate_time, count, seconds, fsync, queue, queue_size,
           status_every, as_json) -> None:
    """Record what arrives to OUT.apx, until Ctrl-C, SIGTERM, --count or --seconds.

    Readouts are written exactly as received (an .apx file astropix-analysis
    reads), with the run in the header (key "recorder": group, port, host,
    start time, mcast_trio version, command line, segment number). With
    --rotate-size/--rotate-time the files are OUT-0001.apx, OUT-0002.apx, ...
    An existing file is never replaced: without rotation OUT.apx must not
    exist; with rotation a taken name is skipped. Malformed datagrams (and,
    with --messages, every payload that is not a readout) are counted and
    kept in OUT.capture (8 bytes MCTCAP01, then per datagram: u64 arrival
    ns, u32 length, u16 source port, 16-byte source address (IPv4 as
    ::ffff:a.b.c.d), all little-endian, then the payload).

    Each sender's readouts go to files of their own: the first sender's to
    OUT.apx, a second sender's to OUT-sender2.apx, and so on (the sender is
    in each later file's header and in the summary), so that each file
    decodes correctly.

    The receiver never waits for the disk: at most --queue-size readouts
    wait to be written; beyond, they are dropped and counted (queue
    dropped). That, plus at most 4 receive batches (up to 256 readouts
    each) being handed over, is the most a killed recorder (SIGKILL) loses;
    with --fsync, the most a power loss loses.

    On Ctrl-C or SIGTERM the recorder stops receiving, writes every readout
    already received, closes the file and exits 0. The summary (readouts,
    hits, bytes, files, lost, malformed, dropped, queue dropped) goes to
    stderr, or to stdout with --json. A write error (a full disk) stops
    the recording: summary, then one line naming the file, exit 1.

    \b
    Examples:
      mcast-trio record run.apx
      mcast-trio record run.apx --rotate-size 1GB --rotate-time 3600
      mcast-trio record run.apx -g 127.0.0.1:5007 --seconds 60 --json
      mcast-trio record run.apx --messages --framing native  # framed messages
    """
    if str(out) == "-" or (out.exists() and not out.is_file()):  # not OUT.apx beside it (-.apx, /dev/null.apx)
        raise click.BadParameter(f"{str(out)!r} is not a file to write; record writes .apx files",
                                 param_hint="'OUT.apx'")
    out = out if out.suffix else out.with_suffix(".apx")
    if rotate_size is None and rotate_time is None and out.exists():
        raise fail(f"{out}: exists; record never replaces a file")
    parent = out.parent if str(out.parent) else pathlib.Path(".")
    if not parent.is_dir():
        raise fail(f"{parent}: no such directory")
    run(functools.partial(_record, network, out, framing, messages, rotate_size, rotate_time, count, seconds,
                          fsync, as_json, queue, status_every, queue_size))


COMMANDS = [record]
