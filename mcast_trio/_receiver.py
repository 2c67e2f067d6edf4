"""The multicast receiver: a trio task that drains the socket in batches,
decodes in batches, and hands results to consumers through a bounded memory
channel without ever waiting for them.

The receive task (:func:`serve_receiver`) never blocks on its consumer: it
uses ``send_nowait`` and applies the overflow policy when the channel is full,
counting every datagram it drops. It drains the socket with non-blocking
``recvmmsg`` calls until the socket is empty, then waits with
``trio.lowlevel.wait_readable``; caps per wake-up, on datagrams
(``max_per_wake``) and on elapsed time (``max_busy``), plus a checkpoint keep a
socket that never empties, or datagrams that are slow to handle, from starving
other tasks.

Items in the channel are *chunks*, one per receive batch: decoded readouts
(:class:`DecodedBatch` plus the bytes) in readout mode, lists of
:class:`Message` otherwise. :class:`MulticastReceiver` turns them back into
single readouts or messages for ``async for`` and ``receive()``, or hands the
decoded batches to ``batches()``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, AsyncIterator, Mapping

import numpy as np
import trio

from ._io import _batchio, _sockets
from ._io._net import current_network
from ._batch import CARRY_MODES, DecodedBatch, decode_readouts, decode_trusted
from ._errors import MalformedFrame, unwrap_single
from ._format import readout_id_of
from ._protocol import _kernels
from ._protocol._framing import Message, MclDecoder, NativeDecoder, ReassemblyStats, make_filter, parse_header
from ._protocol._tracking import SenderStats, SenderTable

__all__ = [
    "MulticastReceiver",
    "ReceiverService",
    "ReceiverStatistics",
    "OVERFLOW_POLICIES",
    "open_receiver",
    "serve_receiver",
]

#: What the receive task does when the consumer's channel is full.
OVERFLOW_POLICIES = ("drop_oldest", "drop_newest", "block")
_FRAMINGS = ("raw", "native", "mcl")


@dataclass(frozen=True)
class ReceiverStatistics:
    """A snapshot of a receiver's counters (``statistics()``).

    Attributes:
        datagrams: datagrams received from the socket.
        bytes: their bytes.
        readouts: well-formed readouts decoded (readout mode).
        hits: hits decoded (readout mode).
        messages: complete messages delivered or queued (message mode).
        malformed: datagrams that could not be parsed (bad readout or frame).
        truncated: datagrams larger than the receive slot (``MSG_TRUNC``).
        filtered: datagrams or messages rejected by topics / filter.
        dropped: datagrams (readout mode) or messages dropped because the
            consumer's channel was full (overflow policy).
        dropped_chunks: channel items dropped.
        kernel_drops: datagrams the kernel dropped for lack of buffer space
            (``SO_RXQ_OVFL``): 0 from the start where the OS reports it
            (Linux), None only where it does not.
        lost: sum over ``senders``.
        duplicates: sum over ``senders``.
        reordered: sum over ``senders``.
        restarts: sum over ``senders``.
        senders: per-sender :class:`SenderStats`, keyed by source address
            ``(host, port)`` (raw readouts: by readout id) or
            ``(host, port, sender_id)`` (native framing: by sequence number).
        reassembly: fragment reassembly counters (framed modes) or None.
        rcvbuf: receive buffer size the kernel granted.
        last_error: what was wrong with the last malformed or truncated
            datagram, or None.
    """

    datagrams: int = 0
    bytes: int = 0
    readouts: int = 0
    hits: int = 0
    messages: int = 0
    malformed: int = 0
    truncated: int = 0
    filtered: int = 0
    dropped: int = 0
    dropped_chunks: int = 0
    kernel_drops: int | None = None
    lost: int = 0
    duplicates: int = 0
    reordered: int = 0
    restarts: int = 0
    senders: Mapping[Any, SenderStats] = field(default_factory=dict)
    reassembly: ReassemblyStats | None = None
    rcvbuf: int = 0
    last_error: str | None = None


class _ReadoutChunk:
    """One receive batch in readout mode."""

    __slots__ = ("data", "lengths", "batch")

    def __init__(self, data: bytes, lengths: np.ndarray, batch: DecodedBatch) -> None:
        self.data = data
        self.lengths = lengths
        self.batch = batch

    def size(self) -> int:
        return len(self.lengths)


def _well_formed(decoded: DecodedBatch, keep: np.ndarray) -> DecodedBatch:
    """``decoded`` with only the rows at indices ``keep`` (its well-formed
    ones).

    Malformed rows own no hits, so the ``first_hit``/``n_hits`` slices of the
    rows kept still index ``hits``; ``errors`` is emptied (its indices were
    rows of the full batch; the receiver counts them in its statistics).
    ``take`` with indices: several times faster than a boolean mask on a
    record array.
    """
    return DecodedBatch(hits=decoded.hits, readouts=decoded.readouts.take(keep), errors=(),
                        extra_bytes=decoded.extra_bytes, last_id=decoded.last_id,
                        backend=decoded.backend)


def _chunk_size(chunk) -> int:
    return chunk.size() if isinstance(chunk, _ReadoutChunk) else len(chunk)


class ReceiverService:
    """The state of one running receive task; :func:`serve_receiver` passes it
    to ``task_status.started()``.

    Its counters are updated by the receive task only; :meth:`statistics`
    takes a consistent snapshot (trio runs one task at a time).
    """

    def __init__(self, config: "_Config", send_channel, drop_channel=None) -> None:
        self.config = config
        self.spec = config.spec
        self._send = send_channel
        self._drop = drop_channel
        self._datagrams = 0
        self._bytes = 0
        self._readouts = 0
        self._hits = 0
        self._messages = 0
        self._malformed = 0
        self._truncated = 0
        self._filtered = 0
        self._dropped = 0
        self._dropped_chunks = 0
        self._kernel_drops: int | None = None
        self._rcvbuf = 0
        self._last_error: str | None = None
        self._senders: SenderTable = SenderTable(max_senders=config.max_senders, window=config.loss_window)
        self._extra: bytes | None = None
        self._last_id = -1
        self._decoder = None
        if config.framing == "native":
            self._decoder = NativeDecoder(config.topics, on_restart=self._sender_restarted,
                                          **config.reassembly)
        elif config.framing == "mcl":
            self._decoder = MclDecoder(**config.reassembly)
        # Topics are decided from the native header; the rest here.
        self._accept = make_filter(None if config.framing == "native" else config.topics, config.filter)
        self._accept_all = config.filter is None and (config.topics is None or config.framing == "native")
        self.joined = trio.Event()
        # Whether chunks carry the datagram bytes (consumers of single
        # readouts need them; receive_batch()/batches() consumers do not).
        self.want_bytes = True
        self._same_source = False
        # Time budget per wake-up (time.perf_counter(): the real time the
        # receive task holds the loop, which a virtual trio clock does not see).
        self._max_busy = config.max_busy
        self._busy_since = 0.0

    def _sender_restarted(self, source, sender_id: int) -> None:
        # The reassembler saw this sender start over (same address and
        # sender_id, new messages under old sequence numbers): its loss
        # accounting starts over too, rather than counting the new run as
        # duplicates of the old one.
        self._senders.restart((*source, sender_id))

    # -- snapshot ------------------------------------------------------------

    def statistics(self) -> ReceiverStatistics:
        senders = self._senders.snapshot()
        return ReceiverStatistics(
            datagrams=self._datagrams,
            bytes=self._bytes,
            readouts=self._readouts,
            hits=self._hits,
            messages=self._messages,
            malformed=self._malformed,
            truncated=self._truncated,
            filtered=self._filtered + (self._decoder.filtered if isinstance(self._decoder, NativeDecoder) else 0),
            dropped=self._dropped,
            dropped_chunks=self._dropped_chunks,
            kernel_drops=self._kernel_drops,
            lost=sum(s.lost for s in senders.values()),
            duplicates=sum(s.duplicates for s in senders.values()),
            reordered=sum(s.reordered for s in senders.values()),
            restarts=sum(s.restarts for s in senders.values()),
            senders=MappingProxyType(senders),
            reassembly=self._decoder.stats if self._decoder is not None else None,
            rcvbuf=self._rcvbuf,
            last_error=self._last_error,
        )

    # -- the receive loop ----------------------------------------------------

    async def _pause(self) -> None:
        """Checkpoint (let other tasks run) and start a new time budget."""
        await trio.lowlevel.checkpoint()
        self._busy_since = time.perf_counter()

    async def _run(self, endpoint, task_status) -> None:
        config = self.config
        batch = _batchio.ReceiveBatch(config.batch_size, config.max_datagram_size)
        receive_batch = endpoint.receive_batch
        readout_mode = config.readout_class is not None
        max_per_wake = config.max_per_wake
        max_busy = self._max_busy
        perf_counter = time.perf_counter
        # 0 where the OS counts kernel drops, None only where it does not.
        self._kernel_drops = endpoint.kernel_drops(batch)
        self.joined.set()
        task_status.started(self)
        while True:
            received = 0
            self._busy_since = perf_counter()
            while True:
                n = receive_batch(batch)
                if n == 0:
                    break
                self._account(batch, n, endpoint)
                if readout_mode and config.framing == "raw":
                    await self._readout_batch(batch, n)
                else:
                    await self._message_batch(batch, n)
                received += n
                if received >= max_per_wake or perf_counter() - self._busy_since >= max_busy:
                    # The socket never empties, or its datagrams are slow to
                    # handle: let other tasks run.
                    await self._pause()
                    received = 0
            decoder = self._decoder
            if decoder is not None:
                decoder.expire(trio.current_time())
                if decoder.stats.pending:
                    # Wake up in time to expire incomplete messages even if
                    # nothing else arrives.
                    with trio.move_on_after(config.reassembly["timeout"] / 4):
                        await endpoint.wait_readable()
                    continue
            await endpoint.wait_readable()

    def _account(self, batch, n: int, endpoint) -> None:
        total, truncated, self._same_source = _kernels.batch_summary(
            batch.lengths, batch.truncated.view(np.uint8), batch._families, batch._addresses,
            batch._ports, n)
        self._datagrams += n
        self._bytes += total
        if truncated:
            self._truncated += truncated
            self._last_error = (f"a datagram longer than max_datagram_size={batch.slot_size}"
                                " bytes was truncated and skipped")
        drops = endpoint.kernel_drops(batch)
        if drops is not None:
            self._kernel_drops = drops

    @staticmethod
    def _source(batch, i: int) -> tuple:
        source = batch.source(i)
        # Loss is tracked per (host, port); IPv6 sources keep their scope.
        return source[:2] if source is not None and len(source) == 2 else source

    @staticmethod
    def _single_source(batch, positions) -> bool:
        """True if every datagram at ``positions`` came from the same address."""
        if len(positions) < 2:
            return True
        first = positions[0]
        addresses = batch._addresses[positions]
        return bool((addresses == batch._addresses[first]).all()
                    and (batch._ports[positions] == batch._ports[first]).all()
                    and (batch._families[positions] == batch._families[first]).all())

    async def _readout_batch(self, batch, n: int) -> None:
        offsets = batch.offsets[:n]
        lengths = batch.lengths[:n]
        keep = batch.truncated[:n] == 0
        rejected = None  # (position, readout id) of readouts the filter rejected
        if not self._accept_all:
            view = memoryview(batch.buffer)
            rejected = []
            perf_counter = time.perf_counter
            max_busy = self._max_busy
            for i in range(n):
                if not keep[i]:
                    continue
                if perf_counter() - self._busy_since >= max_busy:
                    # A slow filter: yield between datagrams, not only
                    # between batches.
                    await self._pause()
                payload = view[offsets[i]:offsets[i] + lengths[i]].tobytes()
                if not self._accept(None, payload, self._source(batch, i)):
                    keep[i] = False
                    self._filtered += 1
                    rid = readout_id_of(payload)
                    if rid is not None:
                        rejected.append((i, rid))
        if not keep.all():
            offsets = offsets[keep]
            lengths = lengths[keep]
            index = np.flatnonzero(keep)
        else:
            index = None
        if len(lengths) == 0:
            if rejected:
                self._track_pairs(batch, rejected)
            return
        decoded = decode_trusted(batch.buffer, offsets, lengths, self._extra, self._last_id,
                                 CARRY_MODES["consecutive"])
        self._extra = decoded.extra_bytes
        self._last_id = decoded.last_id
        rows = decoded.readouts
        if decoded.errors:
            self._malformed += len(decoded.errors)
            self._last_error = decoded.errors[-1][1]
            good = ~rows.malformed
        else:
            good = None
        self._readouts += len(rows) - len(decoded.errors)
        self._hits += len(decoded.hits)
        self._track_readouts(batch, rows, good, index, rejected)
        if good is not None:
            # Malformed datagrams are counted, never delivered.
            keep = np.flatnonzero(good)
            if len(keep) == 0:
                return
            offsets = offsets.take(keep)
            lengths = lengths.take(keep)
            decoded = _well_formed(decoded, keep)
        # The bytes are kept only for consumers of single readouts
        # (receive()/async for); batches() consumers need the decoded batch.
        data = _kernels.gather(batch.buffer, offsets, lengths) if self.want_bytes else None
        await self._deliver(_ReadoutChunk(data, lengths.copy(), decoded))

    def _track_readouts(self, batch, rows, good, index, rejected=None) -> None:
        ids = rows.readout_id if good is None else rows.readout_id[good]
        positions = np.arange(len(rows)) if good is None else np.flatnonzero(good)
        if index is not None:
            positions = index[positions]
        if rejected:
            # Readouts a filter rejected were received all the same: they are
            # no loss. Account for them in arrival order with the others.
            self._track_pairs(batch, sorted([*zip(positions.tolist(), ids.tolist()), *rejected]))
            return
        if len(ids) == 0:
            return
        first = int(positions[0])
        if self._same_source or self._single_source(batch, positions):
            tracker = self._senders.tracker(self._source(batch, first))
            tracker.observe_many(ids)
            return
        self._track_pairs(batch, zip(positions.tolist(), ids.tolist()))

    def _track_pairs(self, batch, pairs) -> None:
        for pos, rid in pairs:
            self._senders.observe(self._source(batch, pos), rid)

    async def _message_batch(self, batch, n: int) -> None:
        config = self.config
        view = memoryview(batch.buffer)
        offsets = batch.offsets
        lengths = batch.lengths
        truncated = batch.truncated
        decoder = self._decoder
        native = isinstance(decoder, NativeDecoder)
        now = trio.current_time()
        perf_counter = time.perf_counter
        max_busy = self._max_busy
        out: list[Message] = []
        for i in range(n):
            if truncated[i]:
                continue
            if perf_counter() - self._busy_since >= max_busy:
                # Datagrams slow to parse (an MCL "array bomb") or a slow
                # filter: yield between datagrams, not only between batches.
                await self._pause()
                now = trio.current_time()
            datagram = view[offsets[i]:offsets[i] + lengths[i]]
            source = self._source(batch, i)
            if decoder is None:
                message = Message(None, bytes(datagram), source)
            else:
                filtered = decoder.filtered
                try:
                    message = decoder.feed(datagram, source, now)
                except MalformedFrame as exc:
                    self._malformed += 1
                    self._last_error = str(exc)
                    continue
                if message is None:
                    if native and decoder.filtered != filtered:
                        # Rejected by topic, but received: not a loss.
                        header = parse_header(datagram)
                        if header.index == 0:
                            self._senders.observe((*source, header.sender_id), header.sequence)
                    continue
                if message.sender_id is not None:
                    self._senders.observe((*source, message.sender_id), message.sequence)
                elif config.readout_class is not None and type(message.payload) is not bytes:
                    # An MCL payload that is an object (dict, int...), not a readout.
                    self._malformed += 1
                    self._last_error = (f"MCL payload is {type(message.payload).__name__}, "
                                        f"expected a serialized readout (bytes)")
                    continue
            if not self._accept_all and not self._accept(message.topic, message.payload, source):
                self._filtered += 1
                continue
            out.append(message)
        if not out:
            return
        self._messages += len(out)
        if config.readout_class is not None:
            # Framed readouts: decode the payloads of this batch together.
            decoded = decode_readouts([m.payload for m in out], extra_bytes=self._extra,
                                      last_id=self._last_id, carry="consecutive")
            self._extra = decoded.extra_bytes
            self._last_id = decoded.last_id
            self._malformed += len(decoded.errors)
            self._readouts += len(decoded.readouts) - len(decoded.errors)
            self._hits += len(decoded.hits)
            if decoded.errors:
                self._last_error = decoded.errors[-1][1]
                # Malformed readouts are counted, never delivered.
                keep = np.flatnonzero(~decoded.readouts.malformed)
                if len(keep) == 0:
                    return
                out = [out[k] for k in keep.tolist()]
                decoded = _well_formed(decoded, keep)
            lengths = np.fromiter((len(m.payload) for m in out), dtype=np.int64, count=len(out))
            await self._deliver(_ReadoutChunk(b"".join(m.payload for m in out), lengths, decoded))
        else:
            await self._deliver(out)

    async def _deliver(self, chunk) -> None:
        policy = self.config.overflow
        send = self._send
        try:
            send.send_nowait(chunk)
            state = send.statistics()
            if state.current_buffer_used * 2 > state.max_buffer_size:
                # The consumer is falling behind while the socket keeps
                # delivering: let it run now rather than after max_per_wake
                # datagrams, or the overflow policy drops what it could have
                # handled.
                await self._pause()
            return
        except trio.WouldBlock:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # Nobody listens any more: count what is thrown away.
            self._dropped += _chunk_size(chunk)
            self._dropped_chunks += 1
            return
        if policy == "block":
            try:
                await send.send(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The consumer went away while we waited for it.
                self._dropped += _chunk_size(chunk)
                self._dropped_chunks += 1
        elif policy == "drop_newest":
            self._dropped += _chunk_size(chunk)
            self._dropped_chunks += 1
        else:  # drop_oldest
            while True:
                try:
                    oldest = self._drop.receive_nowait()
                except trio.WouldBlock:
                    pass
                else:
                    self._dropped += _chunk_size(oldest)
                    self._dropped_chunks += 1
                try:
                    send.send_nowait(chunk)
                    return
                except trio.WouldBlock:
                    continue


@dataclass(frozen=True)
class _Config:
    spec: Any
    readout_class: Any
    framing: str
    topics: Any
    filter: Any
    overflow: str
    batch_size: int
    max_datagram_size: int
    max_per_wake: int
    max_busy: float
    rcvbuf: int | None
    max_senders: int
    loss_window: int
    reassembly: dict
    network: Any


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} is out of range; allowed: an integer in {low}..{high}")
    return value


def _configure(
    group, port, readout_class=None, *, interface=None, source=None, framing=None, topics=None,
    filter=None, overflow="drop_oldest", batch_size=256, max_datagram_size=65535,
    max_per_wake=4096, max_busy=0.005, rcvbuf=_sockets.DEFAULT_RCVBUF, max_senders=64, loss_window=1024,
    reassembly_timeout=2.0, max_pending_messages=256, max_reassembly_bytes=32 << 20, network=None,
    allow_unicast=False, allow_control_groups=False,
) -> _Config:
    """Validate every receiver argument; raises before anything is opened."""
    spec = _sockets.resolve_group(group, port, interface=interface, source=source,
                                  allow_unicast=allow_unicast, allow_control_groups=allow_control_groups)
    if framing is None:
        framing = "raw" if readout_class is not None else "native"
    if framing not in _FRAMINGS:
        raise ValueError(f"framing={framing!r} is not a framing; allowed: {', '.join(map(repr, _FRAMINGS))}")
    if readout_class is not None and not hasattr(readout_class, "from_bytes"):
        raise TypeError(f"readout_class={readout_class!r} must be a readout class with from_bytes()")
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow={overflow!r} is not an overflow policy; allowed: "
                         f"{', '.join(map(repr, OVERFLOW_POLICIES))}")
    if framing == "raw" and topics is not None:
        raise ValueError("topics= needs a framed mode (framing='native' or 'mcl'); raw datagrams carry no topic")
    make_filter(topics if framing != "raw" else None, filter)  # validates both
    _check_int("batch_size", batch_size, 1, 1024)
    _check_int("max_datagram_size", max_datagram_size, 64, 65535)
    _check_int("max_per_wake", max_per_wake, 1, 1 << 30)
    if isinstance(max_busy, bool) or not isinstance(max_busy, (int, float)):
        raise TypeError(f"max_busy={max_busy!r} is not a number; allowed: seconds in 0..1")
    if not (math.isfinite(max_busy) and 0 <= max_busy <= 1):
        raise ValueError(f"max_busy={max_busy!r} is out of range; allowed: seconds in 0..1")
    if rcvbuf is not None:
        rcvbuf = _sockets._check_bufsize("rcvbuf", rcvbuf)
    _check_int("max_senders", max_senders, 1, 1 << 20)
    _check_int("loss_window", loss_window, 1, 1 << 16)
    if framing == "mcl":
        _sockets_msgpack_check()
    reassembly = dict(timeout=reassembly_timeout, max_messages=max_pending_messages,
                      max_bytes=max_reassembly_bytes)
    if framing == "native":
        NativeDecoder(topics, **reassembly)  # validates the bounds
    elif framing == "mcl":
        MclDecoder(**reassembly)
    if network is None:
        network = current_network()
    return _Config(spec, readout_class, framing, topics, filter, overflow, batch_size, max_datagram_size,
                   max_per_wake, float(max_busy), rcvbuf, max_senders, loss_window, reassembly, network)


def _sockets_msgpack_check() -> None:
    from ._protocol._framing import _msgpack

    _msgpack()


async def serve_receiver(group, port, send_channel, readout_class=None, *, drop_channel=None,
                         task_status=trio.TASK_STATUS_IGNORED, **options) -> None:
    """Run a receive task until cancelled: join ``group``:``port`` and send
    chunks of received items into ``send_channel``.

    Meant for ``await nursery.start(serve_receiver, group, port, send_channel)``;
    ``task_status.started()`` is called with a :class:`ReceiverService` once the
    socket is bound and the group joined. Takes the same options as
    :func:`open_receiver`. The overflow policy ``"drop_oldest"`` needs
    ``drop_channel``, a clone of the receive side of ``send_channel``.

    It opens no nursery of its own, so its exceptions are never wrapped by
    it: an invalid argument, or an error from opening the socket (e.g. the
    port is held by a socket without ``SO_REUSEADDR``), is raised as itself
    by ``nursery.start()``. What fails after it started travels through your
    nursery, which groups it as trio nurseries do.

    Cancellation: on cancellation (its only way to stop) the group is left,
    the socket closed and ``send_channel`` closed, so consumers see the end of
    the channel.
    """
    config = options.pop("_config", None) or _configure(group, port, readout_class, **options)
    if config.overflow == "drop_oldest" and drop_channel is None:
        raise ValueError("overflow='drop_oldest' needs drop_channel= (a clone of the receive side of "
                         "send_channel); or use overflow='drop_newest'")
    service = ReceiverService(config, send_channel, drop_channel)
    # A plain ``with``: ``async with`` would checkpoint on the way out, and a
    # cancellation arriving then would replace (and so hide) the exception
    # the receive task is failing with.
    with send_channel:
        endpoint = config.network.open_receiver(config.spec, rcvbuf=config.rcvbuf)
        try:
            service._rcvbuf = endpoint.granted_rcvbuf
            await service._run(endpoint, task_status)
        finally:
            endpoint.close()
            if drop_channel is not None:
                drop_channel.close()


async def _next_chunk(channel):
    """The next chunk of ``channel``, without a schedule point when one is
    queued (still a cancellation point).

    The receive task queues up to ``max_per_wake / batch_size`` chunks per
    turn; a consumer that took one chunk per turn would fall behind by that
    factor and the overflow policy would drop the rest.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        return channel.receive_nowait()
    except trio.WouldBlock:
        return await channel.receive()


