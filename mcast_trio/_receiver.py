"""The multicast receiver: the trio layer around the receive pipeline.

:func:`serve_receiver` runs the receive task: it opens an endpoint of the
current network, runs :func:`mcast_trio._loop.receive_loop` (drain the socket
in batches, feed the sans-I/O :class:`~mcast_trio._protocol._pipeline.ReceivePipeline`,
wait) and delivers what the pipeline returns through a bounded memory channel
without ever waiting for the consumer: ``send_nowait``, and the overflow
policy when the channel is full, counting every datagram it drops.

Items in the channel are public types, one per receive batch:
:class:`ReadoutChunk` (the well-formed readouts of the batch, decoded
together) in readout mode, lists of :class:`~mcast_trio.Message` otherwise.
:class:`MulticastReceiver` turns them back into single readouts or messages
for ``async for`` and ``receive()``, or hands the decoded batches to
``batches()``.
"""

from __future__ import annotations

import inspect
import weakref
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import trio

from . import _validate
from ._batch import DecodedBatch
from ._errors import unwrap_single
from ._io import _groups, _sockets
from ._io._net import current_network
from ._loop import receive_loop
from ._protocol._filters import make_filter
from ._protocol._framings import Framing, lookup_framing
from ._protocol._mcl import require_msgpack
from ._protocol._reassembly import check_reassembly_limits
from ._protocol._pipeline import ReadoutChunk, ReceivePipeline, ReceiverStatistics

__all__ = [
    "MulticastReceiver",
    "ReadoutChunk",
    "ReceiverService",
    "ReceiverStatistics",
    "OVERFLOW_POLICIES",
    "open_receiver",
    "serve_receiver",
]

#: What the receive task does when the consumer's channel is full.
OVERFLOW_POLICIES = ("drop_oldest", "drop_newest", "block")
#: The framings a receiver takes, in the order error messages list them.
_FRAMINGS = ("raw", "native", "mcl", "auto")
#: Default bound of the consumer's channel in bytes (``max_queue_bytes``).
DEFAULT_MAX_QUEUE_BYTES = 64 << 20
#: What a queued item costs besides what :func:`_item_bytes` counts: a
#: message's tuple and list slot, a chunk's objects.
_MESSAGE_COST = 96
_CHUNK_COST = 512
#: A receive task with ``overflow="block"`` waiting for the consumer to free
#: enough bytes (it waits for items in the channel itself) looks again after
#: this many seconds, doubling up to ``_BLOCK_POLL_MAX``: quick when the
#: consumer is only slow, nearly free when it stalls.
_BLOCK_POLL = 0.001
_BLOCK_POLL_MAX = 0.05
#: One receive batch is handed out as several items when its messages hold
#: more than this fraction of ``max_queue_bytes``.
_ITEM_SHARE = 4


class _Ledger:
    """The byte bound's account of one memory channel: the cost of every
    item the receive tasks sending into it put in and that was not yet
    taken out, oldest first. The channel is first in, first out, so when it
    holds ``used`` items, the first ``len(costs) - used`` of these were
    taken (by a consumer or by drop_oldest). Shared by every receive task
    sending into the same channel (clones of one ``send_channel``), so that
    none takes another's items for its own; items that other code sends
    into the channel are not counted (they only make the account forget a
    cost later, never sooner). ``ids`` holds the ``id()`` of each counted
    item, so that drop_oldest can tell the receivers' own items from items
    other code sent (see :meth:`owns`)."""

    __slots__ = ("costs", "ids", "total", "__weakref__")

    def __init__(self) -> None:
        self.costs: deque[int] = deque()
        self.ids: deque[int] = deque()
        self.total = 0

    def settle(self, used: int) -> None:
        costs = self.costs
        ids = self.ids
        while len(costs) > used:
            self.total -= costs.popleft()
            ids.popleft()

    def add(self, cost: int, item) -> None:
        self.costs.append(cost)
        self.ids.append(id(item))
        self.total += cost

    def owns(self, item) -> bool:
        """Whether ``item`` (just taken out of the channel, so alive) is one
        a receive task put in: its id is still in the account (an entry
        outlives its item only while other code's items are in the channel,
        and then only until the account settles; at most ``queue_size``
        entries are searched, once per item drop_oldest takes out)."""
        return id(item) in self.ids


