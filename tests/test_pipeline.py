"""Table-driven tests of the sans-I/O receive pipeline
(mcast_trio._protocol._pipeline): batches are filled by hand through the
receive batch's public seam (``ReceiveBatch.store``), no socket, no trio.

Each row is a stream of datagrams (payload, source) and what the pipeline
must deliver and count. Every row is also fed one datagram per batch, and in
batches of every split, and must give the same items and counters: batch
boundaries are invisible to the consumer (as h11's tests feed byte by byte).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from mcast_trio import AstroPix4Readout, Message, ReadoutChunk, ReceiverStatistics, decode_readouts
from mcast_trio._io._batchio import ReceiveBatch
from mcast_trio._protocol._pipeline import ReceivePipeline
from mcast_trio.sim import DaqSimulator
from mcast_trio import MclEncoder, NativeEncoder

A = ("127.0.0.1", 40001)
B = ("127.0.0.1", 40002)
V6 = ("::1", 40003, 0, 0)


def readouts(n: int, start_id: int = 0, seed: int = 5) -> list[bytes]:
    sim = DaqSimulator(seed, start_ns=0, start_id=start_id, mean_hits=3.0)
    return [r.to_bytes() for r in sim.readouts(n)]


R = readouts(6)


def hits(datagrams) -> int:
    return len(decode_readouts(datagrams, carry="consecutive").hits)



SLOT = max(map(len, R)) + 8  # a receive slot R fits in
BAD_HEADER = b"\x00" * 25
SHORT = b"\xfe\xdc\xba"


def native(payloads, topic=b"", sender_id=7, max_datagram=1472):
    enc = NativeEncoder(sender_id=sender_id, topic=topic, max_datagram=max_datagram)
    return [d for p in payloads for d in enc.encode(p)]


@dataclass
class Row:
    name: str
    options: dict
    datagrams: list  # (payload, source)
    items: list  # what is delivered: readout ids (readout mode) or (topic, payload) (messages)
    counts: dict = field(default_factory=dict)  # statistics fields that must match
    slot: int = 65535


ROWS = [
    Row("readouts, one sender", dict(readout_class=AstroPix4Readout),
        [(r, A) for r in R], [0, 1, 2, 3, 4, 5],
        dict(datagrams=6, bytes=sum(map(len, R)), readouts=6, hits=hits(R), malformed=0, lost=0)),
    Row("a malformed readout is counted, not delivered", dict(readout_class=AstroPix4Readout),
        [(R[0], A), (BAD_HEADER, A), (R[1], A), (SHORT, A)], [0, 1],
        dict(datagrams=4, readouts=2, malformed=2, lost=0)),
    Row("only garbage: nothing delivered", dict(readout_class=AstroPix4Readout),
        [(BAD_HEADER, A), (SHORT, B)], [], dict(datagrams=2, readouts=0, malformed=2)),
    Row("a gap is lost", dict(readout_class=AstroPix4Readout),
        [(R[0], A), (R[1], A), (R[4], A), (R[5], A)], [0, 1, 4, 5], dict(readouts=4, lost=2)),
    Row("two senders are tracked apart", dict(readout_class=AstroPix4Readout),
        [(R[0], A), (R[0], B), (R[1], A), (R[1], B), (R[2], B)], [0, 0, 1, 1, 2],
        dict(readouts=5, lost=0, duplicates=0)),
    Row("IPv6 source", dict(readout_class=AstroPix4Readout),
        [(R[0], V6), (R[2], V6)], [0, 2], dict(readouts=2, lost=1)),
    Row("a truncated datagram is counted and skipped", dict(readout_class=AstroPix4Readout),
        [(R[0], A), (R[1] + b"\xbc" * SLOT, A), (R[2], A)], [0, 2],
        dict(datagrams=3, truncated=1, readouts=2), slot=SLOT),
    Row("a filter rejects without counting loss",
        dict(readout_class=AstroPix4Readout, filter=lambda payload, source: payload[3] % 2 == 0),
        [(r, A) for r in R], [0, 2, 4], dict(readouts=3, filtered=3, lost=0)),
    Row("raw messages", dict(framing="raw"),
        [(b"one", A), (b"", B), (b"three", V6)], [(None, b"one"), (None, b""), (None, b"three")],
        dict(datagrams=3, messages=3, malformed=0)),
    Row("native messages, fragmented and whole", dict(framing="native"),
        [(d, A) for d in native([b"x" * 3000, b"small"], topic=b"t")],
        [(b"t", b"x" * 3000), (b"t", b"small")], dict(datagrams=4, messages=2, lost=0)),
    Row("native topics filter, rejected messages are no loss", dict(framing="native", topics=["keep"]),
        [(d, A) for d in native([b"a"], topic=b"drop") + native([b"b"], topic=b"keep", sender_id=8)]
        + [(d, A) for d in NativeEncoder(sender_id=7, topic=b"drop", first_sequence=1).encode(b"c")],
        [(b"keep", b"b")], dict(messages=1, filtered=2, lost=0)),
    Row("a bad frame is counted", dict(framing="native"),
        [(b"not a frame", A)] + [(d, A) for d in native([b"ok"])], [(b"", b"ok")],
        dict(malformed=1, messages=1)),
    Row("framed readouts", dict(readout_class=AstroPix4Readout, framing="native"),
        [(d, A) for d in native(R[:3])], [0, 1, 2], dict(messages=3, readouts=3, hits=hits(R[:3]))),
    Row("MCL objects", dict(framing="mcl"),
        [(d, A) for d in MclEncoder(topic="t").encode({"a": 1})], [(b"t", {b"a": 1})],  # MCL strings are Python 2 str: bytes
        dict(messages=1)),
    Row("an MCL object where readouts are expected is malformed",
        dict(readout_class=AstroPix4Readout, framing="mcl"),
        [(d, A) for d in MclEncoder().encode({"a": 1})] + [(d, A) for d in MclEncoder().encode(R[0])],
        [0], dict(malformed=1, readouts=1)),
]


def _batches(datagrams, sizes, slot):
    """Yield (batch, n) for ``datagrams`` cut into batches of ``sizes``."""
    i = 0
    for size in sizes:
        batch = ReceiveBatch(max(size, 1), slot)
        for k, (payload, source) in enumerate(datagrams[i:i + size]):
            batch.store(k, payload, source)
        batch.count = size
        yield batch, size
        i += size


def _feed(row: Row, sizes):
    pipeline = ReceivePipeline(**row.options)
    items = []
    for batch, n in _batches(row.datagrams, sizes, row.slot):
        out = pipeline.run(batch, n, now=1.0)
        if out is None:
            continue
        if isinstance(out, ReadoutChunk):
            assert len(out) > 0 and len(out.batch.readouts) == len(out)
            items.extend(r.readout_id for r in out)
            assert [int(i) for i in out.batch.readouts.readout_id] == [r.readout_id for r in out]
        else:
            assert out and all(isinstance(m, Message) for m in out)
            items.extend((m.topic, m.payload) for m in out)
    return items, pipeline.statistics()


def _splits(n):
    yield [n]  # one batch
    yield [1] * n  # one datagram per batch
    for cut in range(1, n):
        yield [cut, n - cut]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_pipeline_table(row: Row):
    reference = None
    for sizes in _splits(len(row.datagrams)):
        items, stats = _feed(row, sizes)
        assert isinstance(stats, ReceiverStatistics)
        assert items == row.items, sizes
        for name, value in row.counts.items():
            assert getattr(stats, name) == value, (name, sizes)
        summary = (stats.datagrams, stats.bytes, stats.readouts, stats.hits, stats.messages,
                   stats.malformed, stats.truncated, stats.filtered, stats.lost, stats.duplicates)
        if reference is None:
            reference = summary
        # batch boundaries change nothing the consumer or the counters see
        assert summary == reference, sizes


def test_pipeline_pauses_between_datagrams_past_its_deadline_and_delivers_the_same():
    datagrams = [(d, A) for d in native([b"m%d" % i for i in range(10)])]
    (batch, n), = _batches(datagrams, [10], 65535)
    pipeline = ReceivePipeline(framing="native")
    pipeline.deadline = -math.inf  # always out of time
    work = pipeline.feed(batch, n, 1.0)
    pauses = 0
    try:
        work.send(None)
        while True:
            pauses += 1
            work.send(2.0)
    except StopIteration as done:
        out = done.value
    assert pauses == 10  # one before each datagram handled in Python
    assert [m.payload for m in out] == [b"m%d" % i for i in range(10)]
    # without a deadline: no pause at all
    pipeline = ReceivePipeline(framing="native")
    work = pipeline.feed(batch, n, 1.0)
    with pytest.raises(StopIteration):
        work.send(None)


def test_raw_readouts_without_filter_never_pause():
    (batch, n), = _batches([(r, A) for r in R], [len(R)], 65535)
    pipeline = ReceivePipeline(readout_class=AstroPix4Readout)
    pipeline.deadline = -math.inf
    with pytest.raises(StopIteration) as done:
        pipeline.feed(batch, n, 1.0).send(None)
    assert len(done.value.value) == len(R)


def test_incomplete_messages_are_pending_until_they_expire():
    first, second = native([b"y" * 2000])
    pipeline = ReceivePipeline(framing="native", reassembly=(2.0, 16, 1 << 20))
    (batch, n), = _batches([(first, A)], [1], 65535)
    assert pipeline.run(batch, n, now=10.0) is None
    assert pipeline.pending
    pipeline.expire(11.0)
    assert pipeline.pending  # not yet
    pipeline.expire(12.5)
    assert not pipeline.pending
    stats = pipeline.statistics()
    assert stats.reassembly.expired == 1 and stats.messages == 0
    # the second fragment alone completes nothing
    (batch, n), = _batches([(second, A)], [1], 65535)
    assert pipeline.run(batch, n, now=13.0) is None


def test_keep_bytes_false_delivers_decoded_batches_without_the_bytes():
    (batch, n), = _batches([(r, A) for r in R[:3]], [3], 65535)
    pipeline = ReceivePipeline(readout_class=AstroPix4Readout)
    pipeline.keep_bytes = False
    chunk = pipeline.run(batch, n, now=0.0)
    assert chunk.data is None and len(chunk) == 3
    assert list(chunk.batch.readouts.readout_id) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="one style per receiver"):
        chunk.readouts()


def test_statistics_are_frozen_snapshots():
    (batch, n), = _batches([(r, A) for r in R[:2]], [2], 65535)
    pipeline = ReceivePipeline(readout_class=AstroPix4Readout)
    before = pipeline.statistics()
    pipeline.run(batch, n, now=0.0)
    after = pipeline.statistics()
    assert (before.datagrams, after.datagrams) == (0, 2)
    with pytest.raises(AttributeError):
        after.datagrams = 5  # type: ignore[misc]


@pytest.mark.parametrize("framing", ["raw", "native"])
def test_hits_and_bytes_are_counted_per_sender(framing):
    # Two senders interleaved (raw: by address; native: by address and
    # sender id), in every split: each sender's hits and bytes are its own,
    # and they add up to the receiver's totals.
    a, b = R[:3], R[3:6]
    if framing == "raw":
        datagrams = [(a[0], A), (b[0], B), (a[1], A), (b[1], B), (a[2], A), (b[2], B)]
        keys = {A: a, B: b}
        size = len
    else:
        da, db = native(a, sender_id=1), native(b, sender_id=2)
        datagrams = [(d, A) for pair in zip(da, db) for d in pair]
        keys = {(*A, 1): a, (*A, 2): b}
        size = len  # framed: the payload, i.e. the serialized readout
    row = Row("volume", dict(readout_class=AstroPix4Readout, framing=framing), datagrams, [])
    for sizes in _splits(len(datagrams)):
        _, stats = _feed(row, sizes)
        assert set(stats.senders) == set(keys), sizes
        for key, sent in keys.items():
            assert stats.senders[key].hits == hits(sent), (key, sizes)
            assert stats.senders[key].bytes == sum(map(size, sent)), (key, sizes)
        assert sum(s.hits for s in stats.senders.values()) == stats.hits


@pytest.mark.parametrize("options, datagrams, bad", [
    (dict(readout_class=AstroPix4Readout), [(R[0], A), (BAD_HEADER, B), (R[1], A), (SHORT, A)],
     [(BAD_HEADER, B), (SHORT, A)]),
    (dict(readout_class=AstroPix4Readout, filter=lambda payload, source: True),
     [(SHORT, B), (R[0], A)], [(SHORT, B)]),
    (dict(framing="native"), [(b"not a frame", A)] + [(d, A) for d in native([b"ok"])], [(b"not a frame", A)]),
    (dict(readout_class=AstroPix4Readout, framing="native"), [(d, B) for d in native([R[0], b"junk"])],
     [(b"junk", B)]),
])
def test_on_malformed_gets_every_malformed_payload_with_its_source(options, datagrams, bad):
    for sizes in _splits(len(datagrams)):
        seen = []
        pipeline = ReceivePipeline(**options, on_malformed=lambda payload, source: seen.append((payload, source)))
        for batch, n in _batches(datagrams, sizes, 65535):
            pipeline.run(batch, n, now=1.0)
        assert seen == bad, sizes
        assert pipeline.statistics().malformed == len(bad)