class MulticastReceiver:
    """The consumer side of a receiver; made by :func:`open_receiver`.

    An async iterable of readouts (with a ``readout_class``) or of
    :class:`Message` objects; or use :meth:`batches` for decoded numpy
    batches. Use one style per receiver.
    """

    def __init__(self, service: ReceiverService, receive_channel) -> None:
        self._service = service
        self._channel = receive_channel
        self._pending: deque = deque()

    @property
    def group(self):
        """The resolved group the receiver joined."""
        return self._service.spec

    def statistics(self) -> ReceiverStatistics:
        """A frozen snapshot of the counters (see :class:`ReceiverStatistics`)."""
        return self._service.statistics()

    def _items(self, chunk) -> list:
        if isinstance(chunk, _ReadoutChunk):
            if chunk.data is None:
                raise RuntimeError("receive() after receive_batch()/batches(): use one style per receiver")
            # A chunk holds well-formed readouts only (malformed ones were
            # counted by the receive task).
            from_bytes = self._service.config.readout_class.from_bytes
            view = memoryview(chunk.data)
            items = []
            start = 0
            for length in chunk.lengths.tolist():
                items.append(from_bytes(view[start:start + length]))
                start += length
            return items
        return chunk

    async def receive(self):
        """Return the next readout (or :class:`Message`).

        Raises:
            trio.EndOfChannel: the receive task has stopped and everything it
                delivered was received.
            trio.ClosedResourceError: the ``open_receiver`` block was left.

        Cancellation: safe; nothing is lost when cancelled while waiting.
        """
        while not self._pending:
            chunk = await _next_chunk(self._channel)
            self._pending.extend(self._items(chunk))
        return self._pending.popleft()

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while True:
            try:
                item = await self.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            yield item

    async def receive_batch(self) -> DecodedBatch:
        """Return the next :class:`DecodedBatch` (readout mode): the readouts
        of one receive batch, decoded together.

        Raises:
            trio.EndOfChannel: the receive task has stopped and everything it
                delivered was received.
            trio.ClosedResourceError: the ``open_receiver`` block was left.
            TypeError: the receiver has no ``readout_class``.

        Cancellation: safe; a batch is never lost by cancelling the wait.
        """
        if self._service.config.readout_class is None:
            raise TypeError("receive_batch() needs a receiver opened with readout_class=")
        if self._pending:
            raise RuntimeError("receive_batch() after receive(): use one style per receiver")
        self._service.want_bytes = False
        chunk = await _next_chunk(self._channel)
        return chunk.batch

    async def batches(self) -> AsyncIterator[DecodedBatch]:
        """Yield one :class:`DecodedBatch` per receive batch (readout mode),
        until the receiver is closed.

        Cancellation: as :meth:`receive_batch`, between batches.
        """
        while True:
            try:
                batch = await self.receive_batch()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            yield batch


