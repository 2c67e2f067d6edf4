"""Per-sender sequence accounting: losses, duplicates, reordering, restarts.

Sans-I/O: nothing here touches a socket, a clock or trio. A receiver feeds
every arrival's sequence number (the 32-bit readout id of an AstroPix
readout, or the sequence number of a native frame) to the
:class:`SequenceTracker` of its sender and reads the counters back as an
immutable :class:`SenderStats` snapshot. :class:`SenderTable` keeps one
tracker per sender, with a bound on the number of senders.

Sequence numbers are compared with serial-number arithmetic (RFC 1982): with
``modulus`` M, id ``b`` is *after* id ``a`` when ``(b - a) mod M`` is in
``1 .. M//2 - 1``, so ``M - 1`` is followed by ``0`` (a wrap-around is not a
restart).

Meaning of the counters (all cumulative over restarts):

* ``received``: arrivals of ids not seen before (first, new, reordered and
  restart arrivals; duplicates are not counted). Between restarts,
  ``received + lost`` is the number of ids from the first to the highest.
* ``lost``: ids never received. When a gap opens, the missing ids are counted
  as lost at once; an id that then arrives late, while it is still inside the
  ``window`` below the highest id, is taken back out of ``lost`` and counted
  in ``reordered``. Once an id has fallen out of the window its loss is final.
* ``duplicates``: copies of an id already received, recognised while the id
  is inside the window.
* ``reordered``: arrivals below the highest id seen so far (and inside the
  window) that are not duplicates.
* ``restarts``: the sender started over. An id ``window`` or more before
  the highest one (too old to be a late arrival the tracker can place), or
  more than ``restart_threshold`` after it, restarts the tracking from that
  id instead of counting millions of losses. Losses already counted stay.
  An id that goes back to before the *first* id of the stream (the first
  arrival, or the last restart) is also a restart, even inside the window:
  it cannot be a late copy of anything counted, and calling it "reordered"
  would make the restarted stream's next ids look like duplicates (a DAQ
  that restarts its readout ids at 0 after a short run). And a caller that
  learns of a restart otherwise (e.g. from the payloads: a native
  reassembler seeing different bytes under a message key it completed)
  says so with :meth:`SequenceTracker.restart`: the restart is counted and
  the next id starts the stream afresh.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .._validate import check_int

__all__ = [
    "sender_totals",
    "FIRST",
    "NEW",
    "DUPLICATE",
    "REORDERED",
    "RESTART",
    "SenderStats",
    "SequenceTracker",
    "SenderTable",
]

#: :meth:`SequenceTracker.observe` results.
FIRST = "first"
NEW = "new"
DUPLICATE = "duplicate"
REORDERED = "reordered"
RESTART = "restart"

_MAX_WINDOW = 1 << 16
_MIN_MODULUS = 16
_MAX_MODULUS = 1 << 64


@dataclass(frozen=True, slots=True)
class SenderStats:
    """Immutable snapshot of one sender's counters (see the module docstring).

    Attributes:
        received: Distinct ids received (duplicates excluded).
        lost: Ids never received (provisional while inside the window).
        duplicates: Copies of ids already received.
        reordered: Late arrivals placed inside the window.
        restarts: Times the sender's numbering started over.
        highest: The highest id seen since the last restart, or None before
            the first arrival (and after :meth:`SequenceTracker.restart`
            until the next one).
        hits: Hits decoded from this sender's readouts (receivers in
            readout mode; 0 otherwise).
        bytes: Bytes of this sender's well-formed readouts or messages as
            received (raw: the datagrams; framed: the payloads).
    """

    received: int = 0
    lost: int = 0
    duplicates: int = 0
    reordered: int = 0
    restarts: int = 0
    highest: int | None = None
    hits: int = 0
    bytes: int = 0


try:
    import numpy as _np

    from ._kernels import unit_run as _unit_run

    _U32 = _np.dtype(_np.uint32)
except ImportError:  # pragma: no cover - not compiled
    _unit_run = None
    _U32 = None


def _is_unit_run(seqs, modulus: int) -> bool:
    """True if every id in ``seqs`` follows the one before it by exactly 1."""
    if len(seqs) < 2:
        return True
    if hasattr(seqs, "dtype") and modulus == 1 << 32 and seqs.dtype.kind in "ui":
        if seqs.dtype == _U32 and _unit_run is not None:
            return _unit_run(seqs)
        import numpy as np

        steps = np.diff(seqs.astype(np.uint32, copy=False))  # wraps mod 2**32
        return bool((steps == 1).all())
    return all((b - a) % modulus == 1 for a, b in zip(seqs, seqs[1:]))


class SequenceTracker:
    """Classify the sequence numbers of one sender as they arrive.

    Args:
        window: How many ids below the highest one are remembered (received
            or not), to tell a late arrival from a duplicate. Allowed:
            ``1 .. min(65536, modulus // 2 - 1)``.
        restart_threshold: A jump forward by more than this many ids is a
            restart rather than a loss. Default: ``min(2**20, modulus // 4)``.
            Allowed: ``1 .. modulus // 2 - 1``.
        modulus: Sequence numbers are integers in ``0 .. modulus - 1`` and
            wrap around. Default ``2**32``. Allowed: ``16 .. 2**64``.

    Raises:
        TypeError, ValueError: An argument has the wrong type or is out of
            range; the message names it.
    """

    __slots__ = (
        "_window",
        "_threshold",
        "_modulus",
        "_half",
        "_full",
        "_highest",
        "_mask",
        "_span",
        "received",
        "lost",
        "duplicates",
        "reordered",
        "restarts",
        "hits",
        "bytes",
    )

    def __init__(
        self,
        window: int = 1024,
        restart_threshold: int | None = None,
        modulus: int = 1 << 32,
    ) -> None:
        modulus = check_int("modulus", modulus, _MIN_MODULUS, _MAX_MODULUS, allowed=f"{_MIN_MODULUS}..2**64")
        half = modulus // 2
        window = check_int("window", window, 1, min(_MAX_WINDOW, half - 1))
        if restart_threshold is None:
            restart_threshold = min(1 << 20, modulus // 4)
        restart_threshold = check_int("restart_threshold", restart_threshold, 1, half - 1)
        self._window = window
        self._threshold = restart_threshold
        self._modulus = modulus
        self._half = half
        self._full = (1 << window) - 1
        # Bit k of _mask is set when id (highest - k) has been received.
        self._highest: int | None = None
        self._mask = 0
        # Ids highest-k for k < _span are accounted for (received or lost);
        # ids further back precede the first arrival (or the last restart).
        self._span = 0
        self.received = 0
        self.lost = 0
        self.duplicates = 0
        self.reordered = 0
        self.restarts = 0
        # Volume (not sequence accounting: a restart keeps it).
        self.hits = 0
        self.bytes = 0

    @property
    def window(self) -> int:
        return self._window

    @property
    def restart_threshold(self) -> int:
        return self._threshold

    @property
    def modulus(self) -> int:
        return self._modulus

    @property
    def highest(self) -> int | None:
        """The highest id since the last restart (None before any arrival,
        and after :meth:`restart` until the next one)."""
        return self._highest

    def observe(self, seq: int) -> str:
        """Account for the arrival of ``seq`` and say what it was.

        Args:
            seq: The arriving id, ``0 <= seq < modulus``.

        Returns:
            One of ``"first"``, ``"new"`` (the highest id so far, possibly
            after a gap), ``"duplicate"``, ``"reordered"`` (a late arrival
            inside the window) or ``"restart"``.

        Raises:
            ValueError: ``seq`` is outside ``0 .. modulus - 1`` (a caller
                bug: parsers only produce ids in range).
        """
        modulus = self._modulus
        if not 0 <= seq < modulus:
            raise ValueError(f"seq={seq!r} is out of range; allowed: 0..{modulus - 1}")
        highest = self._highest
        if highest is None:
            self._highest = seq
            self._mask = 1
            self._span = 1
            self.received += 1
            return FIRST
        diff = (seq - highest) % modulus
        if diff == 0:
            self.duplicates += 1
            return DUPLICATE
        if diff < self._half:
            # Forward.
            if diff > self._threshold:
                return self._restart(seq)
            self.lost += diff - 1
            window = self._window
            if diff < window:
                self._mask = ((self._mask << diff) | 1) & self._full
                span = self._span + diff
                self._span = span if span < window else window
            else:
                self._mask = 1
                self._span = window
            self._highest = seq
            self.received += 1
            return NEW
        # Backward by `back` ids.
        back = modulus - diff
        if back >= self._span:
            # Outside the window, or before the first id of this stream.
            return self._restart(seq)
        bit = 1 << back
        if self._mask & bit:
            self.duplicates += 1
            return DUPLICATE
        self._mask |= bit
        self.lost -= 1
        self.reordered += 1
        self.received += 1
        return REORDERED

    def add_volume(self, hits: int, nbytes: int) -> None:
        """Count ``hits`` decoded and ``nbytes`` received from this sender
        (what the receivers report per sender next to the sequence counters)."""
        self.hits += hits
        self.bytes += nbytes

    def observe_many(self, seqs) -> None:
        """Account for the arrival of every id in ``seqs``, in order.

        Same result as calling :meth:`observe` for each; a run of ids that
        continues the stream one by one (the common case: a batch of
        consecutive readouts) is accounted for in constant time.

        Args:
            seqs: a sequence of ids (a numpy integer array is fastest).
        """
        count = len(seqs)
        if count == 0:
            return
        modulus = self._modulus
        highest = self._highest
        first = int(seqs[0])
        last = int(seqs[-1])
        if (
            highest is not None
            and 0 <= first < modulus
            and first == (highest + 1) % modulus
            and (last - first) % modulus == count - 1
            and count < self._half
            and _is_unit_run(seqs, modulus)
        ):
            window = self._window
            if count >= window:
                self._mask = self._full
            else:
                self._mask = ((self._mask << count) | ((1 << count) - 1)) & self._full
            span = self._span + count
            self._span = span if span < window else window
            self._highest = last
            self.received += count
            return
        for seq in seqs.tolist() if hasattr(seqs, "tolist") else seqs:
            self.observe(seq)

    def resume(self, highest: int, mask: int = 1, span: int = 1) -> int:
        """Continue the stream of a sender whose tracker was forgotten (see
        :class:`SenderTable`): ``highest`` was the highest id it had seen, so
        the next id is compared with it (a gap counts as lost) instead of
        starting afresh. Only on a tracker that has seen nothing yet.

        Args:
            highest: the forgotten tracker's highest id.
            mask, span: its window (see :meth:`window_state`), so that a
                late arrival or a copy of an id inside it is judged as the
                forgotten tracker would have judged it (reordered,
                duplicate) rather than as a restart. Default: only
                ``highest`` is known.

        Returns:
            The ids missing inside that window: the forgotten tracker
            counted them as lost; this tracker now counts them in its
            ``lost`` (so that a late arrival taking one back never leaves
            it negative), and the caller takes them out of wherever it kept
            the forgotten tracker's counts. 0 if nothing was resumed.
        """
        if self._highest is not None or not 0 <= highest < self._modulus:
            return 0
        span = min(max(int(span), 1), self._window)
        visible = (1 << span) - 1
        mask = (int(mask) & visible) | 1
        missing = span - mask.bit_count()
        self._highest = highest
        self._mask = mask
        self._span = span
        self.lost += missing
        return missing

    def window_state(self) -> tuple[int | None, int, int]:
        """``(highest, mask, span)``: the position and window of the stream
        (bit ``k`` of ``mask`` set: id ``highest - k`` was received; ids
        ``highest - k`` for ``k < span`` are accounted for), what
        :meth:`resume` takes."""
        return self._highest, self._mask, self._span

    def restart(self) -> None:
        """The caller knows that the sender started over (its ids no longer
        continue the stream seen so far): count a restart and forget the
        position, so that the next id starts the stream afresh (it is
        counted as received, as a first arrival is, whatever its value).
        Losses already counted stay. Calling it again before the next
        arrival changes nothing (one restart, not two)."""
        if self._highest is None:
            return
        self.restarts += 1
        self._highest = None
        self._mask = 0
        self._span = 0

    def _restart(self, seq: int) -> str:
        self.restarts += 1
        self.received += 1
        self._highest = seq
        self._mask = 1
        self._span = 1
        return RESTART

    def stats(self) -> SenderStats:
        """Return an immutable snapshot of the counters."""
        return SenderStats(
            received=self.received,
            lost=self.lost,
            duplicates=self.duplicates,
            reordered=self.reordered,
            restarts=self.restarts,
            highest=self._highest,
            hits=self.hits,
            bytes=self.bytes,
        )

    def __repr__(self) -> str:
        return (
            f"<SequenceTracker highest={self._highest} received={self.received} "
            f"lost={self.lost} duplicates={self.duplicates} "
            f"reordered={self.reordered} restarts={self.restarts}>"
        )


K = TypeVar("K", bound=Hashable)

#: The per-sender counters the receivers report summed.
_TOTALS = ("lost", "duplicates", "reordered", "restarts")


def sender_totals(senders: Mapping[Any, SenderStats]) -> dict[str, int]:
    """The ``lost``, ``duplicates``, ``reordered`` and ``restarts`` of
    ``senders`` (a :meth:`SenderTable.snapshot`), summed. The receivers
    report :meth:`SenderTable.totals`, which adds what senders no longer
    tracked counted."""
    values = senders.values()
    return {
        "lost": sum(s.lost for s in values),
        "duplicates": sum(s.duplicates for s in values),
        "reordered": sum(s.reordered for s in values),
        "restarts": sum(s.restarts for s in values),
    }


class SenderTable(Generic[K]):
    """One :class:`SequenceTracker` per sender, with a bound on the senders.

    The key is whatever identifies a sender to the caller: a source address
    ``(host, port)``, or ``(address, sender_id)`` for native frames. When a
    new sender would exceed ``max_senders``, the sender seen least recently is
    forgotten and :attr:`evicted` is incremented; what it counted stays in
    :meth:`totals`. The highest id and the window of an evicted sender
    are kept in a compact "ghost" table (at most
    ``min(64 * max_senders, max(65536, max_senders))`` senders, the oldest
    forgotten first; about 100 bytes each, plus ``window / 8`` bytes for a
    sender whose window had ids missing): a sender that comes back
    continues its sequence as if it had never been evicted: readouts lost
    while it was evicted are counted, a late readout still inside its
    window is reordered (its provisional loss taken back) and a copy is a
    duplicate, not a restart. What is approximated: the resumed tracker's
    own counters (``received``, ``hits``, ...) start from 0 (the evicted
    tracker's stay in :meth:`totals`), except that the ids missing in the
    window move back from the evicted counts to its ``lost``. A sender that
    comes back after its ghost was forgotten too starts afresh (losses in
    between are not seen).

    Args:
        max_senders: Most senders tracked at once. Allowed: ``1 .. 2**20``.
        window, restart_threshold, modulus: Passed to every
            :class:`SequenceTracker` (validated here, at construction).

    Raises:
        TypeError, ValueError: An argument has the wrong type or is out of
            range; the message names it.
    """

    def __init__(
        self,
        max_senders: int = 1024,
        *,
        window: int = 1024,
        restart_threshold: int | None = None,
        modulus: int = 1 << 32,
    ) -> None:
        check_int("max_senders", max_senders, 1, 1 << 20, allowed="1..2**20")
        # Validate the tracker arguments now rather than at the first arrival.
        SequenceTracker(window, restart_threshold, modulus)
        self._max_senders = max_senders
        self._factory: Callable[[], SequenceTracker] = lambda: SequenceTracker(
            window, restart_threshold, modulus
        )
        self._trackers: OrderedDict[K, SequenceTracker] = OrderedDict()
        #: Senders forgotten to make room for new ones.
        self.evicted = 0
        # (highest, mask, span) of each evicted sender (insertion order:
        # oldest first; an entry leaves when its sender comes back). A full
        # mask is stored as the shared _full_mask object (no copy per ghost).
        self._ghosts: dict[K, tuple[int, int, int]] = {}
        self._full_mask = (1 << window) - 1
        self._max_ghosts = min(64 * max_senders, max(1 << 16, max_senders))
        # What the senders no longer tracked (evicted or forgotten) counted.
        self._gone = dict.fromkeys(_TOTALS, 0)

    @property
    def max_senders(self) -> int:
        return self._max_senders

    def tracker(self, key: K) -> SequenceTracker:
        """Return the tracker of sender ``key``, creating it (and evicting the
        sender seen least recently, if the table is full) on first use."""
        trackers = self._trackers
        tracker = trackers.get(key)
        if tracker is None:
            if len(trackers) >= self._max_senders:
                old_key, old = trackers.popitem(last=False)
                self._keep_counts(old)
                self.evicted += 1
                highest, mask, span = old.window_state()
                if highest is not None:
                    ghosts = self._ghosts
                    if len(ghosts) >= self._max_ghosts:
                        del ghosts[next(iter(ghosts))]
                    if mask == self._full_mask:
                        mask = self._full_mask
                    ghosts[old_key] = (highest, mask, span)
            tracker = trackers[key] = self._factory()
            if self._ghosts:
                ghost = self._ghosts.pop(key, None)
                if ghost is not None:
                    # The missing ids of its window were counted lost by the
                    # evicted tracker: they move back to this one.
                    self._gone["lost"] -= tracker.resume(*ghost)
        else:
            trackers.move_to_end(key)
        return tracker

    def observe(self, key: K, seq: int) -> str:
        """Feed ``seq`` to the tracker of sender ``key`` (created on first use).

        Returns:
            What :meth:`SequenceTracker.observe` returns.
        """
        return self.tracker(key).observe(seq)

    def observe_runs(self, keys, seqs, bounds, hits, nbytes) -> None:
        """Account for the readouts of several senders at once: sender
        ``keys[j]`` sent ``seqs[bounds[j]:bounds[j + 1]]`` (in its arrival
        order), ``hits[j]`` hits and ``nbytes[j]`` bytes. One
        :meth:`SequenceTracker.observe_many` per sender."""
        tracker = self.tracker
        for j, key in enumerate(keys):
            t = tracker(key)
            t.observe_many(seqs[bounds[j]:bounds[j + 1]])
            t.hits += hits[j]
            t.bytes += nbytes[j]

    def restart(self, key: K) -> None:
        """Sender ``key`` started over: :meth:`SequenceTracker.restart` on its
        tracker (if it is not tracked, its evicted last id is forgotten: its
        next id starts a fresh tracker)."""
        tracker = self._trackers.get(key)
        if tracker is not None:
            tracker.restart()
        else:
            self._ghosts.pop(key, None)

    def get(self, key: K) -> SequenceTracker | None:
        """Return the tracker of ``key``, or None if it is not tracked."""
        return self._trackers.get(key)

    def forget(self, key: K) -> None:
        """Stop tracking ``key`` (no error if it is not tracked); what it
        counted stays in :meth:`totals`."""
        tracker = self._trackers.pop(key, None)
        if tracker is not None:
            self._keep_counts(tracker)

    def _keep_counts(self, tracker: SequenceTracker) -> None:
        gone = self._gone
        for name in _TOTALS:
            gone[name] += getattr(tracker, name)

    def snapshot(self) -> dict[K, SenderStats]:
        """Return ``{key: SenderStats}`` for every tracked sender, least
        recently seen first."""
        return {key: tracker.stats() for key, tracker in self._trackers.items()}

    def totals(self, snapshot: Mapping[K, SenderStats] | None = None) -> dict[str, int]:
        """``lost``, ``duplicates``, ``reordered`` and ``restarts`` summed
        over every sender ever seen, those no longer tracked included, and
        ``evicted``: what the receivers' statistics report.

        Args:
            snapshot: this table's :meth:`snapshot`, if the caller has just
                taken one (saves taking it again).
        """
        totals = sender_totals(self.snapshot() if snapshot is None else snapshot)
        for name, value in self._gone.items():
            totals[name] += value
        totals["evicted"] = self.evicted
        return totals

    def __len__(self) -> int:
        return len(self._trackers)

    def __contains__(self, key: object) -> bool:
        return key in self._trackers

    def __iter__(self) -> Iterator[K]:
        return iter(self._trackers)