#: id(channel state) -> (weak reference to it, its ledger).
_LEDGERS: dict[int, tuple[Any, _Ledger]] = {}


def _ledger_for(channel) -> _Ledger:
    """The ledger of the channel ``channel`` sends into (shared by its
    clones: trio's memory channels keep their common state in ``_state``;
    a channel without one gets a ledger of its own)."""
    state = getattr(channel, "_state", None)
    if state is None:
        return _Ledger()
    key = id(state)
    entry = _LEDGERS.get(key)
    if entry is not None and entry[0]() is state:
        return entry[1]
    ledger = _Ledger()
    try:
        ref = weakref.ref(state, lambda _ref, key=key: _LEDGERS.pop(key, None))
    except TypeError:
        return ledger
    _LEDGERS[key] = (ref, ledger)
    return ledger


class ReceiverService:
    """The state of one running receive task; :func:`serve_receiver` passes it
    to ``task_status.started()`` when it was given a ``send_channel``.

    Its counters are updated by the receive task only; :meth:`statistics`
    takes a consistent snapshot (trio runs one task at a time).

    Attributes:
        spec: the resolved group (:class:`GroupSpec`).
        readout_class: the readout class, or None (message mode).
        overflow: the overflow policy in force.
        joined: a :class:`trio.Event`, set once the group is joined.
        pipeline: the sans-I/O receive pipeline the task feeds (its
            ``counters`` are the live counters).
        queued_bytes: what the items in the channel hold, in bytes, as
            counted against ``max_queue_bytes`` (updated when the task
            delivers; the items of every receive task sending into the
            channel).
    """

    def __init__(self, config: "_Config", send_channel, drop_channel=None) -> None:
        self.config = config
        self.spec = config.spec
        self.readout_class = config.readout_class
        self.overflow = config.overflow
        if self.overflow is None:
            # The default: drop the oldest chunk when there is a way to take
            # it out of the channel, else the newest.
            self.overflow = "drop_oldest" if drop_channel is not None else "drop_newest"
        elif self.overflow == "drop_oldest" and drop_channel is None:
            raise ValueError("overflow='drop_oldest' needs drop_channel= (a clone of the receive side of "
                             "send_channel); or use overflow='drop_newest'")
        self._send = send_channel
        self._drop = drop_channel
        # The byte bound, shared with the other receive tasks sending into
        # the same channel: see _Ledger.
        self._max_bytes = config.max_queue_bytes
        self._ledger = _ledger_for(send_channel)
        self.pipeline = ReceivePipeline(
            readout_class=config.readout_class, framing=config.framing, topics=config.topics,
            filter=config.filter, max_senders=config.max_senders, loss_window=config.loss_window,
            reassembly=config.reassembly, on_malformed=config.on_malformed)
        # A receive batch hands out its messages as several items rather
        # than one that the byte bound could not refuse.
        self.pipeline.max_item_bytes = max(1, config.max_queue_bytes // _ITEM_SHARE)
        self._counters = self.pipeline.counters
        self._endpoint = None
        self._built_seen = 0
        self.joined = trio.Event()

    @property
    def queued_bytes(self) -> int:
        return self._ledger.total

    @property
    def keep_bytes(self) -> bool:
        """Whether readout chunks carry the serialized readouts (True until
        a consumer of decoded batches says it does not need them)."""
        return self.pipeline.keep_bytes

    @keep_bytes.setter
    def keep_bytes(self, value: bool) -> None:
        self.pipeline.keep_bytes = _validate.check_bool("keep_bytes", value)

    def statistics(self) -> ReceiverStatistics:
        """A frozen snapshot of the counters (see :class:`ReceiverStatistics`).

        ``kernel_drops`` is read from the socket at this moment, so that it
        includes drops after the last datagram the socket queued: once the
        socket's queue is drained, ``datagrams + kernel_drops`` is what
        reached the socket."""
        endpoint = self._endpoint
        if endpoint is not None:
            drops = endpoint.kernel_drops()
            if drops is not None:
                self._counters.kernel_drops = drops
        return self.pipeline.statistics()

    def _discard_queued(self, endpoint) -> None:
        """At close: count what the socket still holds (``datagrams``,
        ``bytes`` and ``discarded``; not decoded), so that after close too
        ``datagrams + kernel_drops`` is what reached the socket."""
        discard = getattr(endpoint, "discard_queued", None)
        if discard is None:
            return
        count, nbytes = discard()
        if count:
            c = self._counters
            c.datagrams += count
            c.bytes += nbytes
            c.discarded += count

    async def _run(self, endpoint, task_status, started) -> None:
        config = self.config
        self._endpoint = endpoint
        self._counters.rcvbuf = endpoint.granted_rcvbuf
        self.joined.set()
        await receive_loop(endpoint, self.pipeline, self._deliver, batch_size=config.batch_size,
                           max_datagram_size=config.max_datagram_size,
                           max_per_wake=config.max_per_wake, max_busy=config.max_busy,
                           task_status=task_status, started=started)

    def _count_dropped(self, item) -> None:
        self._counters.dropped += len(item)  # datagrams (readouts) or messages
        self._counters.dropped_chunks += 1

    def _count_taken_out(self, oldest) -> None:
        """Count the item drop_oldest took out of the channel: one of the
        receivers' own (its datagrams or messages), or an item other code
        sent into the channel, which holds nothing received: counted in
        ``dropped_chunks`` only (and never measured with ``len()``)."""
        if self._ledger.owns(oldest):
            self._count_dropped(oldest)
        else:
            self._counters.dropped_chunks += 1

    def _item_bytes(self, item) -> int:
        """What ``item`` holds in memory, in bytes (estimated for MCL objects)."""
        if isinstance(item, ReadoutChunk):
            batch = item.batch
            size = batch.hits.nbytes + batch.readouts.nbytes + item.lengths.nbytes + _CHUNK_COST
            return size if item.data is None else size + len(item.data)
        # Everything the pipeline built since the last item (topics and
        # payloads; an MCL object payload: an upper bound; what a filter
        # rejected in between too: an overestimate, never less).
        built = self.pipeline.built_bytes
        size = built - self._built_seen
        self._built_seen = built
        return size + _MESSAGE_COST * len(item)

    def _settle(self):
        """Forget the costs of the items taken out of the channel since;
        return the channel's statistics."""
        state = self._send.statistics()
        self._ledger.settle(state.current_buffer_used)
        return state

    def _fits(self, cost: int) -> bool:
        # An item larger than the bound still goes into an empty channel.
        ledger = self._ledger
        return not ledger.costs or ledger.total + cost <= self._max_bytes

    def _queued(self, cost: int, item) -> None:
        self._ledger.add(cost, item)
        self._settle()

    async def _deliver(self, item) -> None:
        send = self._send
        cost = self._item_bytes(item)
        state = self._settle()
        if self._fits(cost):
            try:
                send.send_nowait(item)
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # Nobody listens any more: count what is thrown away.
                self._count_dropped(item)
                return
            else:
                self._ledger.add(cost, item)
                if ((state.current_buffer_used + 1) * 2 > state.max_buffer_size
                        or self.queued_bytes * 2 > self._max_bytes):
                    # The consumer is falling behind while the socket keeps
                    # delivering: let it run now rather than after
                    # max_per_wake datagrams, or the overflow policy drops
                    # what it could have handled. Twice: trio runs the tasks
                    # woken together in random order, and after one
                    # checkpoint this task may resume (and deliver more)
                    # before the consumer it just woke; after two, the
                    # consumer has run.
                    await trio.lowlevel.checkpoint()
                    await trio.lowlevel.checkpoint()
                    self.pipeline.deadline = self.pipeline.clock() + self.config.max_busy
                return
        # Full: queue_size items, or max_queue_bytes bytes.
        policy = self.overflow
        if policy == "block":
            try:
                delay = _BLOCK_POLL
                while not self._fits(cost):
                    # The channel waits for room for items, not for bytes:
                    # look again, less and less often (no busy polling).
                    await trio.sleep(delay)
                    delay = min(2 * delay, _BLOCK_POLL_MAX)
                    self._settle()
                await send.send(item)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The consumer went away while we waited for it.
                self._count_dropped(item)
            else:
                self._queued(cost, item)
        elif policy == "drop_newest":
            self._count_dropped(item)
        else:  # drop_oldest
            while True:
                if self._fits(cost):
                    try:
                        send.send_nowait(item)
                    except trio.WouldBlock:
                        pass
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self._count_dropped(item)
                        return
                    else:
                        self._queued(cost, item)
                        return
                try:
                    oldest = self._drop.receive_nowait()
                except trio.WouldBlock:
                    # Nothing to take out (an unbuffered channel whose
                    # consumer is not waiting): the new item is dropped,
                    # rather than trying forever without a checkpoint.
                    self._count_dropped(item)
                    return
                else:
                    self._count_taken_out(oldest)
                self._settle()


@dataclass(frozen=True)
class _Config:
    spec: Any
    readout_class: Any
    framing: Framing
    topics: Any
    filter: Any
    overflow: str | None
    batch_size: int
    max_datagram_size: int
    max_per_wake: int
    max_busy: float
    rcvbuf: int | None
    max_senders: int
    loss_window: int
    reassembly: tuple[float, int, int]
    network: Any
    on_malformed: Any = None
    max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES


def _check_readout_class(readout_class) -> None:
    """A readout class builds readouts with ``from_bytes()`` and serializes
    them with ``to_bytes()`` (ours, astropix-analysis' own); ``int`` has both
    and is no readout class, nor is any other built-in type."""
    if readout_class is None:
        return
    if not (isinstance(readout_class, type) and callable(getattr(readout_class, "from_bytes", None))
            and callable(getattr(readout_class, "to_bytes", None))
            and readout_class.__module__ != "builtins"):
        raise TypeError(f"readout_class={readout_class!r} is not a readout class; allowed: a class with "
                        "from_bytes() and to_bytes(), e.g. AstroPix4Readout, or None (messages)")


def _configure(
    group, port, readout_class=None, *, interface=None, source=None, framing=None, topics=None,
    filter=None, overflow=None, batch_size=256, max_datagram_size=65535,
    max_per_wake=4096, max_busy=0.005, rcvbuf=_sockets.DEFAULT_RCVBUF, max_senders=64, loss_window=1024,
    reassembly_timeout=2.0, max_pending_messages=256, max_reassembly_bytes=32 << 20, network=None,
    allow_unicast=False, allow_control_groups=False, on_malformed=None,
    max_queue_bytes=DEFAULT_MAX_QUEUE_BYTES,
) -> _Config:
    """Validate every receiver argument; raises before anything is opened."""
    spec = _groups.resolve_group(group, port, interface=interface, source=source,
                                  allow_unicast=allow_unicast, allow_control_groups=allow_control_groups)
    _check_readout_class(readout_class)
    framing = lookup_framing("auto" if framing is None else framing, allowed=_FRAMINGS).resolve(
        readouts=readout_class is not None)
    if overflow is not None:
        _validate.check_choice("overflow", overflow, OVERFLOW_POLICIES, what="an overflow policy")
    if not framing.topics and topics is not None:
        raise ValueError(f"topics= needs a framing with topics (framing='native' or 'mcl'); "
                         f"{framing.name} datagrams carry no topic")
    make_filter(topics if framing.topics else None, filter)  # validates both
    _validate.check_int("batch_size", batch_size, 1, 1024)
    _validate.check_int("max_datagram_size", max_datagram_size, 64, 65535)
    _validate.check_int("max_per_wake", max_per_wake, 1, 1 << 30)
    _validate.check_int("max_queue_bytes", max_queue_bytes, 1, 1 << 40)
    max_busy = _validate.check_number("max_busy", max_busy, 0, 1, allowed="seconds in 0..1")
    if rcvbuf is not None:
        rcvbuf = _sockets.check_bufsize("rcvbuf", rcvbuf)
    _validate.check_int("max_senders", max_senders, 1, 1 << 20)
    _validate.check_int("loss_window", loss_window, 1, 1 << 16)
    reassembly = check_reassembly_limits(
        reassembly_timeout, max_pending_messages, max_reassembly_bytes,
        names=("reassembly_timeout", "max_pending_messages", "max_reassembly_bytes"))
    if framing.msgpack:
        require_msgpack()
    if on_malformed is not None and not callable(on_malformed):
        raise TypeError(f"on_malformed={on_malformed!r} is not callable; allowed: a function "
                        "(payload, source) -> None, or None")
    if network is None:
        network = current_network()
    return _Config(spec, readout_class, framing, topics, filter, overflow, batch_size, max_datagram_size,
                   max_per_wake, max_busy, rcvbuf, max_senders, loss_window, reassembly, network,
                   on_malformed, max_queue_bytes)


#: The keyword options of open_receiver / serve_receiver (those of _configure).
_OPTIONS = frozenset(name for name, p in inspect.signature(_configure).parameters.items()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _configure_public(function: str, group, port, readout_class, options: dict, own=()) -> _Config:
    # ``own``: the keywords ``function`` takes itself (never in ``options``).
    _validate.check_keywords(function, options, _OPTIONS | set(own))
    return _configure(group, port, readout_class, **options)


async def _serve(config: _Config, send_channel, drop_channel, task_status=trio.TASK_STATUS_IGNORED,
                 consumer=None) -> None:
    """The receive task; ``task_status.started()`` gets the service, or
    ``consumer(service)`` when given."""
    service = ReceiverService(config, send_channel, drop_channel)
    started = service if consumer is None else consumer(service)
    # A plain ``with``: ``async with`` would checkpoint on the way out, and a
    # cancellation arriving then would replace (and so hide) the exception
    # the receive task is failing with.
    with send_channel:
        endpoint = config.network.open_receiver(config.spec, rcvbuf=config.rcvbuf)
        try:
            await service._run(endpoint, task_status, started)
        finally:
            service._discard_queued(endpoint)
            endpoint.close()
            if drop_channel is not None:
                drop_channel.close()


async def serve_receiver(group, port, send_channel=None, readout_class=None, *, drop_channel=None,
                         queue_size: int = 256, task_status=trio.TASK_STATUS_IGNORED, **options) -> None:
    """Run a receive task until cancelled: join ``group``:``port`` and deliver
    what arrives, one item per receive batch.

    The service form of :func:`open_receiver`, for a nursery you already
    have. Two ways to use it:

    * without ``send_channel``: it makes its own channel (``queue_size``
      items) and ``task_status.started()`` passes a :class:`MulticastReceiver`,
      used exactly as the one ``open_receiver`` yields::

          receiver = await nursery.start(serve_receiver, "239.255.0.1", 5007)
          async for message in receiver: ...

    * with a ``send_channel`` (a trio memory channel's send side) it sends
      into that channel and ``task_status.started()`` passes a
      :class:`ReceiverService` (``statistics()``). Items are
      :class:`ReadoutChunk` objects (with a ``readout_class``; iterate one to
      get its readouts, or use its ``batch``) or lists of :class:`~mcast_trio.Message`.
      The overflow policy ``"drop_oldest"`` needs ``drop_channel``, a clone
      of the receive side of ``send_channel``; without one the default
      policy is ``"drop_newest"``. Other code may send its own items into
      the same channel: when drop_oldest takes one of them out, it is
      counted in ``dropped_chunks`` only (``dropped`` counts the receivers'
      own datagrams or messages).

    Every keyword option of :func:`open_receiver` is accepted;
    ``nursery.start`` passes positional arguments only, so pass keywords
    with :func:`functools.partial`::

        receiver = await nursery.start(functools.partial(
            serve_receiver, group, port, readout_class=AstroPix4Readout, framing="native"))

    Invalid arguments raise before anything is opened, naming the argument.
    It opens no nursery of its own, so its exceptions are never wrapped by
    it: an invalid argument, or an error from opening the socket (e.g. the
    port is held by a socket without ``SO_REUSEADDR``), is raised as itself
    by ``nursery.start()``. What fails after it started travels through your
    nursery, which groups it as trio nurseries do.

    Cancellation: on cancellation (its only way to stop) the group is left,
    the socket closed and the channel closed, so consumers see the end of
    the channel.
    """
    config = _configure_public("serve_receiver", group, port, readout_class, options,
                               own=("send_channel", "drop_channel", "queue_size", "task_status"))
    if send_channel is not None:
        await _serve(config, send_channel, drop_channel, task_status)
        return
    if drop_channel is not None:
        raise ValueError("drop_channel= belongs with send_channel=; without send_channel, "
                         "serve_receiver makes its own channel")
    _validate.check_int("queue_size", queue_size, 1, 1 << 20)
    send_channel, receive_channel = trio.open_memory_channel(queue_size)
    drop_channel = receive_channel.clone() if config.overflow in (None, "drop_oldest") else None

    await _serve(config, send_channel, drop_channel, task_status,
                 consumer=lambda service: MulticastReceiver(service, receive_channel))


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
    :class:`~mcast_trio.Message` objects; or use :meth:`batches` for decoded numpy
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
        # A readout chunk holds well-formed readouts only (malformed ones
        # were counted by the receive task).
        return chunk.readouts() if isinstance(chunk, ReadoutChunk) else chunk

    async def receive(self):
        """Return the next readout (or :class:`~mcast_trio.Message`).

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
        if self._service.readout_class is None:
            raise TypeError("receive_batch() needs a receiver opened with readout_class=")
        if self._pending:
            raise RuntimeError("receive_batch() after receive(): use one style per receiver")
        self._service.keep_bytes = False
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
            items are :class:`~mcast_trio.Message` objects.
        queue_size: bound of the channel to the consumer, in receive batches
            (default 256; a batch holds 1 to ``batch_size`` datagrams, so a
            consumer that stalls under full load may hold up to
            ``queue_size * batch_size`` readouts before the overflow policy
            drops any).
        max_queue_bytes: bound of the same channel in bytes (1..2**40,
            default 64 MiB): what its items hold (a readout chunk: its
            serialized readouts and decoded arrays; a message: its topic
            and payload; an MCL object payload: an upper bound, 48 bytes
            per byte of its msgpack and 256 per container). An item that
            would go beyond it is treated as if the channel were full (the
            overflow policy applies and counts what it drops in
            ``dropped``/``dropped_chunks``), except that an item alone in
            the channel is never refused for its size. An item is one
            receive batch (up to ``batch_size`` datagrams, or the messages
            they complete), or part of one: the messages of a batch are
            handed out as several items when they hold more than a quarter
            of the bound. Receivers sending into clones of one
            ``send_channel`` (:func:`serve_receiver`) share the bound's
            account of that channel.
        interface: name, index or address of the interface to join on; the
            default is the loopback interface.
        source: receive only from this source (source-specific multicast).
        framing: ``"auto"`` (the default: ``"raw"`` with a readout class,
            ``"native"`` otherwise, which is what an ``"auto"`` sender
            sends for readouts resp. other messages), ``"raw"`` (astropix-analysis
            datagrams), ``"native"`` or ``"mcl"``.
        topics: accept only these topics (framed modes; decided from the
            native header before the payload is parsed).
        filter: a callable ``(payload, address) -> bool`` or a regular
            expression searched in the payload.
        overflow: ``"drop_oldest"`` (default), ``"drop_newest"`` or
            ``"block"`` (stalls the socket; for tests). With
            ``"drop_oldest"``, when nothing can be taken out of the channel
            (an unbuffered user channel whose consumer is not waiting), the
            new item is dropped.
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
        on_malformed: a function ``(payload, source) -> None`` the receive
            task calls with the bytes of every malformed datagram (framed
            modes: malformed frame or payload) as it counts it, e.g. to keep
            them in a capture file; it must be quick and must not block.

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
    _validate.check_int("queue_size", queue_size, 1, 1 << 20)
    config = _configure_public("open_receiver", group, port, readout_class, options, own=("queue_size",))
    send_channel, receive_channel = trio.open_memory_channel(queue_size)
    drop_channel = receive_channel.clone() if config.overflow in (None, "drop_oldest") else None
    with unwrap_single() as unwrap:
        async with trio.open_nursery() as nursery:
            service = await nursery.start(_serve, config, send_channel, drop_channel)
            receiver = MulticastReceiver(service, receive_channel)
            try:
                yield receiver
            except BaseException as exc:
                unwrap.body = exc  # passed on exactly as raised
                raise
            finally:
                nursery.cancel_scope.cancel()
                receive_channel.close()