@asynccontextmanager
async def open_receiver(group, port, readout_class=None, *, queue_size: int = 256,
                        **options) -> AsyncIterator[MulticastReceiver]:
    """Join a multicast group and receive from it in a background task.

    Args:
        group: IPv4 or IPv6 multicast group (``"ff12::1%mc0"`` may name the
            interface as a scope).
        port: UDP port, 1..65535.
        readout_class: e.g. :class:`AstroPix4Readout`: items are readouts and
            :meth:`MulticastReceiver.batches` yields decoded batches. None:
            items are :class:`Message` objects.
        queue_size: bound of the channel to the consumer, in receive batches
            (default 256; a batch holds 1 to ``batch_size`` datagrams, so a
            consumer that stalls under full load may hold up to
            ``queue_size * batch_size`` readouts before the overflow policy
            drops any).
        interface: name, index or address of the interface to join on; the
            default is the loopback interface.
        source: receive only from this source (source-specific multicast).
        framing: ``"raw"`` (default with a readout class: astropix-analysis
            datagrams), ``"native"`` (default otherwise) or ``"mcl"``.
        topics: accept only these topics (framed modes; decided from the
            native header before the payload is parsed).
        filter: a callable ``(payload, address) -> bool`` or a regular
            expression searched in the payload.
        overflow: ``"drop_oldest"`` (default), ``"drop_newest"`` or
            ``"block"`` (stalls the socket; for tests).
        batch_size: datagrams per ``recvmmsg`` call (1..1024, default 256).
        max_datagram_size: receive slot size; larger datagrams are counted as
            truncated and skipped.
        max_per_wake: datagrams handled before a checkpoint when the socket
            never empties.
        max_busy: seconds (default 0.005) the receive task may run without a
            checkpoint, measured with ``time.perf_counter()`` (real time:
            the time it holds the trio loop, which a virtual clock such as
            ``autojump_clock`` does not see); checked between batches and,
            where datagrams are handled one by one in Python (a ``filter=``
            callable or regular expression, framed modes), between datagrams.
            Other tasks then wait at most about ``max_busy`` plus the cost of
            one datagram (one ``recvmmsg`` batch for raw readouts without a
            filter). 0 checkpoints after every such step.
        rcvbuf: SO_RCVBUF to request (the granted size is in
            ``statistics().rcvbuf``; a warning says when the kernel capped it).
        max_senders, loss_window: bounds of the per-sender loss accounting.
        network: the network to use (default: the current network, i.e.
            real sockets unless ``mcast_trio.testing`` installed another).
        reassembly_timeout, max_pending_messages, max_reassembly_bytes:
            bounds of fragment reassembly (framed modes);
            ``max_reassembly_bytes`` counts a fixed overhead per fragment
            and per incomplete message besides the payload bytes, so that
            it bounds memory, not only payload.
        allow_unicast: accept a unicast ``group`` that is not a loopback
            address (loopback unicast, astropix-analysis' ``127.0.0.1``
            default, is always accepted). A unicast receiver owns its port:
            a second one fails with ``OSError`` (EADDRINUSE).
        allow_control_groups: accept link-local control groups
            (224.0.0.0/24, well-known ``ff02::`` groups), refused by default.

    Yields:
        A :class:`MulticastReceiver`.

    Raises:
        ValueError, TypeError, OSError: for invalid arguments (naming them)
            before anything is opened.
        OSError: the socket could not be opened, e.g. the port is held by
            a socket without ``SO_REUSEADDR``.

    Exceptions come out as themselves, not wrapped in an
    ``ExceptionGroup``: an error from opening the socket, and an exception
    raised by the code inside the ``async with`` block, are raised as they
    are (``except KeyError`` or ``except OSError`` catches them). Only
    genuinely concurrent failures (two or more exceptions at once, e.g. one
    from the block and one from the receive task) stay grouped.

    Cancellation: leaving the block, normally or by cancellation, stops the
    receive task, leaves the group and closes the socket.
    """
    _check_int("queue_size", queue_size, 1, 1 << 20)
    config = _configure(group, port, readout_class, **options)
    send_channel, receive_channel = trio.open_memory_channel(queue_size)
    drop_channel = receive_channel.clone() if config.overflow == "drop_oldest" else None
    with unwrap_single() as unwrap:
        async with trio.open_nursery() as nursery:
            service = await nursery.start(
                lambda task_status: serve_receiver(group, port, send_channel, readout_class,
                                                   drop_channel=drop_channel, task_status=task_status,
                                                   _config=config))
            receiver = MulticastReceiver(service, receive_channel)
            try:
                yield receiver
            except BaseException as exc:
                unwrap.body = exc  # passed on exactly as raised
                raise
            finally:
                nursery.cancel_scope.cancel()
                receive_channel.close()
