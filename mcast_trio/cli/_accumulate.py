"""The live monitor's state, without I/O: what ``mcast-trio monitor`` counts
and shows, fed with decoded hits and receiver statistics, read by the display.

:class:`Accumulator` keeps

* the hit map: counts per (row, column), 32 x 32 (the row and column fields of
  a hit are 5 bits wide); the part shown is sized from the data (the highest
  row and column seen so far);
* the TOT histogram (``tot_us``), fixed bins from 0 to ``tot_max_us`` plus an
  overflow bin;
* per-sender and total rates (readouts/s, hits/s, MB/s) from the deltas of
  successive :class:`~mcast_trio.ReceiverStatistics` snapshots, and a ring
  buffer of the total readout rate (the history strip);
* alive/stale state per sender, alarms (a silent sender, loss above a
  threshold), and the detection of a new run (a sender's ``restarts``
  counter increased), which resets the accumulators;
* malformed datagrams per source address.

Per-source state is bounded, like the receiver's sender table: the alive
state follows the senders of the latest statistics (the receiver's table,
at most its ``max_senders``), and the malformed counts keep the
``max_sources`` sources seen most recently; a source forgotten to make room
is counted (:attr:`Accumulator.sources_evicted`) and its malformed datagrams
stay in :attr:`Accumulator.malformed_evicted`, so totals never go down.

Counters shown "since reset" are the receiver's cumulative counters minus
their values at the last reset. Nothing here imports trio or rich; the
functions at the end (:func:`shade_rows`, :func:`sparkline`,
:func:`text_bars`) render plain strings.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import numpy as np

from .._validate import check_int

__all__ = [
    "MAX_ROWS",
    "MAX_COLUMNS",
    "MAX_SOURCES",
    "DEFAULT_TOT_MAX_US",
    "COUNTERS",
    "Accumulator",
    "Rates",
    "SenderView",
    "sender_name",
    "scaled_map",
    "shade_rows",
    "sparkline",
    "text_bars",
]

#: Rows and columns a hit can name: its row and column fields are 5 bits.
MAX_ROWS = 32
MAX_COLUMNS = 32

#: The receiver counters the monitor reports, named as in ``statistics()``.
COUNTERS = ("datagrams", "bytes", "readouts", "hits", "lost", "duplicates", "reordered", "restarts",
            "malformed", "truncated", "dropped", "kernel_drops", "discarded")

#: Sources whose malformed datagrams are counted one by one, by default (the
#: receiver's default ``max_senders``).
MAX_SOURCES = 64

#: Per-sender counters, named as in :class:`~mcast_trio.SenderStats`.
SENDER_COUNTERS = ("received", "lost", "duplicates", "reordered", "restarts", "hits", "bytes")


#: The TOT histogram's upper edge: astropix-analysis' monitor draws 0-500 us,
#: which holds real AstroPix 4 hits (about 180-295 us).
DEFAULT_TOT_MAX_US = 500.0


@dataclasses.dataclass(frozen=True)
class Rates:
    """Rates over the last rate period (per second; MB = 10**6 bytes)."""

    readouts: float = 0.0
    hits: float = 0.0
    mbytes: float = 0.0
    datagrams: float = 0.0


@dataclasses.dataclass(frozen=True)
class SenderView:
    """One sender as the monitor shows it.

    ``counters`` are since the last reset (:data:`SENDER_COUNTERS`);
    ``readouts_per_s`` is its rate of distinct readout ids, ``hits_per_s``
    and ``mbytes_per_s`` its hits and bytes (MB = 10**6 bytes); ``age`` the
    seconds since its last datagram was seen (to the sampling period);
    ``loss`` the fraction lost since the reset.
    """

    name: str
    counters: dict
    readouts_per_s: float
    hits_per_s: float
    mbytes_per_s: float
    age: float
    alive: bool
    loss: float


def sender_name(key: Any) -> str:
    """``("127.0.0.1", 4000)`` -> ``"127.0.0.1:4000"``; IPv6 in brackets; a
    third element (native framing's sender id) after a ``#``."""
    if isinstance(key, tuple) and len(key) >= 2:
        host, port = key[0], key[1]
        host = f"[{host}]" if ":" in str(host) else str(host)
        text = f"{host}:{port}"
        if len(key) == 3:
            text += f"#{key[2]:x}" if isinstance(key[2], int) else f"#{key[2]}"
        return text
    return str(key)


def _counter(stats: Any, name: str) -> int:
    value = getattr(stats, name, 0)
    return 0 if value is None else int(value)


class Accumulator:
    """The monitor's accumulators and derived rates (one owner: the trio
    tasks of the monitor; everything is plain Python and numpy).

    Args:
        tot_max_us: upper edge of the TOT histogram; larger values go to the
            overflow bin.
        tot_bins: number of TOT bins below ``tot_max_us``.
        history: length of the rate history ring buffer (rate periods).
        rate_period: seconds between two rate points.
        stale: seconds without a datagram from a sender before it is stale
            (and an alarm says so).
        loss_alarm: loss fraction (lost / (received + lost), since the reset)
            above which a sender raises an alarm.
        max_sources: most sources whose malformed datagrams are counted
            one by one (the receiver's default ``max_senders``); the least
            recently seen is forgotten to make room, and counted.
    """

    def __init__(self, *, tot_max_us: float = DEFAULT_TOT_MAX_US, tot_bins: int = 50, history: int = 120,
                 rate_period: float = 1.0, stale: float = 5.0, loss_alarm: float = 0.01,
                 max_sources: int = MAX_SOURCES) -> None:
        if not tot_max_us > 0:
            raise ValueError(f"tot_max_us={tot_max_us!r}; allowed: > 0")
        if tot_bins < 1:
            raise ValueError(f"tot_bins={tot_bins!r}; allowed: >= 1")
        self.max_sources = check_int("max_sources", max_sources, 1, 1 << 20)
        self.tot_max_us = float(tot_max_us)
        self.tot_bins = int(tot_bins)
        self.tot_edges = np.linspace(0.0, self.tot_max_us, self.tot_bins + 1)
        self.rate_period = float(rate_period)
        self.stale = float(stale)
        self.loss_alarm = float(loss_alarm)
        self.history: collections.deque[float] = collections.deque(maxlen=history)
        self.hitmap = np.zeros((MAX_ROWS, MAX_COLUMNS), dtype=np.int64)
        self.tot_counts = np.zeros(self.tot_bins + 1, dtype=np.int64)  # last bin: overflow
        self.tot_sum = 0.0
        self.hits = 0  # hits accumulated in the map since the reset
        self.readouts = 0  # readouts whose hits were accumulated since the reset
        self.resets = 0  # by hand and automatic
        self.auto_resets = 0
        self.events: collections.deque[str] = collections.deque(maxlen=8)
        self.rates = Rates()
        #: sender -> (readouts/s, hits/s, MB/s) over the last rate period
        self.sender_rates: dict[Any, tuple[float, float, float]] = {}
        self._baseline: dict[str, int] = {name: 0 for name in COUNTERS}
        self._sender_baseline: dict[Any, dict[str, int]] = {}
        self._last: Any = None  # the latest statistics snapshot
        self._rate_point: tuple[float, Any] | None = None  # (time, statistics) of the last rate point
        self._seen: dict[Any, tuple[int, float]] = {}  # sender -> (arrivals, time they last changed)
        self._restarts = 0
        self._datagrams_at: float | None = None
        #: malformed datagrams per source address, cumulative (from the
        #: receiver's on_malformed hook: the statistics count them in total
        #: only), the ``max_sources`` sources seen most recently, oldest first
        self.malformed_by_sender: collections.OrderedDict[Any, int] = collections.OrderedDict()
        self._malformed_baseline: dict[Any, int] = {}
        #: sources forgotten to make room (see ``max_sources``)
        self.sources_evicted = 0
        #: the malformed datagrams the forgotten sources had sent
        self.malformed_evicted = 0

    # -- feeding ----------------------------------------------------------

    def add(self, hits: np.ndarray, readouts: int) -> None:
        """Accumulate one decoded batch: its hits (``row``, ``column``,
        ``tot_us`` fields) and its number of readouts."""
        self.readouts += readouts
        n = len(hits)
        if not n:
            return
        self.hits += n
        pixel = hits["row"].astype(np.intp) * MAX_COLUMNS + hits["column"]
        self.hitmap += np.bincount(pixel, minlength=MAX_ROWS * MAX_COLUMNS).reshape(MAX_ROWS, MAX_COLUMNS)
        tot = hits["tot_us"]
        index = (tot * (self.tot_bins / self.tot_max_us)).astype(np.intp)
        np.clip(index, 0, self.tot_bins, out=index)
        self.tot_counts += np.bincount(index, minlength=self.tot_bins + 1)
        self.tot_sum += float(tot.sum())

    def add_malformed(self, source: Any) -> None:
        """Count one malformed datagram from ``source`` (the receiver's
        ``on_malformed`` hook calls this)."""
        counts = self.malformed_by_sender
        count = counts.get(source)
        if count is not None:
            counts[source] = count + 1
            counts.move_to_end(source)
            return
        if len(counts) >= self.max_sources:
            old, n = counts.popitem(last=False)
            self._malformed_baseline.pop(old, None)
            self.sources_evicted += 1
            self.malformed_evicted += n
        counts[source] = 1

    def observe(self, now: float, stats: Any, *, rate_point: bool | None = None) -> list[str]:
        """Take a statistics snapshot at time ``now`` (seconds, any clock):
        update the alive state, the rates and detect restarts, which reset
        the accumulators. Returns the events (new run, ...) it found.

        ``rate_point``: None computes the rates once ``rate_period`` has
        passed since the last rate point; True computes them now (over the
        time since the last point); False does not."""
        events = []
        if self._last is None:
            self._rate_point = (now, stats)
        restarts = _counter(stats, "restarts")
        if restarts > self._restarts and self._last is not None:
            who = [sender_name(k) for k, s in stats.senders.items()
                   if s.restarts > getattr(self._last.senders.get(k), "restarts", 0)]
            events.append(f"new run: {', '.join(who) or 'a sender'} restarted; accumulators reset")
            self.auto_resets += 1
            self.reset(now, stats)
        self._restarts = restarts
        for key, sender in stats.senders.items():
            arrivals = sender.received + sender.duplicates
            before = self._seen.get(key)
            if before is None or before[0] != arrivals:
                self._seen[key] = (arrivals, now)
        if len(self._seen) > len(stats.senders):  # the receiver forgot some: so do we
            self._seen = {key: seen for key, seen in self._seen.items() if key in stats.senders}
        if self._datagrams_at is None or self._last is None or stats.datagrams != self._last.datagrams:
            self._datagrams_at = now
        self._last = stats
        point_time, point = self._rate_point
        dt = now - point_time
        if (dt >= self.rate_period if rate_point is None else rate_point) and dt > 0:
            self._set_rates(dt, point, stats)
            self._rate_point = (now, stats)
        for event in events:
            self.events.append(event)
        return events

    def _set_rates(self, dt: float, before: Any, after: Any) -> None:
        def delta(name):
            return _counter(after, name) - _counter(before, name)

        self.rates = Rates(readouts=delta("readouts") / dt, hits=delta("hits") / dt,
                           mbytes=delta("bytes") / dt / 1e6, datagrams=delta("datagrams") / dt)
        def sender_delta(key, sender, name):
            return (getattr(sender, name, 0) - getattr(before.senders.get(key), name, 0)) / dt

        self.sender_rates = {
            key: (sender_delta(key, s, "received"), sender_delta(key, s, "hits"),
                  sender_delta(key, s, "bytes") / 1e6)
            for key, s in after.senders.items()
        }
        self.history.append(self.rates.readouts)

    def reset(self, now: float | None = None, stats: Any = None) -> None:
        """Start over: empty map and histogram, counters shown since now
        (``stats``: the current statistics, default the latest observed)."""
        stats = stats if stats is not None else self._last
        self.hitmap[:] = 0
        self.tot_counts[:] = 0
        self.tot_sum = 0.0
        self.hits = 0
        self.readouts = 0
        self.resets += 1
        self._malformed_baseline = dict(self.malformed_by_sender)
        if stats is not None:
            self._baseline = {name: _counter(stats, name) for name in COUNTERS}
            self._sender_baseline = {key: {n: getattr(s, n, 0) for n in SENDER_COUNTERS}
                                     for key, s in stats.senders.items()}

    # -- reading ----------------------------------------------------------

    @property
    def statistics(self) -> Any:
        """The latest statistics snapshot observed (or None)."""
        return self._last

    def counters(self, *, since_reset: bool = True) -> dict:
        """The receiver's counters (:data:`COUNTERS`), since the last reset
        or cumulative; ``kernel_drops`` is None where the OS does not say."""
        stats = self._last
        out = {}
        for name in COUNTERS:
            value = getattr(stats, name, 0) if stats is not None else 0
            if value is None:
                out[name] = None
                continue
            out[name] = value - self._baseline[name] if since_reset else value
        return out

    def senders(self, now: float, *, since_reset: bool = True) -> list[SenderView]:
        """The senders seen, in order of first appearance."""
        stats = self._last
        if stats is None:
            return []
        views = []
        for key, sender in stats.senders.items():
            base = self._sender_baseline.get(key, {}) if since_reset else {}
            counters = {n: getattr(sender, n, 0) - base.get(n, 0) for n in SENDER_COUNTERS}
            counters["malformed"] = self.malformed_by_sender.get(key, 0) - (
                self._malformed_baseline.get(key, 0) if since_reset else 0)
            arrived = self._seen.get(key, (0, now))[1]
            age = max(0.0, now - arrived)
            total = counters["received"] + counters["lost"]
            loss = counters["lost"] / total if total > 0 else 0.0
            readouts_per_s, hits_per_s, mbytes_per_s = self.sender_rates.get(key, (0.0, 0.0, 0.0))
            views.append(SenderView(sender_name(key), counters, readouts_per_s, hits_per_s, mbytes_per_s, age,
                                    age < self.stale, loss))
        return views

    def alarms(self, now: float) -> list[str]:
        """What needs a shifter's attention now: silent senders, loss above
        the threshold."""
        out = []
        for view in self.senders(now):
            if not view.alive:
                out.append(f"{view.name} silent for {view.age:.0f} s")
            if view.loss > self.loss_alarm:
                out.append(f"{view.name} loss {view.loss:.1%} > {self.loss_alarm:.1%}")
        return out

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the map shown: up to the highest row and column
        with a hit (at least 1 x 1, at most 32 x 32)."""
        rows = np.flatnonzero(self.hitmap.any(axis=1))
        cols = np.flatnonzero(self.hitmap.any(axis=0))
        return (int(rows[-1]) + 1 if len(rows) else 1, int(cols[-1]) + 1 if len(cols) else 1)

    def hottest(self, n: int = 5) -> list[tuple[int, int, int]]:
        """The ``n`` pixels with the most hits: ``(row, column, hits)``,
        most first (ties: lower row, then column, first); empty pixels are
        not listed."""
        flat = self.hitmap.ravel()
        count = min(n, int(np.count_nonzero(flat)))
        if count <= 0:
            return []
        order = np.lexsort((np.arange(flat.size), -flat))[:count]
        return [(int(i) // MAX_COLUMNS, int(i) % MAX_COLUMNS, int(flat[i])) for i in order]

    @property
    def tot_mean(self) -> float:
        """Mean TOT (us) since the reset, NaN without hits."""
        return self.tot_sum / self.hits if self.hits else math.nan

    def arrays(self) -> dict[str, np.ndarray]:
        """Copies of the accumulators, for a snapshot (``numpy.savez``)."""
        return {
            "hitmap": self.hitmap.copy(),
            "tot_counts": self.tot_counts[:-1].copy(),
            "tot_overflow": np.int64(self.tot_counts[-1]),
            "tot_edges": self.tot_edges.copy(),
            "rate_history": np.array(self.history, dtype=np.float64),
            "readouts": np.int64(self.readouts),
            "hits": np.int64(self.hits),
        }


# -- plain-text rendering ---------------------------------------------------

#: Shading from empty to full.
SHADES = " ░▒▓█"
SPARKS = "▁▂▃▄▅▆▇█"


def scaled_map(counts: np.ndarray, *, log: bool) -> np.ndarray:
    """``counts`` scaled to 0..1 by the largest count, linearly or as
    ``log(1 + n) / log(1 + max)``; zero stays zero."""
    counts = np.asarray(counts, dtype=np.float64)
    top = counts.max() if counts.size else 0.0
    if top <= 0:
        return np.zeros_like(counts)
    if log:
        return np.log1p(counts) / math.log1p(top)
    return counts / top


def shade_rows(counts: np.ndarray, *, log: bool, width: int = 2) -> list[str]:
    """One string per row: each pixel ``width`` shading blocks, from a space
    (no hit) to a full block (the largest count); a pixel with hits is never
    blank."""
    scaled = scaled_map(counts, log=log)
    levels = len(SHADES) - 1
    index = np.ceil(scaled * levels).astype(np.intp)  # any hit: at least the lightest shade
    np.clip(index, 0, levels, out=index)  # log1p(n) / log1p(n) may round above 1
    return ["".join(SHADES[i] * width for i in row) for row in index]


def sparkline(values, width: int | None = None) -> str:
    """The last ``width`` values as block characters scaled to their
    maximum (empty input: empty string)."""
    values = list(values)[-width:] if width else list(values)
    if not values:
        return ""
    top = max(values)
    if top <= 0:
        return SPARKS[0] * len(values)
    last = len(SPARKS) - 1
    return "".join(SPARKS[min(last, max(0, round(v / top * last)))] for v in values)


def text_bars(counts, *, width: int = 30) -> list[str]:
    """One bar of ``█`` per count, the largest ``width`` long (a nonzero
    count gets at least one)."""
    counts = [int(c) for c in counts]
    top = max(counts, default=0)
    if top <= 0:
        return ["" for _ in counts]
    return ["█" * (max(1, round(c / top * width)) if c else 0) for c in counts]
