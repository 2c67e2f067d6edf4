"""A simulated AstroPix 4 DAQ: realistic readouts with their ground truth.

:class:`DaqSimulator` produces the byte stream an AstroPix 4 board delivers to
its DAQ host, cut into readouts and serialized exactly as the host sends them
(spec section 1), together with the hits it put in (:data:`HIT_DTYPE` records,
every field). A decoder that carries extra bytes from one readout to the next
recovers exactly those hits, in order; this is what the tests, the benchmarks
and the soak test rely on.

What the stream contains, per readout:

* ``lead_idles`` IDLE bytes (``bc``; 2 by default, like the real chip);
* if the previous readout ended with the first part of a split hit: the
  remaining bytes of that hit (the *orphan* bytes of spec section 5), then 1
  or more IDLE bytes;
* a Poisson number of hits (``mean_hits``, or ``hit_rate`` times
  ``period_ns``), each followed by 0..``max_idle_gap`` IDLE bytes and,
  occasionally (``padding_fraction``), a short run of PADDING bytes (``ff``),
  as seen at high rate;
* either ``trailing_idles`` IDLE bytes, or (with probability
  ``split_fraction``, when the readout has a hit) the first ``k`` bytes of its
  last hit, which the next readout completes;
* in :meth:`SimBatch.board_data` and the :class:`AstroPix4Readout` objects,
  PADDING bytes up to the fixed board readout size (``readout_size``), which
  the readout class strips.

The hits are laid out so that the walk of spec section 5 finds every one of
them: split points never leave a start byte, an IDLE or PADDING byte where the
walk would misread them, and a PADDING run only follows a hit that contains no
start byte at positions 1..7 (after such a hit the walk would take the padding
for the rest of a truncated hit and drop it, as the real decoder does on real
data). The ground truth is therefore exact, not statistical.

Everything is drawn from one ``numpy.random.Generator`` seeded with ``seed``:
the same seed and the same sequence of calls give the same bytes (pass
``start_ns`` too, otherwise timestamps start at the construction time).
:meth:`DaqSimulator.generate` is vectorized: a million hits (500k readouts)
take about half a second, plus ~0.06 s to cut them into ``bytes`` datagrams.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ._format import (
    CLOCK_CYCLES_PER_US,
    CLOCK_ROLLOVER,
    HEADER,
    HEADER_SIZE,
    HIT_BIT_FIELDS,
    HIT_DTYPE,
    HIT_SIZE,
    IDLE_BYTE,
    PADDING_BYTE,
    READOUT_HEADER_DTYPE,
)
from ._readout import AstroPix4Readout
from ._validate import check_bool, check_choice, check_int, check_number

__all__ = ["DaqSimulator", "SimBatch", "TOT_DISTRIBUTIONS", "MAX_ROWS", "MAX_COLUMNS"]

#: The row and column fields of a hit are 5 bits wide.
MAX_ROWS = 32
MAX_COLUMNS = 32
#: Largest chip id whose start byte is not the padding byte (``ff``).
MAX_CHIP_ID = 30
#: Largest TOT in clock cycles that decodes unambiguously (17-bit counters).
MAX_TOT_CYCLES = CLOCK_ROLLOVER - 1
#: TOT spectra :class:`DaqSimulator` can draw from.
TOT_DISTRIBUTIONS = ("gamma", "exponential", "landau", "constant")

_U32 = 2**32
_U64_MAX = 2**64 - 1
_PAYLOAD = 7  # the start byte must read 111xxxxx after bit reversal
_MAX_PAD_RUN = 3
# Mean of the standard Moyal distribution (Euler's gamma + ln 2).
_MOYAL_MEAN = 0.5772156649015329 + math.log(2.0)
_REVERSE = np.array([int(f"{i:08b}"[::-1], 2) for i in range(256)], dtype=np.uint8)
_VALID_START = np.array([(b >> 5) == 7 and b != PADDING_BYTE for b in range(256)], dtype=bool)
_BIT_FIELD_NAMES = tuple(HIT_BIT_FIELDS)
# Fields copied from the drawn hits into the ground truth.
_TRUTH_FIELDS = _BIT_FIELD_NAMES + ("ts_dec1", "ts_dec2")


# -- argument checks -----------------------------------------------------------


def _real(name: str, value, low: float, high: float | None = None, *, low_open: bool = False) -> float:
    """``value`` as a float in ``low..high`` (interval notation in the
    message); the range is checked on the float, so the message of an
    integer argument shows it as the float it became (``-1.0``)."""
    allowed = (f"> {low}" if low_open else f">= {low}") if high is None else (
        f"{'(' if low_open else '['}{low}, {high}]"
    )
    number = check_number(name, value, allowed=allowed)
    return check_number(name, number, low, high, low_open=low_open, allowed=allowed)


# -- the bits of a hit ---------------------------------------------------------


def _gray(values: np.ndarray) -> np.ndarray:
    return values ^ (values >> 1)


def _encode_words(fields: dict[str, np.ndarray]) -> np.ndarray:
    """Vectorized ``_reference.encode_word``: (n, 8) uint8 raw hit bytes."""
    n = len(fields["row"])
    value = np.zeros(n, dtype=np.uint64)
    for name in _BIT_FIELD_NAMES:
        _start, stop = HIT_BIT_FIELDS[name]
        value |= fields[name].astype(np.uint64) << np.uint64(64 - stop)
    return _REVERSE[value.astype(">u8").view(np.uint8).reshape(n, HIT_SIZE)]


# -- results -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SimBatch:
    """Readouts produced by one :meth:`DaqSimulator.generate` call.

    Attributes:
        buffer: the serialized readouts back to back (what
            :func:`mcast_trio.decode_readouts` takes with ``lengths=``).
        offsets: int64 start of each serialized readout in ``buffer``.
        lengths: int64 size of each serialized readout (19 + data bytes).
        readout_ids: uint32 readout id of each readout.
        timestamps: uint64 timestamp (ns) of each readout.
        truth: the hits a decoder carrying extra bytes from readout to readout
            recovers from these readouts, in order, as a ``numpy.recarray`` of
            :data:`HIT_DTYPE` (a hit split across two readouts belongs to the
            second one, with ``decoding_order`` 0, as the decoder reports it).
            A hit whose first part ends the last readout of the batch is
            completed by the next batch and is part of *its* truth.
        n_split: number of readouts that end with the first part of a split
            hit.
        readout_size: the fixed board readout size the data is padded to in
            :meth:`board_data` (None: no padding).
    """

    buffer: bytes
    offsets: np.ndarray
    lengths: np.ndarray
    readout_ids: np.ndarray
    timestamps: np.ndarray
    truth: np.recarray
    n_split: int = 0
    readout_size: int | None = field(default=None)

    def __len__(self) -> int:
        return len(self.lengths)

    def datagrams(self) -> list[bytes]:
        """The serialized readouts, one ``bytes`` each (one datagram each)."""
        buf = self.buffer
        return [buf[o:o + n] for o, n in zip(self.offsets.tolist(), self.lengths.tolist())]

    def data(self) -> list[bytes]:
        """The readout data of each readout (trailing padding stripped)."""
        buf = self.buffer
        return [buf[o + HEADER_SIZE:o + n] for o, n in zip(self.offsets.tolist(), self.lengths.tolist())]

    def board_data(self) -> list[bytes]:
        """The raw data as the board delivers it: padded with ``ff`` to a
        multiple of ``readout_size`` (unchanged when ``readout_size`` is None)."""
        size = self.readout_size
        out = self.data()
        if size is None:
            return out
        return [d + b"\xff" * (-len(d) % size if d else size) for d in out]

    def readouts(self) -> list[AstroPix4Readout]:
        """:class:`AstroPix4Readout` objects built from :meth:`board_data`
        (the class strips the padding)."""
        return [
            AstroPix4Readout(raw, rid, ts)
            for raw, rid, ts in zip(self.board_data(), self.readout_ids.tolist(), self.timestamps.tolist())
        ]


# -- the simulator -------------------------------------------------------------


class DaqSimulator:
    """Deterministic generator of AstroPix 4 readouts and their hits.

    Args:
        seed: seed of the ``numpy.random.Generator`` (anything
            ``numpy.random.default_rng`` accepts).
        rows: number of pixel rows, 1..32 (the row field is 5 bits wide).
        columns: number of pixel columns, 1..32 (the column field is 5 bits
            wide, so a 16 x 35 matrix cannot be encoded: 35 raises
            ``ValueError``).
        chip_id: chip id of every hit, 0..30 (31 would make the start byte
            ``ff``, the padding byte).
        mean_hits: mean number of hits per readout (Poisson); default 2.0.
        hit_rate: alternatively, the hit rate in Hz: ``mean_hits`` is then
            ``hit_rate * period_ns / 1e9``. Give at most one of the two.
        tot_distribution: TOT spectrum, one of :data:`TOT_DISTRIBUTIONS`:
            ``"gamma"`` (shape ``tot_shape``), ``"exponential"``,
            ``"landau"`` (the Moyal approximation of a Landau, scale
            ``tot_sigma_us``) or ``"constant"``; all with mean
            ``tot_mean_us``. TOT values are clipped to 0..6553.55 us (the
            17-bit counters) and quantized to the 20 MHz clock, so a decoder's
            ``tot_us`` equals ``round(tot * 20) / 20``.
        tot_mean_us: mean TOT in microseconds (> 0).
        tot_shape: shape of the gamma spectrum (> 0).
        tot_sigma_us: scale of the Landau spectrum (> 0); default
            ``tot_mean_us / 4``.
        split_fraction: probability (0..1) that a readout with at least one
            hit ends with the first 1..7 bytes of its last hit, the rest
            starting the next readout.
        padding_fraction: probability (0..1) that the gap after a hit holds a
            run of 1..3 PADDING bytes (only after hits where the walk of spec
            section 5 cannot mistake it for a truncated hit, see the module
            docstring; the realized fraction is therefore lower).
        max_idle_gap: IDLE bytes after each hit are drawn from 0..max_idle_gap.
        lead_idles: IDLE bytes at the start of every readout.
        trailing_idles: IDLE bytes at the end of a readout that does not end
            with a split hit (at least 1, so that a hit whose last byte is
            ``ff`` is not taken for padding).
        readout_size: fixed size of the board readout in bytes; the data is
            padded with ``ff`` to a multiple of it (None: no padding). Padding
            never reaches a serialized readout: the readout class strips it.
        start_id: readout id of the first readout, 0..2**32-1; ids increase by
            one and wrap at 2**32.
        start_ns: timestamp of the first readout in ns since the epoch;
            default: ``time.time_ns()`` when the simulator is built.
        period_ns: readout period in ns (> 0); default 1 ms.
        jitter_ns: each timestamp gets a uniform random delay in
            ``[0, jitter_ns)`` (must be < ``period_ns``, so timestamps stay
            increasing).
        keep_truth: if True, :attr:`truth` accumulates the hits of every call
            (useful with :meth:`stream`); otherwise only
            :meth:`generate`'s result carries them.

    Raises:
        TypeError, ValueError: for a bad argument, naming it, its value and
            what is allowed.
    """

    def __init__(
        self,
        seed=0,
        *,
        rows: int = 16,
        columns: int = 32,
        chip_id: int = 0,
        mean_hits: float | None = None,
        hit_rate: float | None = None,
        tot_distribution: str = "gamma",
        tot_mean_us: float = 10.0,
        tot_shape: float = 2.0,
        tot_sigma_us: float | None = None,
        split_fraction: float = 0.0,
        padding_fraction: float = 0.05,
        max_idle_gap: int = 2,
        lead_idles: int = 2,
        trailing_idles: int = 6,
        readout_size: int | None = None,
        start_id: int = 0,
        start_ns: int | None = None,
        period_ns: int = 1_000_000,
        jitter_ns: int = 0,
        keep_truth: bool = False,
    ) -> None:
        self.rows = check_int("rows", rows, 1, MAX_ROWS,
                              allowed=f"1..{MAX_ROWS} (the row field of a hit is 5 bits wide)")
        self.columns = check_int("columns", columns, 1, MAX_COLUMNS,
                                 allowed=f"1..{MAX_COLUMNS} (the column field of a hit is 5 bits wide)")
        self.chip_id = check_int(
            "chip_id", chip_id, 0, MAX_CHIP_ID,
            allowed=f"0..{MAX_CHIP_ID} (chip id 31 would make the start byte ff, the padding byte)",
        )
        self.period_ns = check_int("period_ns", period_ns, 1)
        if mean_hits is not None and hit_rate is not None:
            raise ValueError(
                f"mean_hits={mean_hits!r} and hit_rate={hit_rate!r} were both given; allowed: at most one"
            )
        if hit_rate is not None:
            rate = _real("hit_rate", hit_rate, 0.0)
            mean_hits = rate * self.period_ns / 1e9
        elif mean_hits is None:
            mean_hits = 2.0
        self.mean_hits = _real("mean_hits", mean_hits, 0.0, 1e6)
        self.tot_distribution = check_choice("tot_distribution", tot_distribution, TOT_DISTRIBUTIONS,
                                             what="supported")
        self.tot_mean_us = _real("tot_mean_us", tot_mean_us, 0.0, MAX_TOT_CYCLES / CLOCK_CYCLES_PER_US, low_open=True)
        self.tot_shape = _real("tot_shape", tot_shape, 0.0, low_open=True)
        if tot_sigma_us is None:
            tot_sigma_us = self.tot_mean_us / 4
        self.tot_sigma_us = _real("tot_sigma_us", tot_sigma_us, 0.0, low_open=True)
        self.split_fraction = _real("split_fraction", split_fraction, 0.0, 1.0)
        self.padding_fraction = _real("padding_fraction", padding_fraction, 0.0, 1.0)
        self.max_idle_gap = check_int("max_idle_gap", max_idle_gap, 0, 1024)
        self.lead_idles = check_int("lead_idles", lead_idles, 0, 1024)
        self.trailing_idles = check_int(
            "trailing_idles", trailing_idles, 1, 1024,
            allowed="1..1024 (a hit ending with ff must not look like padding)",
        )
        if readout_size is not None:
            readout_size = check_int("readout_size", readout_size, 1, 2**31 - 1)
        self.readout_size = readout_size
        self.start_id = check_int("start_id", start_id, 0, _U32 - 1)
        if start_ns is None:
            start_ns = time.time_ns()
        self.start_ns = check_int("start_ns", start_ns, 0, _U64_MAX)
        self.jitter_ns = check_int("jitter_ns", jitter_ns, 0, self.period_ns - 1)
        self.keep_truth = check_bool("keep_truth", keep_truth)
        self._rng = np.random.default_rng(seed)
        self._count = 0  # readouts generated so far
        self._hits = 0  # hits recorded in the truth so far
        self._pending = None  # (fields of the split hit, its word, k) for the next readout
        self._truth_parts: list[np.ndarray] = []

    # -- public -----------------------------------------------------------

    @property
    def readouts_generated(self) -> int:
        """Number of readouts generated so far."""
        return self._count

    @property
    def hits_generated(self) -> int:
        """Number of hits in the truth of the readouts generated so far (a hit
        still split at the end of the last readout is not counted yet)."""
        return self._hits

    @property
    def next_readout_id(self) -> int:
        """The readout id the next readout will get."""
        return (self.start_id + self._count) % _U32

    @property
    def pending_split(self) -> bool:
        """True if the last readout ended with the first part of a split hit."""
        return self._pending is not None

    @property
    def truth(self) -> np.recarray:
        """Every hit generated so far (only with ``keep_truth=True``)."""
        if not self.keep_truth:
            raise RuntimeError("truth is only recorded with DaqSimulator(keep_truth=True)")
        if len(self._truth_parts) != 1:
            merged = np.concatenate(self._truth_parts) if self._truth_parts else np.zeros(0, HIT_DTYPE)
            self._truth_parts = [merged]
        return self._truth_parts[0].view(np.recarray)

    def generate(self, n: int) -> SimBatch:
        """Generate the next ``n`` readouts (vectorized).

        Returns:
            SimBatch: the serialized readouts in one buffer, their ids and
            timestamps, and the ground-truth hits.
        """
        n = check_int("n", n, 0)
        batch = self._generate(n)
        if self.keep_truth:
            self._truth_parts.append(np.asarray(batch.truth))
        return batch

    def datagrams(self, n: int) -> list[bytes]:
        """The next ``n`` serialized readouts, one datagram each."""
        return self.generate(n).datagrams()

    def readouts(self, n: int) -> list[AstroPix4Readout]:
        """The next ``n`` readouts as :class:`AstroPix4Readout` objects, built
        from the padded board data."""
        return self.generate(n).readouts()

    def stream(self, n: int | None = None, *, batch_size: int = 1024) -> Iterator[bytes]:
        """Yield serialized readouts one by one, ``n`` of them (None: forever).

        They are generated ``batch_size`` at a time (the last batch is cut to
        ``n``): the bytes are those of :meth:`generate` calls of these sizes,
        so ``itertools.islice(sim.stream(batch_size=b), k)`` is reproducible.
        """
        if n is not None:
            n = check_int("n", n, 0)
        batch_size = check_int("batch_size", batch_size, 1)
        left = n
        while left is None or left > 0:
            size = batch_size if left is None else min(batch_size, left)
            yield from self.generate(size).datagrams()
            if left is not None:
                left -= size

    # -- the work ---------------------------------------------------------

    def _draw_tot_cycles(self, count: int) -> np.ndarray:
        rng = self._rng
        mean = self.tot_mean_us
        kind = self.tot_distribution
        if kind == "gamma":
            tot = rng.gamma(self.tot_shape, mean / self.tot_shape, count)
        elif kind == "exponential":
            tot = rng.exponential(mean, count)
        elif kind == "landau":
            # Moyal: X = -ln(Z**2), Z standard normal; mean = loc + scale * 1.27.
            z = rng.standard_normal(count)
            with np.errstate(divide="ignore"):
                x = -np.log(z * z)
            tot = (mean - self.tot_sigma_us * _MOYAL_MEAN) + self.tot_sigma_us * x
        else:
            tot = np.full(count, mean)
        return np.clip(np.rint(tot * CLOCK_CYCLES_PER_US), 0, MAX_TOT_CYCLES).astype(np.int64)

    def _draw_times(self, fields: dict[str, np.ndarray], idx, count: int) -> None:
        """(Re)draw the timing fields of hits ``idx`` (``count`` of them; TOT kept)."""
        rng = self._rng
        dec1 = rng.integers(0, CLOCK_ROLLOVER, count, dtype=np.int64)
        dec2 = (dec1 + fields["_cycles"][idx]) % CLOCK_ROLLOVER
        g1 = _gray(dec1)
        g2 = _gray(dec2)
        fields["ts_coarse1"][idx] = g1 >> 3
        fields["ts_fine1"][idx] = g1 & 7
        fields["ts_coarse2"][idx] = g2 >> 3
        fields["ts_fine2"][idx] = g2 & 7
        fields["ts_dec1"][idx] = dec1
        fields["ts_dec2"][idx] = np.where(dec2 < dec1, dec2 + CLOCK_ROLLOVER, dec2)
        fields["ts_neg1"][idx] = rng.integers(0, 2, count)
        fields["ts_neg2"][idx] = rng.integers(0, 2, count)
        fields["ts_tdc1"][idx] = rng.integers(0, 32, count)
        fields["ts_tdc2"][idx] = rng.integers(0, 32, count)

    def _draw_hits(self, count: int) -> dict[str, np.ndarray]:
        rng = self._rng
        fields = {name: np.zeros(count, dtype=np.int64) for name in _BIT_FIELD_NAMES}
        fields["chip_id"][:] = self.chip_id
        fields["payload"][:] = _PAYLOAD
        fields["row"] = rng.integers(0, self.rows, count, dtype=np.int64)
        fields["column"] = rng.integers(0, self.columns, count, dtype=np.int64)
        fields["_cycles"] = self._draw_tot_cycles(count)
        fields["ts_dec1"] = np.zeros(count, dtype=np.int64)
        fields["ts_dec2"] = np.zeros(count, dtype=np.int64)
        self._draw_times(fields, slice(None), count)
        return fields

    @staticmethod
    def _split_points(words: np.ndarray) -> np.ndarray:
        """For each word, a bool (m, 8) matrix: column k (1..7) is True when
        the word can be split after its first k bytes such that the walk of
        spec section 5 reassembles it."""
        valid = _VALID_START[words]
        # no start byte in words[k:8]: suffix "any" from the right
        suffix_has_start = np.logical_or.accumulate(valid[:, ::-1], axis=1)[:, ::-1]
        ok = np.zeros(words.shape, dtype=bool)
        first_orphan = words[:, 1:]  # byte k, k = 1..7
        last_piece = words[:, :-1]  # byte k - 1
        ok[:, 1:] = (
            ~suffix_has_start[:, 1:]
            & (first_orphan != IDLE_BYTE)  # the walk skips leading IDLE and PADDING
            & (first_orphan != PADDING_BYTE)
            & (last_piece != PADDING_BYTE)  # the readout class strips trailing ff
            & (words[:, 7:8] != IDLE_BYTE)  # trailing IDLE bytes of the orphans are excluded
        )
        return ok

    def _generate(self, n: int) -> SimBatch:
        rng = self._rng
        counts = rng.poisson(self.mean_hits, n).astype(np.int64)
        total = int(counts.sum())
        fields = self._draw_hits(total)
        first = np.cumsum(counts) - counts  # index of each readout's first hit
        readout_of = np.repeat(np.arange(n, dtype=np.int64), counts)

        # Which readouts end with a split hit (their last hit).
        split = (counts > 0) & (rng.random(n) < self.split_fraction)
        split_rd = np.flatnonzero(split)
        split_hit = first[split_rd] + counts[split_rd] - 1
        words = _encode_words(fields)
        k = np.zeros(0, dtype=np.int64)
        if len(split_hit):
            todo = split_hit
            for _ in range(64):
                ok = self._split_points(words[todo]).any(axis=1)
                todo = todo[~ok]
                if not len(todo):
                    break
                # Redraw the timing bits of hits that cannot be split cleanly.
                self._draw_times(fields, todo, len(todo))
                words[todo] = _encode_words({name: fields[name][todo] for name in _BIT_FIELD_NAMES})
            if len(todo):  # practically never: these are simply not split
                keep = ~np.isin(split_hit, todo)
                split[split_rd[~keep]] = False
                split_rd, split_hit = split_rd[keep], split_hit[keep]
            ok = self._split_points(words[split_hit])
            score = np.where(ok, rng.random(ok.shape), -1.0)
            k = np.argmax(score, axis=1).astype(np.int64)

        # Gaps after each hit: IDLE bytes and, sometimes, a PADDING run.
        is_split_item = np.zeros(total, dtype=bool)
        is_split_item[split_hit] = True
        gaps = rng.integers(0, self.max_idle_gap + 1, total, dtype=np.int64)
        clean = ~_VALID_START[words[:, 1:]].any(axis=1) & ~is_split_item
        pad = (rng.random(total) < self.padding_fraction) & clean
        pad_run = np.where(pad, rng.integers(1, _MAX_PAD_RUN + 1, total, dtype=np.int64), 0)
        item_size = HIT_SIZE + gaps + pad_run
        item_size[split_hit] = k

        # Orphans: the rest of the hits split at the end of the previous readout.
        pending = self._pending
        orphan_words = words[split_hit]
        orphan_k = k
        orphan_target = split_rd + 1
        orphan_fields = {name: fields[name][split_hit] for name in _TRUTH_FIELDS}
        if pending is not None:
            p_fields, p_word, p_k = pending
            orphan_words = np.concatenate([p_word[None, :], orphan_words])
            orphan_k = np.concatenate([[p_k], orphan_k])
            orphan_target = np.concatenate([[0], orphan_target])
            orphan_fields = {name: np.concatenate([p_fields[name], orphan_fields[name]]) for name in _TRUTH_FIELDS}
        placed = orphan_target < n
        new_pending = None
        if len(placed) and not placed[-1]:
            new_pending = (
                {name: orphan_fields[name][-1:].copy() for name in _TRUTH_FIELDS},
                orphan_words[-1].copy(),
                int(orphan_k[-1]),
            )
        if n == 0:
            new_pending = pending
        orphan_words = orphan_words[placed]
        orphan_k = orphan_k[placed]
        orphan_target = orphan_target[placed]
        orphan_fields = {name: orphan_fields[name][placed] for name in _TRUTH_FIELDS}
        has_orphan = np.zeros(n, dtype=bool)
        has_orphan[orphan_target] = True
        orphan_len = np.zeros(n, dtype=np.int64)
        orphan_len[orphan_target] = HIT_SIZE - orphan_k
        post_orphan = np.zeros(n, dtype=np.int64)
        post_orphan[orphan_target] = rng.integers(1, max(1, self.max_idle_gap) + 1, len(orphan_target))

        # Readout sizes and positions.
        item_end = np.zeros(total + 1, dtype=np.int64)
        np.cumsum(item_size, out=item_end[1:])
        items_total = item_end[first + counts] - item_end[first]
        base = self.lead_idles + orphan_len + post_orphan
        length = base + items_total + np.where(split, 0, self.trailing_idles)
        rec_size = HEADER_SIZE + length
        rec_start = np.cumsum(rec_size) - rec_size
        content_start = rec_start + HEADER_SIZE
        nbytes = int(rec_size.sum())
        buf = np.full(nbytes, IDLE_BYTE, dtype=np.uint8)

        ids = ((self.start_id + self._count + np.arange(n, dtype=np.int64)) % _U32).astype(np.uint32)
        ticks = np.arange(self._count, self._count + n, dtype=np.uint64)
        timestamps = np.uint64(self.start_ns) + ticks * np.uint64(self.period_ns)
        if self.jitter_ns:
            timestamps += rng.integers(0, self.jitter_ns, n).astype(np.uint64)

        fixed = np.zeros(n, dtype=READOUT_HEADER_DTYPE)
        fixed["header"] = HEADER
        fixed["readout_id"] = ids
        fixed["timestamp"] = timestamps
        fixed["length"] = length
        # Byte columns are scattered one at a time: no (count, width) index
        # temporaries, which is several times faster for large batches.
        fixed_bytes = fixed.view(np.uint8).reshape(n, HEADER_SIZE)
        for c in range(HEADER_SIZE):
            buf[rec_start + c] = fixed_bytes[:, c]

        # Hits and pieces.
        if total:
            within = item_end[:-1] - item_end[first[readout_of]]
            pos = content_start[readout_of] + base[readout_of] + within
            complete = ~is_split_item
            cpos = pos[complete]
            cwords = words[complete]
            for c in range(HIT_SIZE):
                buf[cpos + c] = cwords[:, c]
            spos = pos[split_hit]
            swords = words[split_hit]
            for c in range(1, HIT_SIZE):  # byte c belongs to the piece when c < k
                sel = c < k
                buf[spos[sel] + c] = swords[sel, c]
            buf[spos] = swords[:, 0]
            ppos = pos[pad] + HIT_SIZE + gaps[pad]
            prun = pad_run[pad]
            for c in range(_MAX_PAD_RUN):
                buf[ppos[c < prun] + c] = PADDING_BYTE
        # Orphans: bytes k..7 of a split hit, right after the leading idles.
        opos = content_start[orphan_target] + self.lead_idles - orphan_k
        for c in range(1, HIT_SIZE):
            sel = c >= orphan_k
            buf[opos[sel] + c] = orphan_words[sel, c]

        # Ground truth, in decoding order.
        complete_count = counts - split
        truth_per = complete_count + has_orphan
        truth_start = np.cumsum(truth_per) - truth_per
        truth = np.zeros(int(truth_per.sum()), dtype=HIT_DTYPE)
        complete_idx = np.flatnonzero(~is_split_item)
        c_rd = readout_of[complete_idx]
        order = complete_idx - first[c_rd] + has_orphan[c_rd]
        dest = truth_start[c_rd] + order
        for name in _TRUTH_FIELDS:
            truth[name][dest] = fields[name][complete_idx]
            truth[name][truth_start[orphan_target]] = orphan_fields[name]
        truth["decoding_order"][dest] = order
        truth["decoding_order"][truth_start[orphan_target]] = 0
        truth_rd = np.repeat(np.arange(n), truth_per)
        truth["readout_id"] = ids[truth_rd]
        truth["timestamp"] = timestamps[truth_rd]
        truth["tot_us"] = (truth["ts_dec2"].astype(np.int64) - truth["ts_dec1"]) / CLOCK_CYCLES_PER_US

        self._pending = new_pending
        self._count += n
        self._hits += len(truth)
        offsets = rec_start
        return SimBatch(
            buffer=buf.tobytes(),
            offsets=offsets,
            lengths=rec_size,
            readout_ids=ids,
            timestamps=timestamps,
            truth=truth.view(np.recarray),
            n_split=int(split.sum()),
            readout_size=self.readout_size,
        )
