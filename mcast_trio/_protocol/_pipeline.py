"""The receive pipeline: what happens to a batch of received datagrams between
the socket and the consumer, with no socket and no trio in it.

A :class:`ReceivePipeline` is fed a filled receive batch (its buffer, lengths,
sources and truncation flags, see :class:`mcast_trio._io._batchio.ReceiveBatch`)
and the time, and returns what to deliver: a :class:`ReadoutChunk` (readout
mode) or a list of :class:`~mcast_trio.Message` (message mode), or None. On the
way it counts (datagrams, bytes, truncated, malformed, filtered, readouts,
hits, messages), decodes readouts in batches, reassembles framed messages,
applies topics and filters, and tracks loss per sender. The counters live in
one place, :attr:`ReceivePipeline.counters`; the trio receive loop adds what
only it knows (channel drops, kernel drops, the granted buffer).

Datagrams that are handled one by one in Python (a filter callable or regular
expression, framed modes) can take unbounded time (an MCL "array bomb", a slow
filter). :meth:`ReceivePipeline.feed` is therefore a generator: it yields
whenever ``clock()`` has passed :attr:`ReceivePipeline.deadline` between two
datagrams, and the driver (the trio loop) lets other tasks run, sets a new
deadline and resumes it with the current time; its return value (the
``StopIteration`` value) is what to deliver. :meth:`ReceivePipeline.run` runs
it to completion without pausing, for tests and callers without a time budget.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from types import GeneratorType, MappingProxyType
from typing import Any, Callable, Generator, Mapping

import numpy as np

from .._batch import CARRY_MODES, DecodedBatch, decode_chains, decode_trusted
from .._counters import counters_for
from .._errors import MalformedFrame
from .._format import readout_id_of
from .._validate import check_int
from ._filters import make_filter
from ._framings import Framing, lookup_framing
from ._message import Message
from ._native import NativeDecoder, parse_header
from ._reassembly import ReassemblyStats
from ._kernels import batch_summary, gather
from ._tracking import SenderStats, SenderTable

__all__ = ["ReceivePipeline", "ReadoutChunk", "ReceiverStatistics"]

_CONSECUTIVE = CARRY_MODES["consecutive"]


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
        discarded: datagrams still queued in the socket when the receiver
            closed: taken out unread (counted in ``datagrams`` and
            ``bytes``, never decoded), so that after close
            ``datagrams + kernel_drops`` is what reached the socket.
        kernel_drops: datagrams the kernel dropped for lack of buffer space
            since the socket was opened (the socket's drop counter, as
            ``SO_RXQ_OVFL`` and ``SO_MEMINFO`` report it, read when the
            receive task goes idle and whenever statistics are taken, so
            that drops after the last queued datagram are included; it does
            not wrap at 2**32): 0 from the start where the OS reports it
            (Linux), None only where it does not.
        lost: sum over every sender seen, including those no longer in
            ``senders`` (evicted when more than ``max_senders`` were seen;
            one that comes back continues its sequence, so what it lost
            meanwhile is counted). It goes down only when a late arrival
            inside ``loss_window`` fills a gap counted as lost (the id moves
            to ``reordered``).
        duplicates: likewise.
        reordered: likewise.
        restarts: likewise.
        evicted: senders evicted from ``senders`` to make room for new ones
            (their counts stay in the totals).
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
    discarded: int = 0
    kernel_drops: int | None = None
    lost: int = 0
    duplicates: int = 0
    reordered: int = 0
    restarts: int = 0
    evicted: int = 0
    senders: Mapping[Any, SenderStats] = field(default_factory=dict)
    reassembly: ReassemblyStats | None = None
    rcvbuf: int = 0
    last_error: str | None = None


#: The live counters of a receiver (one owner: the pipeline and its driver).
ReceiverCounters = counters_for(ReceiverStatistics, name="ReceiverCounters")


class ReadoutChunk:
    """The well-formed readouts of one receive batch, decoded together: what
    a readout-mode receive task puts into its channel.

    ``len(chunk)`` is the number of readouts; iterating yields them as
    ``readout_class`` objects (built from the bytes, which the chunk holds
    unless the consumer asked for decoded batches only); :attr:`batch` is the
    :class:`~mcast_trio.DecodedBatch` (hits and per-readout rows).

    Attributes:
        batch: the decoded batch (well-formed rows only; ``errors`` is empty,
            malformed datagrams are counted in the receiver's statistics).
        data: the serialized readouts back to back, or None when the receiver
            was told not to keep them (``MulticastReceiver.batches()``).
        lengths: ``int64`` array, the size of each serialized readout in
            ``data``.
        readout_class: the class :meth:`readouts` builds (e.g.
            :class:`~mcast_trio.AstroPix4Readout`).
        sources: the senders of the readouts, ``(host, port)`` (IPv6 with
            its flow info and scope), each once, in order of first
            appearance; empty where the network gives no source.
        source_index: ``intp`` array, readout ``k`` came from
            ``sources[source_index[k]]``; None when every readout came from
            ``sources[0]`` (the common case).
    """

    __slots__ = ("data", "lengths", "batch", "readout_class", "sources", "source_index")

    def __init__(self, data: bytes | None, lengths: np.ndarray, batch: DecodedBatch,
                 readout_class: Any, sources: tuple = (), source_index: np.ndarray | None = None) -> None:
        self.data = data
        self.lengths = lengths
        self.batch = batch
        self.readout_class = readout_class
        self.sources = sources
        self.source_index = source_index

    def by_source(self) -> list[tuple[Any, np.ndarray | None]]:
        """``[(source, rows), ...]``: the readouts of each sender, senders in
        order of first appearance; ``rows`` are the indices of its readouts
        in this chunk (in arrival order), None for all of them."""
        if self.source_index is None:
            return [(self.sources[0] if self.sources else None, None)]
        order = np.argsort(self.source_index, kind="stable")
        bounds = np.searchsorted(self.source_index[order], np.arange(len(self.sources) + 1))
        return [(source, order[bounds[g]:bounds[g + 1]]) for g, source in enumerate(self.sources)]

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(self.readouts())

    def readouts(self) -> list:
        """The readouts as ``readout_class`` objects, in arrival order.

        Raises:
            RuntimeError: the chunk carries no bytes (its receiver delivers
                decoded batches only).
        """
        if self.data is None:
            raise RuntimeError("receive() after receive_batch()/batches(): use one style per receiver")
        from_bytes = self.readout_class.from_bytes
        view = memoryview(self.data)
        items = []
        start = 0
        for length in self.lengths.tolist():
            items.append(from_bytes(view[start:start + length]))
            start += length
        return items

    def __repr__(self) -> str:
        return f"<ReadoutChunk {len(self)} readouts, {len(self.batch.hits)} hits>"


def _well_formed(decoded: DecodedBatch, keep: np.ndarray) -> DecodedBatch:
    """``decoded`` with only the rows at indices ``keep`` (its well-formed
    ones).

    Malformed rows own no hits, so the ``first_hit``/``n_hits`` slices of the
    rows kept still index ``hits``; ``errors`` is emptied (its indices were
    rows of the full batch; the pipeline counts them). ``take`` with indices:
    several times faster than a boolean mask on a record array.
    """
    return DecodedBatch(hits=decoded.hits, readouts=decoded.readouts.take(keep), errors=(),
                        extra_bytes=decoded.extra_bytes, last_id=decoded.last_id,
                        backend=decoded.backend)


class _CarryTable:
    """The decoding carry of each sender: the extra bytes its last readout
    left and that readout's id, so that a hit split across two readouts of
    one sender is never completed with the bytes of another. A batch is
    decoded in one compiled call whatever the number of its senders (rows
    in arrival order, one carry chain per sender). Only senders with a
    well-formed readout take a slot (malformed datagrams from a new source
    take none). Bounded like the sender table: past ``max_senders`` the
    sender seen least recently is forgotten (at worst the first hit of its
    next readout is not completed: the same as a lost readout)."""

    __slots__ = ("_max", "_state")

    def __init__(self, max_senders: int) -> None:
        self._max = max_senders
        self._state: OrderedDict[Any, tuple[bytes | None, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._state)

    def _keep(self, key, extra: bytes | None, last_id: int) -> None:
        state = self._state
        if key in state:
            state.move_to_end(key)
        elif len(state) >= self._max:
            state.popitem(last=False)
        state[key] = (extra, last_id)

    def decode(self, key, buf, offsets: np.ndarray, lengths: np.ndarray) -> DecodedBatch:
        """Decode the readouts of sender ``key`` (in its arrival order),
        carrying on from and into its own state."""
        extra, last_id = self._state.get(key, (None, -1))
        decoded = decode_trusted(buf, offsets, lengths, extra, last_id, _CONSECUTIVE)
        if len(decoded.errors) < len(lengths):  # a well-formed readout
            self._keep(key, decoded.extra_bytes, decoded.last_id)
        return decoded

    def decode_senders(self, buf, offsets: np.ndarray, lengths: np.ndarray, inverse: np.ndarray,
                       keys: list) -> DecodedBatch:
        """Decode readouts of several senders in one compiled call: row
        ``k`` came from sender ``keys[inverse[k]]`` and carries on its
        chain; rows stay in arrival order. The result's
        ``extra_bytes``/``last_id`` are None/-1: the carries stay here."""
        if len(keys) == 1:
            return self.decode(keys[0], buf, offsets, lengths)
        get = self._state.get
        initial = [get(key, (None, -1)) for key in keys]
        extras = np.frombuffer(b"".join([(e or b"").ljust(8, b"\0")[:8] for e, _l in initial]),
                               dtype=np.uint8).copy()
        extra_lens = np.array([-1 if e is None else min(len(e), 8) for e, _l in initial], dtype=np.int8)
        last_ids = np.array([last for _e, last in initial], dtype=np.int64)
        chain = inverse.astype(np.int64, copy=False)
        decoded = decode_chains(buf, offsets, lengths, chain, extras, extra_lens, last_ids, _CONSECUTIVE)
        if decoded.errors:
            formed = np.bincount(chain[~decoded.readouts.malformed], minlength=len(keys))
            senders = np.flatnonzero(formed).tolist()
        else:
            senders = range(len(keys))
        lens = extra_lens.tolist()
        lasts = last_ids.tolist()
        raw = extras.tobytes()
        keep = self._keep
        for g in senders:
            n = lens[g]
            keep(keys[g], None if n < 0 else raw[8 * g:8 * g + n], lasts[g])
        return decoded


def _batch_senders(batch, positions: np.ndarray) -> tuple[np.ndarray, list]:
    """``(inverse, keys)``: the datagrams at ``positions`` of ``batch`` came
    from ``keys[inverse[k]]`` (numpy on the address arrays, one source
    lookup per sender, none per datagram)."""
    families = batch.families[positions]
    if (families != 6).all():
        # IPv4 (or no address): family, address and port fit in 64 bits.
        flat = ((families.astype(np.uint64) << np.uint64(56))
                | (batch.addresses[positions, :4].copy().view(">u4").ravel().astype(np.uint64)
                   << np.uint64(16))
                | batch.ports[positions].astype(np.uint64))
    else:
        raw = np.concatenate([
            families[:, None], batch.addresses[positions],
            batch.ports[positions].view(np.uint8).reshape(-1, 2),
            batch.scope_ids[positions].view(np.uint8).reshape(-1, 4)], axis=1)
        flat = np.ascontiguousarray(raw).view(np.dtype((np.void, raw.shape[1]))).ravel()
    _unique, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    keys = [_source(batch, int(positions[k])) for k in first.tolist()]
    return inverse.reshape(-1), keys


def _first_appearance(inverse: np.ndarray, keys: list) -> tuple[tuple, np.ndarray | None]:
    """``(sources, index)``: the senders ``keys[inverse[k]]`` of the rows,
    renumbered in order of first appearance (senders with no row left out);
    index None when one sender is left."""
    present, first, renumbered = np.unique(inverse, return_index=True, return_inverse=True)
    if len(present) == 1:
        return (keys[int(present[0])],), None
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), dtype=np.intp)
    rank[order] = np.arange(len(order), dtype=np.intp)
    return tuple(keys[int(present[g])] for g in order.tolist()), rank[renumbered.reshape(-1)]


def _source(batch, i: int) -> tuple:
    source = batch.source(i)
    # Loss is tracked per (host, port); IPv6 sources keep their scope.
    return source[:2] if source is not None and len(source) == 2 else source


class ReceivePipeline:
    """Turns received batches into deliverable items; sans-I/O.

    Args:
        readout_class: a readout class (``from_bytes``): items are
            :class:`ReadoutChunk` objects; None: lists of :class:`Message`.
        framing: a :class:`Framing` or its name (``"auto"``: raw with a
            readout class, native otherwise).
        topics, filter: as :func:`~mcast_trio.open_receiver` (validated
            there).
        max_senders, loss_window: bounds of the per-sender loss accounting.
        reassembly: ``(timeout, max_messages, max_bytes)`` of the fragment
            reassembly (framed modes).
        clock: the clock :attr:`deadline` is compared with (default
            ``time.perf_counter``: real time, which a virtual trio clock does
            not see).
        on_malformed: called as ``on_malformed(payload, source)`` with the
            bytes of every malformed datagram (or framed payload) as it is
            counted, e.g. to keep it in a capture file; it must not block.

    Attributes:
        counters: the live :class:`ReceiverCounters`; :meth:`statistics`
            freezes them.
        deadline: ``clock()`` value after which :meth:`feed` pauses between
            two datagrams handled in Python (``math.inf``: never).
        keep_bytes: whether readout chunks carry the serialized readouts
            (consumers of single readouts need them; consumers of decoded
            batches do not, and save a copy per batch).
        built_bytes: an upper bound of the memory of the topics and
            payloads of every message built so far (message mode; an MCL
            object payload as :attr:`~mcast_trio.MclDecoder.built_bytes`
            bounds it): what a receiver charges to its byte bound.
        max_item_bytes: None (one item per batch), or the bytes
            (:attr:`built_bytes`) past which the messages of one batch
            built so far are handed out as an item of their own before the
            rest of the batch is decoded (message mode), so that one
            receive batch never becomes an unbounded item.
    """

    def __init__(self, *, readout_class=None, framing: Framing | str = "auto", topics=None, filter=None,
                 max_senders: int = 64, loss_window: int = 1024,
                 reassembly: tuple[float, int, int] = (2.0, 256, 32 << 20),
                 clock: Callable[[], float] = time.perf_counter,
                 on_malformed: Callable[[bytes, Any], None] | None = None) -> None:
        if not isinstance(framing, Framing):
            framing = lookup_framing(framing)
        framing = framing.resolve(readouts=readout_class is not None)
        self.readout_class = readout_class
        self.framing = framing
        self.counters = ReceiverCounters()
        self.deadline = math.inf
        self.keep_bytes = True
        self.clock = clock
        self.on_malformed = on_malformed
        # Named as this class takes them (SenderTable would say window=).
        max_senders = check_int("max_senders", max_senders, 1, 1 << 20)
        loss_window = check_int("loss_window", loss_window, 1, 1 << 16)
        self._built_own = 0  # built_bytes of messages the decoder does not count
        self.max_item_bytes: int | None = None
        self.senders: SenderTable = SenderTable(max_senders=max_senders, window=loss_window)
        timeout, max_messages, max_bytes = reassembly
        self.reassembly_timeout = timeout
        self._decoder = None
        if framing.decoder is NativeDecoder:
            # The native decoder decides topics from the header, before the
            # payload is parsed, and reports sender restarts.
            self._decoder = NativeDecoder(topics, on_restart=self._sender_restarted, timeout=timeout,
                                          max_messages=max_messages, max_bytes=max_bytes)
            topics = None
        elif framing.decoder is not None:
            self._decoder = framing.decoder(timeout=timeout, max_messages=max_messages, max_bytes=max_bytes)
        self._accept = make_filter(topics, filter)
        self._accept_all = filter is None and topics is None
        self._raw_readouts = readout_class is not None and framing.decoder is None
        # The decoding carry, per sender (address, port).
        self._carry = _CarryTable(max_senders)
        self._same_source = False

    def _sender_restarted(self, source, sender_id: int) -> None:
        # The reassembler saw this sender start over (same address and
        # sender_id, new messages under old sequence numbers): its loss
        # accounting starts over too, rather than counting the new run as
        # duplicates of the old one.
        self.senders.restart((*source, sender_id))

    # -- what the driver asks ----------------------------------------------

    @property
    def built_bytes(self) -> int:
        decoder = self._decoder
        return self._built_own + (decoder.built_bytes if hasattr(decoder, "built_bytes") else 0)

    @property
    def pending(self) -> bool:
        """Whether incomplete messages are held (the driver must come back
        to :meth:`expire` them even if nothing arrives)."""
        return self._decoder is not None and self._decoder.stats.pending > 0

    def expire(self, now: float) -> None:
        """Drop incomplete messages whose reassembly timed out."""
        if self._decoder is not None:
            self._decoder.expire(now)

    def statistics(self) -> ReceiverStatistics:
        """A frozen snapshot of the counters."""
        senders = self.senders.snapshot()
        c = self.counters
        decoder = self._decoder
        return c.snapshot(
            filtered=c.filtered + (decoder.filtered if isinstance(decoder, NativeDecoder) else 0),
            senders=MappingProxyType(senders),
            **self.senders.totals(senders),
            reassembly=decoder.stats if decoder is not None else None,
        )

    def run(self, batch, n: int, now: float):
        """:meth:`feed` to completion, without pausing; return what to
        deliver (or None): the items it hands out on the way (message mode,
        :attr:`max_item_bytes`) joined into one list."""
        work = self.feed(batch, n, now)
        parts: list = []
        try:
            while True:
                part = work.send(None)
                if part is not None:
                    parts.extend(part)
        except StopIteration as stop:
            if not parts:
                return stop.value
            return parts + (stop.value or [])

    def feed(self, batch, n: int, now: float) -> Generator[None, float | None, Any]:
        """Handle the first ``n`` datagrams of ``batch`` received at ``now``.

        A generator: it yields None when ``clock()`` passed :attr:`deadline`
        between two datagrams handled in Python, and, in message mode, a
        list of messages to deliver at once when those built since the last
        item hold more than :attr:`max_item_bytes`; resume it with
        ``send(t)`` (the current time, or None to keep ``now``). Its return
        value is what to deliver: a :class:`ReadoutChunk`, a list of
        messages, or None when nothing is left to deliver.
        """
        self._account(batch, n)
        if self._raw_readouts:
            return (yield from self._readout_batch(batch, n))
        return (yield from self._message_batch(batch, n, now))

    # -- internals ----------------------------------------------------------

    def _account(self, batch, n: int) -> None:
        c = self.counters
        total, truncated, self._same_source = batch_summary(
            batch.lengths, batch.truncated.view(np.uint8), batch.families, batch.addresses,
            batch.ports, n)
        c.datagrams += n
        c.bytes += total
        if truncated:
            c.truncated += truncated
            c.last_error = (f"a datagram longer than max_datagram_size={batch.slot_size}"
                            " bytes was truncated and skipped")

    def _readout_batch(self, batch, n: int):
        c = self.counters
        offsets = batch.offsets[:n]
        lengths = batch.lengths[:n]
        keep = batch.truncated[:n] == 0
        rejected = None  # (position, readout id) of readouts the filter rejected
        if not self._accept_all:
            view = memoryview(batch.buffer)
            rejected = []
            clock = self.clock
            deadline = self.deadline
            accept = self._accept
            for i in range(n):
                if not keep[i]:
                    continue
                if clock() >= deadline:
                    # A slow filter: pause between datagrams, not only
                    # between batches (the driver sets a new deadline).
                    yield
                    deadline = self.deadline
                payload = view[offsets[i]:offsets[i] + lengths[i]].tobytes()
                if not accept(None, payload, _source(batch, i)):
                    keep[i] = False
                    c.filtered += 1
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
            return None
        inverse = None
        if self._same_source:
            # The common case: one sender, one compiled call.
            key = _source(batch, int(index[0]) if index is not None else 0)
            decoded = self._carry.decode(key, batch.buffer, offsets, lengths)
        else:
            key = None
            inverse, keys = _batch_senders(batch, index if index is not None else np.arange(len(lengths)))
            if len(keys) > 64 and self.clock() >= self.deadline:
                yield  # many senders: their keys took a while
            decoded = self._carry.decode_senders(batch.buffer, offsets, lengths, inverse, keys)
            if len(keys) == 1:
                key = keys[0]
                inverse = None
        rows = decoded.readouts
        if decoded.errors:
            c.malformed += len(decoded.errors)
            c.last_error = decoded.errors[-1][1]
            good = ~rows.malformed
            if self.on_malformed is not None:
                view = memoryview(batch.buffer)
                for k, _reason in decoded.errors:
                    start = int(offsets[k])
                    self.on_malformed(view[start:start + int(lengths[k])].tobytes(),
                                      _source(batch, int(index[k]) if index is not None else k))
        else:
            good = None
        c.readouts += len(rows) - len(decoded.errors)
        c.hits += len(decoded.hits)
        pending = self._track_readouts(batch, rows, lengths, good, index, rejected, key,
                                       None if key is not None else (inverse, keys))
        if pending is not None:
            yield from pending
        if good is not None:
            # Malformed datagrams are counted, never delivered.
            keep = np.flatnonzero(good)
            if len(keep) == 0:
                return None
            offsets = offsets.take(keep)
            lengths = lengths.take(keep)
            decoded = _well_formed(decoded, keep)
            if inverse is not None:
                inverse = inverse.take(keep)
        data = gather(batch.buffer, offsets, lengths) if self.keep_bytes else None
        if inverse is None:
            return ReadoutChunk(data, lengths.copy(), decoded, self.readout_class,
                                (key,) if key is not None else ())
        sources, source_index = _first_appearance(inverse, keys)
        return ReadoutChunk(data, lengths.copy(), decoded, self.readout_class, sources, source_index)

    def _track_readouts(self, batch, rows, lengths, good, index, rejected=None, key=None,
                        groups=None):
        """Loss accounting and volume (hits, bytes) per sender of the decoded
        ``rows`` (``lengths``: their datagram sizes; ``good``: the
        well-formed rows, None: all; ``index``: their positions in the
        batch, None: the same; ``key``: their one sender, if known;
        ``groups``: else ``(inverse, keys)``, row ``k`` came from
        ``keys[inverse[k]]``). Returns None, or for several senders a
        generator to run to its end (it pauses between senders once past
        :attr:`deadline`)."""
        if good is None:
            ids, hits, sizes = rows.readout_id, rows.n_hits, lengths
            positions = np.arange(len(rows))
        else:
            ids, hits, sizes = rows.readout_id[good], rows.n_hits[good], lengths[good]
            positions = np.flatnonzero(good)
        if index is not None:
            positions = index[positions]
        if rejected:
            # Readouts a filter rejected were received all the same: they are
            # no loss. Account for them in arrival order with the others.
            self._track_pairs(batch, sorted([*zip(positions.tolist(), ids.tolist()), *rejected]))
            self._add_volume(batch, positions, hits, sizes)
            return
        if len(ids) == 0:
            return
        if groups is not None:
            inverse, keys = groups
            if good is not None:
                inverse = inverse[good]
            return self._track_groups(ids, hits, sizes, inverse, keys)
        first = int(positions[0])
        if self._same_source or batch.same_source(positions):
            tracker = self.senders.tracker(key if key is not None else _source(batch, first))
            tracker.observe_many(ids)
            tracker.add_volume(int(hits.sum()), int(sizes.sum()))
            return
        self._track_pairs(batch, zip(positions.tolist(), ids.tolist()))
        self._add_volume(batch, positions, hits, sizes)

    def _track_groups(self, ids, hits, sizes, inverse, keys):
        """Loss accounting and volume of rows from several senders (row
        ``k`` from ``keys[inverse[k]]``): the rows sorted by sender once
        (stable: each sender's readouts stay in arrival order), then one
        ``observe_many`` per sender, pausing past the deadline."""
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(keys))
        present = np.flatnonzero(counts)
        bounds = np.zeros(len(present) + 1, dtype=np.int64)
        np.cumsum(counts[present], out=bounds[1:])
        starts = bounds[:-1]
        ids = ids[order]
        hit_sums = np.add.reduceat(hits[order].astype(np.int64), starts).tolist()
        byte_sums = np.add.reduceat(sizes[order].astype(np.int64), starts).tolist()
        senders = [keys[g] for g in present.tolist()]
        bounds = bounds.tolist()
        observe_runs = self.senders.observe_runs
        clock = self.clock
        step = 128
        for j in range(0, len(senders), step):
            if j and clock() >= self.deadline:
                yield
            stop = min(j + step, len(senders))
            observe_runs(senders[j:stop], ids, bounds[j:stop + 1], hit_sums[j:stop],
                         byte_sums[j:stop])
        return

    def _add_volume(self, batch, positions, hits, sizes) -> None:
        tracker = self.senders.tracker
        for pos, n_hits, size in zip(positions.tolist(), hits.tolist(), sizes.tolist()):
            tracker(_source(batch, pos)).add_volume(n_hits, size)

    def _track_pairs(self, batch, pairs) -> None:
        observe = self.senders.observe
        for pos, rid in pairs:
            observe(_source(batch, pos), rid)

    def _message_batch(self, batch, n: int, now: float):
        c = self.counters
        view = memoryview(batch.buffer)
        offsets = batch.offsets
        lengths = batch.lengths
        truncated = batch.truncated
        decoder = self._decoder
        native = isinstance(decoder, NativeDecoder)
        readout_mode = self.readout_class is not None
        clock = self.clock
        deadline = self.deadline
        # MCL's feed_paced hands a large message back as a generator that
        # unpacks it in slices, yielding between them.
        feed = None if decoder is None else getattr(decoder, "feed_paced", decoder.feed)
        # What the messages built hold: the MCL decoder bounds its object
        # payloads itself; other payloads hold their bytes.
        estimated = hasattr(decoder, "built_bytes")
        split = None if readout_mode else self.max_item_bytes
        own = self._built_own  # added up locally, stored before each item
        item_start = decoder.built_bytes if estimated else own
        out: list[Message] = []
        for i in range(n):
            if truncated[i]:
                continue
            if clock() >= deadline:
                # Datagrams slow to parse (an MCL "array bomb") or a slow
                # filter: pause between datagrams, not only between batches
                # (the driver sets a new deadline).
                resumed = yield
                deadline = self.deadline
                if resumed is not None:
                    now = resumed
            datagram = view[offsets[i]:offsets[i] + lengths[i]]
            source = _source(batch, i)
            if decoder is None:
                message = Message(None, bytes(datagram), source)
            else:
                filtered = decoder.filtered
                try:
                    message = feed(datagram, source, now)
                    if type(message) is GeneratorType:
                        message = yield from message  # the loop runs between slices
                        deadline = self.deadline
                except MalformedFrame as exc:
                    c.malformed += 1
                    c.last_error = str(exc)
                    if self.on_malformed is not None:
                        self.on_malformed(bytes(datagram), source)
                    continue
                if message is None:
                    if native and decoder.filtered != filtered:
                        # Rejected by topic, but received: not a loss.
                        header = parse_header(datagram)
                        if header.index == 0:
                            self.senders.observe((*source, header.sender_id), header.sequence)
                    continue
                if message.sender_id is not None:
                    key = (*source, message.sender_id)
                    self.senders.observe(key, message.sequence)
                    if not readout_mode:
                        self.senders.tracker(key).add_volume(0, len(message.payload))
                elif readout_mode and type(message.payload) is not bytes:
                    # An MCL payload that is an object (dict, int...), not a readout.
                    c.malformed += 1
                    c.last_error = (f"MCL payload is {type(message.payload).__name__}, "
                                    f"expected a serialized readout (bytes)")
                    if self.on_malformed is not None:
                        self.on_malformed(bytes(datagram), source)
                    continue
            if not estimated:
                own += len(message.payload) + (len(message.topic) if message.topic else 0)
            if not self._accept_all and not self._accept(message.topic, message.payload, source):
                c.filtered += 1
                continue
            out.append(message)
            if split is not None:
                built = decoder.built_bytes if estimated else own
                if built - item_start > split:
                    # One batch must not become an unbounded item: hand out
                    # what this one built so far before decoding the rest.
                    c.messages += len(out)
                    self._built_own = own
                    resumed = yield out
                    out = []
                    item_start = decoder.built_bytes if estimated else own
                    deadline = self.deadline
                    if resumed is not None:
                        now = resumed
        self._built_own = own
        if not out:
            return None
        c.messages += len(out)
        if not readout_mode:
            return out
        # Framed readouts: decode the payloads of this batch together, each
        # sender (address, port) carrying on its own chain.
        payloads = [m.payload for m in out]
        lengths = np.fromiter((len(p) for p in payloads), dtype=np.int64, count=len(payloads))
        offsets = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1], out=offsets[1:])
        groups: dict[Any, int] = {}
        inverse = np.fromiter((groups.setdefault(m.address, len(groups)) for m in out),
                              dtype=np.int64, count=len(out))
        joined = b"".join(payloads)
        decoded = self._carry.decode_senders(joined, offsets, lengths, inverse, list(groups))
        c.malformed += len(decoded.errors)
        c.readouts += len(decoded.readouts) - len(decoded.errors)
        c.hits += len(decoded.hits)
        if decoded.errors:
            c.last_error = decoded.errors[-1][1]
            if self.on_malformed is not None:
                for k, _reason in decoded.errors:
                    self.on_malformed(bytes(out[k].payload), out[k].address)
            # Malformed readouts are counted, never delivered.
            keep = np.flatnonzero(~decoded.readouts.malformed)
            if len(keep) == 0:
                return None
            out = [out[k] for k in keep.tolist()]
            decoded = _well_formed(decoded, keep)
            lengths = lengths.take(keep)
            inverse = inverse.take(keep)
            joined = None
        if native:
            tracker = self.senders.tracker
            for m, n_hits, size in zip(out, decoded.readouts.n_hits.tolist(), lengths.tolist()):
                tracker((*m.address, m.sender_id)).add_volume(n_hits, size)
        if not self.keep_bytes:
            data = None
        else:
            data = joined if joined is not None else b"".join(m.payload for m in out)
        sources, source_index = _first_appearance(inverse, list(groups))
        return ReadoutChunk(data, lengths, decoded, self.readout_class, sources, source_index)
