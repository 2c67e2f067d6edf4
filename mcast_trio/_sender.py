"""The multicast sender: callers hand datagrams to the kernel themselves when
nothing is waiting, otherwise a trio task drains a bounded queue into the
socket in batches (``sendmmsg``), in order.

``open_sender`` is an async context manager: it resolves and validates the
group, opens the socket, starts the sender task in a nursery of its own and
yields a :class:`MulticastSender`. Leaving the block normally sends everything
queued before closing; cancellation closes at once and counts what was still
queued as ``unsent``.

The per-message path: ``await send()`` / ``send_readout()`` / ``send_many()``
send directly from the calling task (one non-blocking ``send`` or
``sendmmsg``) when no datagram is queued or in flight, so that they cannot
overtake anything; they check for cancellation every time but yield to the
scheduler only every 64 directly sent datagrams (``_DIRECT_BURST``), or when
something had to be queued. ``send_nowait`` always queues (a ``deque``
append); the sender task takes up to 1024 queued datagrams per ``sendmmsg``.
"""

from __future__ import annotations

import secrets
import socket
from collections import deque
from collections.abc import Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import trio

from ._io import _groups

try:
    from ._protocol import _kernels
except ImportError:  # not compiled
    _kernels = None
from ._counters import counters_for
from ._errors import unwrap_single
from ._format import HEADER, check_readout
from ._protocol._framings import Framing, lookup_framing
from ._protocol._mcl import MclEncoder
from ._protocol._message import MAX_UDP_PAYLOAD, as_payload
from ._protocol._native import NativeEncoder
from ._protocol._raw import encode_raw
from ._validate import check_int
from ._io._net import current_network

# The compiled check of a list of serialized readouts (header, length field,
# at most 65507 bytes): the quick test of the common case; what it refuses
# goes through check_readout, which says what is wrong.
_raw_readouts = _kernels.raw_datagrams if _kernels is not None else None

__all__ = ["MulticastSender", "SenderStatistics", "open_sender", "serve_sender"]

#: The framings a sender takes, in the order error messages list them.
_FRAMINGS = ("auto", "raw", "native", "mcl")
_MAX_PER_CALL = 1024  # datagrams handed to one sendmmsg call
#: Datagrams callers may send directly between two schedule points.
_DIRECT_BURST = 64


def _serialized(readout):
    """A serialized readout (bytes-like) as bytes or a flat byte view, not
    yet checked; a TypeError that says what to pass otherwise."""
    try:
        return as_payload(readout)
    except TypeError:
        raise TypeError(
            f"readout={readout!r:.80} is a {type(readout).__name__}; allowed: a readout object"
            " with to_bytes() (e.g. AstroPix4Readout) or a serialized readout (bytes-like)"
        ) from None


@dataclass(frozen=True)
class SenderStatistics:
    """A snapshot of a sender's counters.

    Attributes:
        messages: messages accepted by ``send``/``send_nowait``/``send_many``.
        datagrams: datagrams handed to the kernel.
        bytes: bytes handed to the kernel (datagram sizes).
        syscalls: ``sendmmsg``/``send`` calls made.
        waits: times the socket buffer was full and the task waited.
        errors: datagrams the kernel refused (the last error is ``last_error``).
        unsent: datagrams still queued when the sender was cancelled.
        queued: datagrams queued or being sent by the sender task now
            (datagrams a caller sends directly are never counted here).
        last_error: the last OSError text, or None.
    """

    messages: int = 0
    datagrams: int = 0
    bytes: int = 0
    syscalls: int = 0
    waits: int = 0
    errors: int = 0
    unsent: int = 0
    queued: int = 0
    last_error: str | None = None


_SenderCounters = counters_for(SenderStatistics)


class MulticastSender:
    """Send datagrams to one multicast group; made by :func:`open_sender`.

    ``send``, ``send_readout``, ``send_many`` and ``send_nowait`` may be
    called from several tasks; datagrams leave in the order they were sent
    or queued: a call sends directly from its own task only while no
    datagram is queued or in flight, otherwise it queues behind them.
    """

    def __init__(self, spec, endpoint, framing: Framing, topic, encoder, queue_size: int,
                 max_queued: int = 65536) -> None:
        self._max_queued = max_queued
        self._queue_size = queue_size
        self._spec = spec
        self._endpoint = endpoint
        send_one = getattr(endpoint, "send_one", None)
        if send_one is None:  # an endpoint without it (see _net): one-item batches
            def send_one(datagram, _send_batch=endpoint.send_batch):
                if _send_batch([datagram]) != 1:
                    raise BlockingIOError
        self._send_one = send_one
        self._framing = framing
        # raw: every message is one datagram; auto: serialized readouts go
        # raw, other messages through the encoder.
        self._raw = framing.encoder is None
        self._auto = framing.raw_readouts and not self._raw
        self._quick = (self._raw or self._auto) and _raw_readouts is not None
        self._topic = topic
        self._encoder = encoder
        # The queue: one item (a list of datagrams, owned by the sender) per
        # message or send_many call. ``_handed`` is 1 while the item that
        # woke the idle sender task has not been taken yet: like a trio
        # memory channel, the queue holds ``queue_size`` items besides it.
        self._items: deque[list] = deque()
        self._handed = 0
        self._idle = False  # the sender task is parked on an empty queue
        self._wakeup = trio.lowlevel.ParkingLot()
        self._burst = 0  # datagrams sent directly since the last schedule point
        # The counters (datagrams in _items plus _inflight are ``queued``).
        self._c = _SenderCounters()
        self._inflight = 0  # datagrams of the batch being transmitted, not yet sent
        self._closed = False
        self._drained = trio.lowlevel.ParkingLot()  # room, progress, or closing

    # -- public API --------------------------------------------------------

    @property
    def group(self):
        """The resolved group (address, port, interface, TTL)."""
        return self._spec

    @property
    def framing(self) -> str:
        """The framing's name (``"auto"``, ``"raw"``, ``"native"``, ``"mcl"``)."""
        return self._framing.name

    def _encode(self, data, topic) -> list[bytes]:
        if self._closed:
            raise trio.ClosedResourceError("this sender is closed")
        if self._quick and type(data) is bytes and topic is None and _raw_readouts([data], self._auto):
            # The common case, checked in C: bytes of a well-formed readout
            # (auto), any bytes that fit one datagram (raw).
            return [data]
        if self._raw:
            return encode_raw(data)
        if self._auto and topic is None:
            payload = as_payload(data)
            if payload[:3] == HEADER:
                # A serialized readout goes raw; one that begins like a
                # readout but is malformed is refused, not framed silently.
                check_readout(payload)
                return encode_raw(payload)
            return self._encoder.encode(payload, self._topic)
        return self._encoder.encode(data, topic if topic is not None else self._topic)

    async def send(self, data, *, topic=None) -> None:
        """Send one message: bytes-like, or in ``mcl`` framing any
        msgpack-serialisable object (a dict, a list, a number, ...; MCL's
        listeners hand it back as that object).

        In ``raw`` framing the message is the datagram (at most 65507 bytes);
        in ``native`` and ``mcl`` framing it is fragmented as needed and
        ``topic`` overrides the sender's default topic. In ``auto`` framing
        (without ``topic``) bytes that begin with the readout header go raw
        and must be one well-formed serialized readout.

        When no datagram is queued or in flight, the calling task hands the
        message to the kernel itself (non-blocking) and returns; what the
        socket buffer cannot take is queued for the sender task. Otherwise
        the message is queued behind the others, waiting while the queue is
        full (``queue_size`` messages or ``max_queued`` datagrams).

        Raises:
            MalformedReadout: ``auto`` framing, and ``data`` begins with the
                readout header but is not a well-formed readout.
            trio.ClosedResourceError: the sender is closed.

        Cancellation: every call checks for cancellation before doing
        anything: if it raises :exc:`trio.Cancelled`, no part of the message
        was sent or queued; once it sent or queued the message it does not
        raise :exc:`trio.Cancelled`. It is a schedule point (lets other tasks
        run) when it has to wait or queue, and otherwise once every 64
        datagrams sent directly: a loop of ``await send()`` cannot starve the
        other tasks, but not every call yields (trio's own checkpoint says
        the scheduler may skip the schedule point for efficiency), so
        ``trio.testing.assert_checkpoints`` around a single call may fail.
        """
        await self._submit(self._encode(data, topic), 1)

    def send_nowait(self, data, *, topic=None) -> None:
        """Queue one message for the sender task; never blocks, never sends
        from the calling task (the sender task sends it, batched with the
        others, once this task yields).

        Raises:
            trio.WouldBlock: the queue is full (``queue_size`` messages or
                ``max_queued`` datagrams); nothing was queued.
            MalformedReadout: as :meth:`send`.
            trio.ClosedResourceError: the sender is closed.
        """
        datagrams = self._encode(data, topic)
        queued = self._c.queued
        items = self._items
        if queued and (queued + len(datagrams) > self._max_queued
                       or len(items) - self._handed >= self._queue_size):
            raise trio.WouldBlock
        # _append(datagrams, 1), inlined: this is the hot path of a DAQ loop.
        items.append(datagrams)
        self._c.queued = queued + len(datagrams)
        self._c.messages += 1
        if self._idle:
            self._idle = False
            self._handed = 1
            self._wakeup.unpark()

    async def send_readout(self, readout) -> None:
        """Send one readout, as astropix-analysis'
        ``MulticastSender.send_readout`` does: in raw (and auto) framing the
        datagram is exactly the serialized readout.

        Args:
            readout: an object with ``to_bytes()`` (e.g.
                :class:`AstroPix4Readout`, or astropix-analysis' own class),
                or a serialized readout (bytes-like).

        Raises:
            TypeError: ``readout`` is neither.
            MalformedReadout: the serialized readout is malformed (too short,
                bad header, or a length field that disagrees with its size);
                nothing was sent.

        Cancellation: as :meth:`send`.
        """
        if type(readout) is bytes:
            data = readout
        else:
            to_bytes = getattr(readout, "to_bytes", None)
            if to_bytes is not None and not isinstance(readout, int):
                data = to_bytes()
                if type(data) is not bytes:
                    data = _serialized(data)
            else:
                data = _serialized(readout)
        if self._closed:
            raise trio.ClosedResourceError("this sender is closed")
        raw = self._raw or self._auto
        if raw and type(data) is bytes and _raw_readouts is not None and _raw_readouts([data], True):
            datagrams = [data]  # the common case, checked in C
        else:
            check_readout(data)
            datagrams = encode_raw(data) if raw else self._encoder.encode(bytes(data), self._topic)
        await self._submit(datagrams, 1)

    async def send_many(self, messages: Iterable, *, topic=None) -> None:
        """Send many messages at once (one queue item, one batch).

        The fastest way to send: when nothing is queued, the calling task
        hands up to 1024 datagrams to the kernel in one ``sendmmsg`` and
        queues the rest for the sender task. Readouts (objects with
        ``to_bytes()``) and bytes-like objects may be mixed.

        Cancellation: as :meth:`send`, for all the messages together: if it
        raises :exc:`trio.Cancelled`, none of them was sent or queued.
        """
        if (topic is None and type(messages) is list and messages and (self._raw or self._auto)
                and _raw_readouts is not None and not self._closed
                and _raw_readouts(messages, self._auto)):
            # Fast path: a list of serialized readouts (raw: of datagrams) as
            # bytes: they go as they are, checked in C.
            await self._submit(messages[:], len(messages))
            return
        datagrams: list[bytes] = []
        count = 0
        for message in messages:
            count += 1
            if hasattr(message, "to_bytes") and not isinstance(message, (bytes, bytearray, memoryview, int)):
                message = message.to_bytes()
                if self._auto:
                    datagrams.extend(encode_raw(message))
                    continue
            datagrams.extend(self._encode(message, topic))
        if not datagrams:
            await trio.lowlevel.checkpoint()
            return
        await self._submit(datagrams, count)

    async def flush(self) -> None:
        """Wait until every datagram queued so far has been handed to the
        kernel (or counted as an error).

        Returns as soon as those datagrams are done with, even while other
        tasks keep sending; also when the sender stops and counts them as
        ``unsent``.

        Cancellation: safe; cancelling the wait does not affect sending.
        """
        target = self._settled() + self._c.queued
        if self._flushed(target):
            await trio.lowlevel.checkpoint()
            return
        while not self._flushed(target):
            await self._drained.park()

    def _settled(self) -> int:
        return self._c.datagrams + self._c.errors + self._c.unsent

    def _flushed(self, target: int) -> bool:
        # queued == 0 also covers sends that failed after flush() began.
        return self._c.queued == 0 or self._settled() >= target

    def statistics(self) -> SenderStatistics:
        """Return a frozen snapshot of the counters."""
        return self._c.snapshot()

    # -- internals -----------------------------------------------------------

    def _append(self, datagrams: list, messages: int) -> None:
        """Queue one item (no checks: the caller made sure there is room)."""
        self._items.append(datagrams)
        self._c.queued += len(datagrams)
        self._c.messages += messages
        if self._idle:
            self._idle = False
            self._handed = 1
            self._wakeup.unpark()

    def _has_room(self, count: int) -> bool:
        queued = self._c.queued
        if queued and queued + count > self._max_queued:
            # Bound the datagrams waiting, not only the items (one send_many
            # is one); a batch larger than the bound goes alone.
            return False
        return len(self._items) - self._handed < self._queue_size

    async def _submit(self, datagrams: list, messages: int) -> None:
        """Send ``datagrams`` (one call's worth) directly if nothing is queued
        or in flight, else queue them; see :meth:`send` for the checkpoint."""
        if self._c.queued or self._closed:
            await self._put(datagrams, messages)
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        # From here on nothing awaits until the datagrams are sent or queued:
        # no other task can send in between, and no Cancelled can arrive.
        n = len(datagrams)
        if n == 1:
            datagram = datagrams[0]
            try:
                self._send_one(datagram)
            except BlockingIOError:
                self._c.syscalls += 1
                done = 0
            except OSError as exc:
                self._count_error(exc, datagram)
                done = 1
            else:
                self._c.syscalls += 1
                self._c.datagrams += 1
                self._c.bytes += len(datagram)
                done = 1
        else:
            done = self._send_now(datagrams, 0, _MAX_PER_CALL)
        if done < n:
            # The socket buffer is full (or the call was large): the sender
            # task sends the rest, in order, when the socket is writable.
            self._append(datagrams[done:], messages)
        else:
            self._c.messages += messages
            self._burst += n
            if self._burst < _DIRECT_BURST:
                return
        self._burst = 0
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def _put(self, datagrams: list, messages: int) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        count = len(datagrams)
        while not self._has_room(count):
            if self._closed:
                break
            await self._drained.park()  # cancelled here: nothing was queued
        if self._closed:
            raise trio.ClosedResourceError("this sender is closed")
        self._append(datagrams, messages)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _count_error(self, exc: OSError, datagram) -> None:
        self._c.errors += 1
        self._c.last_error = f"{exc} (datagram of {len(datagram)} bytes)"

    def _send_now(self, datagrams: list, i: int, limit: int | None = None) -> int:
        """Hand ``datagrams[i:]`` (at most ``limit`` of them) to the kernel
        without waiting; count them. Returns the index of the first datagram
        not done with (sent, or refused and counted as an error): ``len``
        when all are, less when the socket buffer is full."""
        endpoint = self._endpoint
        size = len(datagrams)
        end = size if limit is None else min(size, i + limit)
        while i < end:
            stop = min(end, i + _MAX_PER_CALL)
            chunk = datagrams if (i == 0 and stop == size) else datagrams[i:stop]
            try:
                sent = endpoint.send_batch(chunk)
            except OSError as exc:
                # The kernel refused datagram i (e.g. EMSGSIZE): count, skip.
                self._count_error(exc, datagrams[i])
                i += 1
                continue
            self._c.syscalls += 1
            if not sent:
                break
            self._c.datagrams += sent
            self._c.bytes += sum(map(len, chunk if sent == len(chunk) else chunk[:sent]))
            i += sent
        return i

    def _drop_queued(self) -> None:
        """The sender task has stopped: count what it never sent as unsent.

        Counts exactly the datagrams still queued and the rest of the batch
        being transmitted.
        """
        left = self._inflight + sum(map(len, self._items))
        self._items.clear()
        self._inflight = 0
        self._handed = 0
        self._c.queued -= left
        self._c.unsent += left
        self._drained.unpark_all()

    async def _run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The sender task: queue -> socket, in batches, in order."""
        items = self._items
        task_status.started()
        try:
            while True:
                if not items:
                    if self._closed:
                        return
                    self._idle = True
                    await self._wakeup.park()
                    continue
                batch = items.popleft()  # the sender's own list: extend it
                while items and len(batch) < _MAX_PER_CALL:
                    batch.extend(items.popleft())
                self._handed = 0
                self._inflight = len(batch)
                self._drained.unpark_all()  # room in the queue
                await self._transmit(batch)
        except BaseException:
            # Cancelled (or failed): whatever was queued never left.
            self._idle = False
            self._drop_queued()
            raise

    async def _transmit(self, datagrams: list[bytes]) -> None:
        i = 0
        n = len(datagrams)
        while True:
            j = self._send_now(datagrams, i)
            self._c.queued -= j - i
            self._inflight -= j - i
            i = j
            if i >= n:
                break
            self._c.waits += 1
            await self._endpoint.wait_writable()
        self._drained.unpark_all()  # flush() callers re-check their target
        await trio.lowlevel.checkpoint()

    def _close_input(self) -> None:
        self._closed = True
        self._idle = False
        self._wakeup.unpark_all()
        self._drained.unpark_all()


@asynccontextmanager
async def open_sender(
    group: str,
    port: int,
    *,
    interface: Any = None,
    ttl: int = 1,
    loop: bool = True,
    framing: str = "auto",
    topic: str | bytes | None = None,
    sender_id: int | None = None,
    max_datagram: int | None = None,
    queue_size: int = 1024,
    max_queued: int = 65536,
    sndbuf: int | None = None,
    local_address: str | None = None,
    network: Any = None,
    allow_unicast: bool = False,
    allow_control_groups: bool = False,
) -> AsyncIterator[MulticastSender]:
    """Open a multicast sender for ``group``:``port``.

    Args:
        group: IPv4 or IPv6 multicast group (``"ff12::1%mc0"`` may carry the
            interface as a scope), or a loopback unicast address
            (``"127.0.0.1"``, astropix-analysis' default: the datagrams go
            to the one receiver bound there).
        port: UDP port, 1..65535.
        interface: name, index or address of the interface to send on; the
            default is the loopback interface, so nothing leaves the host
            unless you name one.
        ttl: multicast TTL / hop limit, 0..255 (default 1: the local link).
        loop: whether local receivers on this host get the datagrams.
        framing: ``"auto"`` (default: AstroPix readouts, whether given as
            readout objects or as serialized bytes, go raw, exactly as
            astropix-analysis sends them; other messages use the native
            framed mode),
            ``"raw"`` (every message is one datagram), ``"native"`` or
            ``"mcl"`` (MCL-compatible msgpack).
        topic: default topic of framed messages.
        sender_id: native framing's 64-bit sender id (random by default).
        max_datagram: largest datagram of the framed modes (native default:
            1472 for IPv4, 1452 for IPv6); in ``mcl`` framing the chunk size
            of large messages (MCL's 60000 by default; at most 64989, so that
            MCL's listener, which reads 65000 bytes, reads every datagram).
        queue_size: bound of the queue between callers and the sender
            task (in messages: one ``send_many`` is one), >= 1.
        max_queued: most datagrams waiting to be sent at once; ``send``
            waits (``send_nowait`` raises ``trio.WouldBlock``) beyond it. A
            single batch larger than this is accepted when nothing waits.
        sndbuf: SO_SNDBUF to request, or None for the system default.
        local_address: bind to this unicast address of the host first (so
            that receivers with a source-specific membership accept the
            datagrams); None lets the kernel choose.
        network: the network to use (default: the current network, i.e.
            real sockets unless ``mcast_trio.testing`` installed another).
        allow_unicast: accept a unicast ``group`` that is not a loopback
            address (``ttl`` is then the IP TTL).
        allow_control_groups: accept link-local control groups
            (224.0.0.0/24, well-known ``ff02::`` groups), refused by default.

    Yields:
        A :class:`MulticastSender`.

    Raises:
        ValueError, TypeError: an argument is invalid (before anything is
            opened).
        OSError: the socket could not be opened or configured.

    Exceptions come out as themselves: an error on opening, an exception
    raised by the code inside the ``async with`` block (``except KeyError``
    catches a ``KeyError`` raised there) or a failure of the sender task is
    not wrapped in an ``ExceptionGroup``. Only genuinely concurrent failures
    (e.g. the block and the sender task failing at once) arrive grouped.

    Cancellation: leaving the block normally waits until every queued
    datagram was handed to the kernel; if the block is cancelled, queued
    datagrams are dropped (counted in ``statistics().unsent``). The socket is
    closed in every case.
    """
    framing = lookup_framing(framing, allowed=_FRAMINGS)
    check_int("queue_size", queue_size, 1, allowed="an integer >= 1")
    check_int("max_queued", max_queued, 1, allowed="an integer >= 1")
    spec = _groups.resolve_group(group, port, interface=interface, ttl=ttl, allow_unicast=allow_unicast,
                                  allow_control_groups=allow_control_groups)
    encoder = None
    if framing.encoder is NativeEncoder:
        kwargs = {}
        if max_datagram is not None:
            kwargs["max_datagram"] = max_datagram
        elif spec.family == socket.AF_INET6:
            kwargs["max_datagram"] = 1452
        encoder = NativeEncoder(sender_id=sender_id if sender_id is not None else secrets.randbits(64),
                                topic=topic if topic is not None else b"", **kwargs)
    elif framing.encoder is MclEncoder:
        try:
            encoder = MclEncoder(topic=topic) if max_datagram is None else MclEncoder(topic=topic,
                                                                                       chunk_size=max_datagram)
        except (TypeError, ValueError) as exc:
            # MclEncoder calls it chunk_size; the caller wrote max_datagram.
            raise type(exc)(str(exc).replace("chunk_size=", "max_datagram=")) from None
    elif max_datagram is not None:
        check_int("max_datagram", max_datagram, 1, MAX_UDP_PAYLOAD)
    if network is None:
        network = current_network()
    endpoint = network.open_sender(spec, sndbuf=sndbuf, loop=loop, local_address=local_address)
    try:
        sender = MulticastSender(spec, endpoint, framing, topic, encoder, queue_size, max_queued)
        try:
            # A lone exception (from the block or the sender task) leaves
            # as itself, not wrapped in an ExceptionGroup by the nursery.
            with unwrap_single() as unwrap:
                async with trio.open_nursery() as nursery:
                    await nursery.start(sender._run)
                    try:
                        yield sender
                    except BaseException as exc:
                        unwrap.body = exc  # passed on exactly as raised
                        raise
                    finally:
                        sender._close_input()
        finally:
            # Anything queued after the sender task stopped never leaves.
            sender._drop_queued()
    finally:
        endpoint.close()


async def serve_sender(group: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED, **options) -> None:
    """Run a sender as a service, for ``await nursery.start(serve_sender, group, port)``.

    Takes the options of :func:`open_sender`; ``task_status.started()`` is
    called with the :class:`MulticastSender` once its socket is open. Runs
    until cancelled.

    Cancellation: the only way to stop it; datagrams still queued are
    dropped and counted in ``statistics().unsent``, and the socket is closed.
    """
    async with open_sender(group, port, **options) as sender:
        task_status.started(sender)
        await trio.sleep_forever()
