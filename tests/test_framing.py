"""Tests of the sans-I/O framings (mcast_trio._protocol): the framing table, raw, native, MCL, filters."""

from __future__ import annotations

import array
import itertools
import re
import struct
import sys

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcast_trio._errors import MalformedFrame
from mcast_trio._protocol import _mcl
from mcast_trio._protocol._filters import make_filter
from mcast_trio._protocol._framings import FRAMINGS, Framing, lookup_framing
from mcast_trio._protocol._mcl import MCL_CHUNK_SIZE, MclDecoder, MclEncoder
from mcast_trio._protocol._message import MAX_UDP_PAYLOAD, Message
from mcast_trio._protocol._native import (
    NATIVE_HEADER_SIZE,
    NATIVE_MAGIC,
    FrameHeader,
    NativeDecoder,
    NativeEncoder,
    parse_header,
)
from mcast_trio._protocol._raw import RawDecoder, RawEncoder, decode_raw, encode_raw
from mcast_trio._protocol._reassembly import (
    FRAGMENT_OVERHEAD,
    MESSAGE_OVERHEAD,
    Reassembler,
    ReassemblyStats,
    check_reassembly_limits,
)

SID = 0x0102030405060708
ADDR = ("127.0.0.1", 5000)
# An AstroPix readout header, as a datagram would start in raw framing.
READOUT = b"\xfe\xdc\xba" + bytes(range(40))


def header_bytes(*, magic=b"MCTR", version=1, flags=0, tlen=0, sender=SID, seq=7,
                 total=0, index=0, count=1, chunk=0):
    """The documented 30-byte layout, written independently of the module."""
    return (magic + bytes([version, flags, tlen, 0]) + sender.to_bytes(8, "little")
            + seq.to_bytes(4, "little") + total.to_bytes(4, "little")
            + index.to_bytes(2, "little") + count.to_bytes(2, "little")
            + chunk.to_bytes(2, "little"))


#: What the reassembly charges per fragment and per incomplete message
#: beyond the fragment bytes (see test_framing_faults.py for the bound on memory).
F = FRAGMENT_OVERHEAD
M = MESSAGE_OVERHEAD


def three_fragments(payload_size=1000, seq=7, sender=SID, topic=b""):
    """A message cut into 3 fragments (482 + 482 + 36 bytes with no topic)."""
    payload = bytes((i * 7 + seq) % 251 for i in range(payload_size))
    enc = NativeEncoder(sender_id=sender, topic=topic, max_datagram=512, first_sequence=seq)
    datagrams = enc.encode(payload)
    assert len(datagrams) == 3
    return payload, datagrams


def feed_all(reassembler, datagrams, now=0.0):
    results = []
    for d in datagrams:
        h = parse_header(d)
        results.append(reassembler.feed(h, d[h.payload_offset:], now))
    return results


# ============================================================== the framing table

ALL_FRAMINGS = [pytest.param(framing, id=name) for name, framing in FRAMINGS.items()]


def codec(framing):
    """A fresh encoder and decoder of ``framing``; where the datagram is the
    message (no encoder, no decoder), the raw ones, which show just that."""
    encoder = framing.encoder() if framing.encoder is not None else RawEncoder()
    decoder = framing.decoder() if framing.decoder is not None else RawDecoder()
    return encoder, decoder


def round_trip(framing, payload, topic=None):
    """Encode one message, feed its datagrams to a decoder; return the
    datagrams and the delivered message (None if none was delivered)."""
    encoder, decoder = codec(framing)
    datagrams = encoder.encode(payload, topic)
    delivered = [decoder.feed(d, ADDR, 0.0) for d in datagrams]
    assert delivered[:-1] == [None] * (len(datagrams) - 1)
    return datagrams, delivered[-1]


def test_framing_table_entries():
    assert list(FRAMINGS) == ["raw", "native", "mcl", "auto"]
    for name, framing in FRAMINGS.items():
        assert isinstance(framing, Framing) and framing.name == name
        assert framing.description and "\n" not in framing.description
        assert (framing.encoder is None) == (framing.decoder is None)
    with pytest.raises(AttributeError):
        FRAMINGS["raw"].topics = True  # frozen
    with pytest.raises(TypeError):
        FRAMINGS["raw"] = FRAMINGS["native"]  # read-only


@pytest.mark.parametrize("framing", ALL_FRAMINGS)
@pytest.mark.parametrize("payload", [b"", b"x", READOUT, bytes(range(256)) * 4])
def test_framing_round_trips(framing, payload):
    _, message = round_trip(framing, payload)
    assert message is not None and message.payload == payload and message.address == ADDR


@pytest.mark.parametrize("framing", ALL_FRAMINGS)
def test_framing_fragments_iff_it_carries_an_oversize_message(framing):
    payload = bytes(i % 253 for i in range(3 * MAX_UDP_PAYLOAD))
    if framing.fragments:
        datagrams, message = round_trip(framing, payload)
        assert len(datagrams) > 1 and max(map(len, datagrams)) <= MAX_UDP_PAYLOAD
        assert message.payload == payload
    else:
        with pytest.raises(ValueError, match="framing allows at most 65507"):
            round_trip(framing, payload)


@pytest.mark.parametrize("framing", ALL_FRAMINGS)
def test_framing_topics_iff_a_topic_survives(framing):
    if framing.topics:
        _, message = round_trip(framing, b"x", "events")
        assert message.topic == b"events"
    else:
        with pytest.raises(ValueError, match="carries no topic"):
            round_trip(framing, b"x", "events")
        _, message = round_trip(framing, b"x")
        assert message.topic is None


@pytest.mark.parametrize("framing", ALL_FRAMINGS)
def test_framing_objects_iff_any_msgpack_object_survives(framing):
    obj = {b"hits": [1, 2, 3], b"ok": True}
    if framing.objects:
        _, message = round_trip(framing, obj)
        assert message.payload == obj
    else:
        with pytest.raises(TypeError, match="contiguous bytes-like object, not dict"):
            round_trip(framing, obj)


@pytest.mark.parametrize("framing", ALL_FRAMINGS)
def test_framing_sequenced_iff_messages_carry_sender_and_sequence(framing):
    encoder, decoder = codec(framing)
    first, second = (decoder.feed(encoder.encode(b"x")[0], ADDR, 0.0) for _ in range(2))
    if framing.sequenced:
        assert first.sender_id is not None and first.sender_id == second.sender_id
        assert second.sequence == first.sequence + 1
    else:
        assert first.sender_id is first.sequence is second.sequence is None


@pytest.mark.parametrize("framing", ALL_FRAMINGS)
def test_framing_reassembly_iff_its_decoder_takes_the_bounds(framing):
    bounds = dict(timeout=1.0, max_messages=8, max_bytes=1 << 20)
    if framing.reassembly:
        assert framing.decoder(**bounds).stats == ReassemblyStats()
        with pytest.raises(ValueError, match="^timeout=0 is out of range"):
            framing.decoder(**{**bounds, "timeout": 0})
    else:
        assert not framing.fragments and framing.decoder is None


@pytest.mark.parametrize("framing", ALL_FRAMINGS)
def test_framing_msgpack_iff_it_needs_the_extra(framing, monkeypatch):
    monkeypatch.setitem(sys.modules, "msgpack", None)  # makes `import msgpack` fail
    monkeypatch.setattr(_mcl, "_msgpack_module", None)
    if framing.msgpack:
        with pytest.raises(ImportError, match=re.escape("pip install mcast_trio[mcl]")):
            codec(framing)
    else:
        codec(framing)


@pytest.mark.parametrize("framing", ALL_FRAMINGS)
def test_framing_resolve(framing):
    # A receiver with a readout class reads raw datagrams exactly where the
    # framing sends readouts raw; without one, "auto" means native.
    assert framing.resolve(readouts=True).raw_readouts == framing.raw_readouts
    assert (framing.resolve(readouts=True).name == "raw") == framing.raw_readouts
    expected = FRAMINGS["native"] if framing.name == "auto" else framing
    assert framing.resolve(readouts=False) is expected
    assert framing.resolve(readouts=False).name != "auto"


def test_lookup_framing():
    assert lookup_framing("mcl") is FRAMINGS["mcl"]
    assert lookup_framing("auto", allowed=("auto", "raw")) is FRAMINGS["auto"]


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        ("x", {}, "framing='x' is not a framing; allowed: 'raw', 'native', 'mcl', 'auto'"),
        ("auto", {"allowed": ("raw", "native", "mcl")},
         "framing='auto' is not a framing; allowed: 'raw', 'native', 'mcl'"),
        ("RAW", {"name": "mode", "allowed": ("raw",)}, "mode='RAW' is not a framing; allowed: 'raw'"),
        (None, {}, "framing=None is not a framing"),
        ([], {}, "framing=[] is not a framing"),
    ],
)
def test_lookup_framing_refuses(value, kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        lookup_framing(value, **kwargs)


RECEIVER_NAMES = ("reassembly_timeout", "max_pending_messages", "max_reassembly_bytes")


def test_check_reassembly_limits():
    assert check_reassembly_limits(2, 256, 1 << 20) == (2.0, 256, 1 << 20)
    assert type(check_reassembly_limits(2, 256, 1 << 20)[0]) is float
    assert check_reassembly_limits(0.5, 1 << 20, 1 << 40, names=RECEIVER_NAMES) == (0.5, 1 << 20, 1 << 40)


@pytest.mark.parametrize(
    ("bounds", "exc", "message"),
    [
        ((0, 1, 1), ValueError, "reassembly_timeout=0 is out of range; allowed: finite and > 0.0"),
        ((float("inf"), 1, 1), ValueError, "reassembly_timeout=inf is out of range"),
        (("1", 1, 1), TypeError, "reassembly_timeout='1' must be a number"),
        ((1, 0, 1), ValueError, "max_pending_messages=0 is out of range; allowed: 1..1048576"),
        ((1, True, 1), TypeError, "max_pending_messages=True must be an integer"),
        ((1, 1, 0), ValueError, "max_reassembly_bytes=0 is out of range; allowed: 1..1099511627776"),
        ((1, 1, 1.0), TypeError, "max_reassembly_bytes=1.0 must be an integer"),
    ],
)
def test_check_reassembly_limits_names_the_callers_arguments(bounds, exc, message):
    with pytest.raises(exc, match="^" + re.escape(message)):
        check_reassembly_limits(*bounds, names=RECEIVER_NAMES)


# ============================================================== raw


def test_raw_round_trip():
    assert encode_raw(READOUT) == [READOUT]
    assert decode_raw(bytearray(READOUT)) == READOUT
    assert RawEncoder().encode(memoryview(READOUT)) == [READOUT]
    assert RawDecoder().feed(READOUT, ADDR, 0.0) == Message(None, READOUT, ADDR)


def test_raw_counts_bytes_of_wide_buffers():
    data = array.array("H", range(10))
    assert encode_raw(data) == [data.tobytes()]


@pytest.mark.parametrize(
    ("call", "exc", "message"),
    [
        (lambda: encode_raw(b"x" * 65508), ValueError,
         "payload is 65508 bytes; raw framing allows at most 65507"),
        (lambda: encode_raw("text"), TypeError, "payload must be bytes-like, not str"),
        (lambda: encode_raw(5), TypeError, "payload must be a contiguous bytes-like object, not int"),
        (lambda: RawEncoder().encode(b"x", topic="t"), ValueError, "topic='t': raw framing carries no topic"),
    ],
)
def test_raw_errors(call, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        call()


# ============================================================== native: bytes on the wire


def test_native_single_datagram_bytes():
    enc = NativeEncoder(sender_id=SID, topic=b"ab", first_sequence=7)
    [datagram] = enc.encode(b"hello")
    assert datagram == bytes.fromhex(
        "4d435452"          # magic "MCTR"
        "01" "00" "02" "00"  # version, flags, topic length, reserved
        "0807060504030201"  # sender id
        "07000000"          # sequence
        "05000000"          # total size
        "0000" "0100"       # fragment index, count
        "0500"              # chunk size
    ) + b"ab" + b"hello"
    assert NATIVE_HEADER_SIZE == 30
    assert enc.sequence == 8


def test_native_fragment_headers():
    payload, datagrams = three_fragments()
    assert [len(d) for d in datagrams] == [512, 512, 30 + 36]
    for index, d in enumerate(datagrams):
        assert d[:30] == header_bytes(total=1000, index=index, count=3, chunk=482)
    assert b"".join(d[30:] for d in datagrams) == payload
    assert parse_header(datagrams[2]) == FrameHeader(
        version=1, flags=0, topic=b"", sender_id=SID, sequence=7, index=2, count=3,
        total_size=1000, payload_offset=30, chunk_size=482,
    )


def test_native_topic_str_is_utf8():
    [d] = NativeEncoder(topic="µ").encode(b"", topic="é")
    assert parse_header(d).topic == "é".encode()


def test_native_sequence_wraps_and_is_shared_by_fragments():
    enc = NativeEncoder(sender_id=1, max_datagram=512, first_sequence=2**32 - 1)
    first = enc.encode(b"x" * 1000)
    second = enc.encode(b"y")
    assert {parse_header(d).sequence for d in first} == {2**32 - 1}
    assert parse_header(second[0]).sequence == 0
    assert enc.sequence == 1


def test_native_random_sender_ids_differ():
    assert NativeEncoder().sender_id != NativeEncoder().sender_id


# (name, payload size, topic, max_datagram, expected number of datagrams)
ROUND_TRIPS = [
    ("empty", 0, b"", 1472, 1),
    ("one byte", 1, b"", 1472, 1),
    ("exactly one IPv4 datagram", 1442, b"", 1472, 1),
    ("one byte over", 1443, b"", 1472, 2),
    ("topic takes room", 1442, b"t" * 10, 1472, 2),
    ("exactly one IPv6 datagram", 1422, b"", 1452, 1),
    ("IPv6 one byte over", 1423, b"", 1452, 2),
    ("three fragments", 1000, b"", 512, 3),
    ("exact multiple of the chunk", 482 * 3, b"", 512, 3),
    ("longest topic, one datagram", 227, b"x" * 255, 512, 1),
    ("longest topic, two datagrams", 228, b"x" * 255, 512, 2),
    ("largest datagrams", 200_000, b"big", 65507, 4),
]


@pytest.mark.parametrize(
    ("size", "topic", "max_datagram", "count"),
    [pytest.param(*case[1:], id=case[0]) for case in ROUND_TRIPS],
)
def test_native_round_trip(size, topic, max_datagram, count):
    payload = bytes(i % 256 for i in range(size))
    enc = NativeEncoder(sender_id=SID, topic=topic, max_datagram=max_datagram, first_sequence=3)
    datagrams = enc.encode(payload)
    assert len(datagrams) == count
    assert all(len(d) <= max_datagram for d in datagrams)
    dec = NativeDecoder()
    results = [dec.feed(d, ADDR, 0.0) for d in datagrams]
    assert results[:-1] == [None] * (count - 1)
    assert results[-1] == Message(topic, payload, ADDR, SID, 3)
    assert dec.stats.bytes_buffered == 0 and dec.stats.pending == 0


def test_native_encodes_any_buffer():
    data = array.array("I", range(300))  # 1200 bytes
    enc = NativeEncoder(sender_id=1, max_datagram=512)
    dec = NativeDecoder()
    results = [dec.feed(d, None, 0.0) for d in enc.encode(data)]
    assert results[-1].payload == data.tobytes()
    assert [dec.feed(d, None, 0.0) for d in enc.encode(bytearray(b"ab"))][0].payload == b"ab"


# ============================================================== native: malformed headers

VALID = header_bytes(tlen=2, total=5, chunk=5) + b"ab" + b"hello"
# Fragment 0 of 3 (482-byte chunks, 1000 bytes in all).
FRAG0 = header_bytes(total=1000, index=0, count=3, chunk=482) + bytes(482)
LAST = header_bytes(total=1000, index=2, count=3, chunk=482) + bytes(36)

# (name, datagram, start of the error message)
MALFORMED_NATIVE = [
    ("empty", b"", "offset 0: datagram is 0 bytes, shorter than the 30-byte native header"),
    ("three bytes", b"MCT", "offset 3: datagram is 3 bytes"),
    ("header cut", VALID[:29], "offset 29: datagram is 29 bytes"),
    ("AstroPix readout", READOUT, r"offset 0: bad magic b'\xfe\xdc\xba\x00', expected b'MCTR'"),
    ("MCL datagram", msgpack.packb([b"topic", b"payload"]), "offset 0: bad magic"),
    ("wrong magic", b"MCTX" + VALID[4:], "offset 0: bad magic b'MCTX'"),
    ("version 2", header_bytes(version=2), "offset 4: unknown version 2"),
    ("version 0", header_bytes(version=0), "offset 4: unknown version 0"),
    ("count 0", header_bytes(count=0), "offset 26: fragment count is 0"),
    ("index == count", header_bytes(index=3, count=3, total=1000, chunk=482) + bytes(36),
     "offset 24: fragment index 3 >= fragment count 3"),
    ("index > count", header_bytes(index=9, count=1), "offset 24: fragment index 9 >= fragment count 1"),
    ("single fragment, chunk != total", header_bytes(total=5, chunk=4) + b"hello",
     "offset 28: chunk size 4 differs from total size 5"),
    ("total too large for the fragments", header_bytes(total=1447, count=3, chunk=482) + bytes(482),
     "offset 20: total size 1447 is inconsistent with 3 fragments of 482 bytes"),
    ("total too small for the fragments", header_bytes(total=964, count=3, chunk=482) + bytes(482),
     "offset 20: total size 964 is inconsistent with 3 fragments of 482 bytes"),
    ("zero chunk", header_bytes(total=0, count=2, chunk=0),
     "offset 20: total size 0 is inconsistent with 2 fragments of 0 bytes"),
    ("topic cut", header_bytes(tlen=10, total=0) + b"abc",
     "offset 33: datagram ends inside the 10-byte topic"),
    ("single fragment, total size disagrees", header_bytes(total=6, chunk=6) + b"hello",
     "offset 35: fragment 0 of 1 carries 5 bytes, the header says 6"),
    ("extra byte", VALID + b"!", "offset 37: fragment 0 of 1 carries 6 bytes, the header says 5"),
    ("non-last fragment short", FRAG0[:-1],
     "offset 511: fragment 0 of 3 carries 481 bytes, the header says 482"),
    ("last fragment long", LAST + b"!", "offset 66: fragment 2 of 3 carries 37 bytes, the header says 36"),
]


@pytest.mark.parametrize(
    ("datagram", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in MALFORMED_NATIVE],
)
def test_native_malformed(datagram, message):
    with pytest.raises(MalformedFrame, match="^" + re.escape(message)):
        parse_header(datagram)
    with pytest.raises(MalformedFrame):
        NativeDecoder().feed(datagram, ADDR, 0.0)
    with pytest.raises(MalformedFrame):
        parse_header(memoryview(bytearray(datagram)))


@pytest.mark.parametrize(
    "datagram",
    [
        pytest.param(VALID, id="single with topic"),
        pytest.param(NativeEncoder(sender_id=SID).encode(b"")[0], id="empty message"),
        pytest.param(three_fragments(topic=b"t")[1][0], id="first of three"),
        pytest.param(three_fragments(topic=b"t")[1][1], id="middle of three"),
        pytest.param(three_fragments(topic=b"t")[1][2], id="last of three"),
    ],
)
def test_native_every_truncation_is_malformed(datagram):
    parse_header(datagram)  # the whole datagram is valid
    for k in range(len(datagram)):
        try:
            parse_header(datagram[:k])
        except MalformedFrame:
            continue
        pytest.fail(f"prefix of {k} bytes was accepted")


def test_native_unknown_flags_and_reserved_are_ignored():
    datagram = bytearray(VALID)
    datagram[5] = 0xFF
    datagram[7] = 0xFF
    h = parse_header(bytes(datagram))
    assert (h.flags, h.topic, datagram[h.payload_offset:]) == (0xFF, b"ab", b"hello")


# ============================================================== native: reassembly


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=str)
def test_fragments_in_every_order(order):
    payload, datagrams = three_fragments()
    r = Reassembler()
    results = feed_all(r, [datagrams[i] for i in order])
    assert results == [None, None, payload]
    assert r.stats == ReassemblyStats(completed=1)


def test_lost_fragment_expires_and_memory_returns_to_zero():
    payload, datagrams = three_fragments()
    r = Reassembler(timeout=2.0)
    assert feed_all(r, [datagrams[0], datagrams[2]], now=10.0) == [None, None]
    assert (r.stats.pending, r.stats.bytes_buffered) == (1, 482 + 36 + 2 * F + M)
    assert r.expire(11.999) == 0 and r.stats.pending == 1
    assert r.expire(12.0) == 1
    assert r.stats == ReassemblyStats(expired=1)
    # The missing fragment arriving after expiry never delivers the message.
    assert feed_all(r, [datagrams[1]], now=12.5) == [None]
    assert r.stats.pending == 1


def test_expiry_runs_on_every_feed():
    _, datagrams = three_fragments()
    r = Reassembler(timeout=1.0)
    feed_all(r, datagrams[:2], now=0.0)
    single = NativeEncoder(sender_id=9).encode(b"z")[0]
    assert feed_all(r, [single], now=1.0) == [b"z"]  # the fast path expires too
    assert r.stats == ReassemblyStats(expired=1)


def test_duplicate_fragments_are_counted_and_ignored():
    payload, datagrams = three_fragments()
    r = Reassembler()
    d0, d1, d2 = datagrams
    assert feed_all(r, [d0, d0, d1, d1, d2]) == [None, None, None, None, payload]
    # A late copy after completion is a duplicate too, not a new pending message.
    assert feed_all(r, [d1]) == [None]
    assert r.stats == ReassemblyStats(completed=1, duplicate_fragments=3)


def test_two_messages_interleaved():
    pa, (a0, a1, a2) = three_fragments(seq=7)
    pb, (b0, b1, b2) = three_fragments(seq=8)
    assert pa != pb
    r = Reassembler()
    assert feed_all(r, [a0, b0, a1, b1, b2, a2]) == [None, None, None, None, pb, pa]
    assert r.stats == ReassemblyStats(completed=2)


def test_two_senders_same_sequence_never_merge():
    pa, (a0, a1, a2) = three_fragments(seq=7, sender=1)
    pb, (b0, b1, b2) = three_fragments(seq=7, sender=2, payload_size=999)
    r = Reassembler()
    assert feed_all(r, [a0, b1, a1, b0, b2, a2]) == [None, None, None, None, pb, pa]


def test_lost_fragment_then_new_message_with_same_count():
    pa, (a0, a1, _lost) = three_fragments(seq=7)
    pb, (b0, b1, b2) = three_fragments(seq=8)
    r = Reassembler()
    assert feed_all(r, [a0, a1, b0, b1, b2]) == [None, None, None, None, pb]
    assert r.stats.pending == 1  # the broken message waits for expiry, unmerged
    r.expire(100.0)
    assert r.stats == ReassemblyStats(completed=1, expired=1)


def test_inconsistent_fragments_are_counted():
    _, (a0, a1, a2) = three_fragments(seq=7)
    enc = NativeEncoder(sender_id=SID, max_datagram=512, first_sequence=7)
    other_count = enc.encode(bytes(1500))  # same key, 4 fragments
    enc = NativeEncoder(sender_id=SID, max_datagram=512, first_sequence=7)
    other_total = enc.encode(bytes(1001))  # same key, 3 fragments, other total
    r = Reassembler()
    results = feed_all(r, [a0, other_count[1], other_total[2]])
    assert results == [None] * 3
    assert r.stats == ReassemblyStats(inconsistent=2, pending=1, bytes_buffered=482 + F + M)
    # The pending message is intact and completes with its own fragments.
    assert feed_all(r, [a1, a2])[-1] is not None


def test_other_bytes_at_a_held_index_start_a_new_message():
    # Same key, same index, other bytes: the sender started over (a fixed
    # sender_id that restarts); the held message is superseded, never merged.
    pa, (a0, a1, a2) = three_fragments(seq=7)
    b0 = a0[:-1] + bytes([a0[-1] ^ 1])  # the new message: other first fragment, same rest
    r = Reassembler()
    assert feed_all(r, [a0, a1, b0]) == [None] * 3
    assert r.stats == ReassemblyStats(superseded=1, pending=1, bytes_buffered=482 + F + M)
    assert feed_all(r, [a1, a2]) == [None, b0[30:] + pa[482:]]


def test_fragment_size_mismatch_against_header_is_inconsistent():
    _, (a0, _, _) = three_fragments()
    r = Reassembler()
    assert r.feed(parse_header(a0), a0[30:-1], 0.0) is None
    assert r.stats == ReassemblyStats(inconsistent=1)


def test_max_bytes_eviction():
    pa, (a0, a1, a2) = three_fragments(seq=1)
    pb, (b0, b1, b2) = three_fragments(seq=2)
    r = Reassembler(max_bytes=1000 + 3 * F + M)  # one whole message fits
    assert feed_all(r, [a0, a1]) == [None, None]
    assert r.stats.bytes_buffered == 964 + 2 * F + M
    assert feed_all(r, [b0]) == [None]  # A and B's first fragment do not fit: A evicted
    assert r.stats == ReassemblyStats(evicted=1, bytes_buffered=482 + F + M, pending=1)
    assert feed_all(r, [b1, b2]) == [None, pb]
    assert feed_all(r, [a2]) == [None]  # A's last fragment alone never completes
    assert r.stats == ReassemblyStats(completed=1, evicted=1, bytes_buffered=36 + F + M, pending=1)


def test_oversized_message_is_never_buffered():
    _, datagrams = three_fragments()
    r = Reassembler(max_bytes=999)
    assert feed_all(r, datagrams) == [None, None, None]
    assert r.stats == ReassemblyStats(oversized=3)


def test_max_messages_eviction():
    r = Reassembler(max_messages=2)
    parts = [three_fragments(seq=s)[1] for s in (1, 2, 3)]
    feed_all(r, [p[0] for p in parts])
    assert r.stats == ReassemblyStats(evicted=1, pending=2, bytes_buffered=2 * (482 + F + M))
    assert feed_all(r, parts[0][1:]) == [None, None]  # message 1 was evicted
    assert feed_all(r, parts[2][1:])[-1] is not None


def test_single_fragment_bypasses_buffers():
    _, (a0, _, _) = three_fragments()
    r = Reassembler(max_bytes=1)  # could not hold any fragment
    [single] = NativeEncoder(sender_id=3).encode(b"payload")
    assert feed_all(r, [single]) == [b"payload"]
    assert r.stats == ReassemblyStats()
    assert feed_all(r, [a0]) == [None] and r.stats.oversized == 1


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"max_messages": 0}, ValueError, "max_messages=0 is out of range; allowed: 1..1048576"),
        ({"max_bytes": 0}, ValueError, "max_bytes=0 is out of range"),
        ({"max_bytes": 1.5}, TypeError, "max_bytes=1.5 must be an int"),
        ({"timeout": 0}, ValueError, "timeout=0 is out of range; allowed: finite and > 0.0"),
        ({"timeout": float("nan")}, ValueError, "timeout=nan is out of range"),
        ({"timeout": float("inf")}, ValueError, "timeout=inf is out of range"),
        ({"timeout": "1"}, TypeError, "timeout='1' must be a number"),
    ],
)
def test_reassembler_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        Reassembler(**kwargs)


# ============================================================== native: topic filtering


def test_topic_filter_from_header_only():
    dec = NativeDecoder(topics=["keep", b"also"])
    _, dropped = three_fragments(topic=b"drop")
    payload, kept = three_fragments(topic=b"keep", seq=8)
    for d in dropped:
        assert dec.feed(d, ADDR, 0.0) is None
    # Nothing of the filtered message was buffered.
    assert dec.filtered == 3 and dec.stats == ReassemblyStats()
    results = [dec.feed(d, ADDR, 0.0) for d in kept]
    assert results[-1] == Message(b"keep", payload, ADDR, SID, 8)
    [also] = NativeEncoder(topic="also").encode(b"x")
    assert dec.feed(also, ADDR, 0.0).payload == b"x"
    [untopical] = NativeEncoder().encode(b"x")
    assert dec.feed(untopical, ADDR, 0.0) is None and dec.filtered == 4


def test_topic_filter_reads_the_header_without_the_payload():
    # A receiver can decide from parse_header alone: the header and topic
    # are enough, the fragment bytes are not looked at until accepted.
    [d] = NativeEncoder(topic="events").encode(b"x" * 100)
    h = parse_header(d)
    assert h.topic == b"events" and h.payload_offset == 30 + 6


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"sender_id": -1}, ValueError, "sender_id=-1 is out of range; allowed: 0..18446744073709551615"),
        ({"sender_id": 2**64}, ValueError, "sender_id=18446744073709551616 is out of range"),
        ({"sender_id": "1"}, TypeError, "sender_id='1' must be an int"),
        ({"topic": b"x" * 256}, ValueError, "is 256 bytes long; allowed: at most 255 bytes"),
        ({"topic": 5}, TypeError, "topic=5 must be str or bytes"),
        ({"max_datagram": 511}, ValueError, "max_datagram=511 is out of range; allowed: 512..65507"),
        ({"max_datagram": 65508}, ValueError, "max_datagram=65508 is out of range; allowed: 512..65507"),
        ({"max_datagram": 1472.0}, TypeError, "max_datagram=1472.0 must be an int"),
        ({"first_sequence": 2**32}, ValueError, "first_sequence=4294967296 is out of range"),
    ],
)
def test_native_encoder_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        NativeEncoder(**kwargs)


def test_native_encoder_rejects_too_many_fragments():
    enc = NativeEncoder(topic=b"x" * 255, max_datagram=512)
    limit = enc.max_message_size()
    assert limit == 65535 * 227
    with pytest.raises(ValueError, match=f"at most {limit} bytes fit"):
        enc.encode(bytes(limit + 1))
    assert enc.sequence == 0  # nothing was sent, the sequence did not advance
    with pytest.raises(TypeError, match="payload must be bytes-like, not str"):
        enc.encode("text")
    with pytest.raises(ValueError, match="allowed: at most 255 bytes"):
        enc.encode(b"", topic="y" * 256)


# ============================================================== MCL


def test_mcl_single_bytes_match_mcl():
    # MCL (Python 2, msgpack use_bin_type=False): [topic, payload], both raw/str.
    assert MclEncoder("topic").encode(b"payload") == [b"\x92\xa5topic\xa7payload"]
    assert MclEncoder(b"topic").encode(b"payload") == [b"\x92\xa5topic\xa7payload"]
    assert MclEncoder("topic").encode(b"payload") == [
        msgpack.packb(["topic", b"payload"], use_bin_type=False)
    ]
    # No topic: nil, MCL's default.
    assert MclEncoder().encode(b"x") == [b"\x92\xc0\xa1x"]
    # 32..65535 bytes: str16 (0xda), never str8 (MCL's old msgpack had none).
    assert MclEncoder().encode(b"y" * 40) == [b"\x92\xc0\xda\x00\x28" + b"y" * 40]
    # Opt-in for Python 3 peers: payload as bin.
    assert MclEncoder("topic", use_bin_type=True).encode(b"payload") == [b"\x92\xa5topic\xc4\x07payload"]


def test_mcl_chunked_bytes_match_mcl():
    payload = bytes(i % 253 for i in range(150_000))
    datagrams = MclEncoder("t").encode(payload)
    packed = b"\xdb" + len(payload).to_bytes(4, "big") + payload  # raw32, as MCL
    assert len(packed) == 150_005
    n = 150_005 // 60_000 + 1
    assert n == 3
    assert datagrams == [
        msgpack.packb(["t", i, n, packed[(i - 1) * 60_000:i * 60_000]], use_bin_type=False)
        for i in (1, 2, 3)
    ]
    # ["t", 1, 3, <str16 of 60000 bytes: raw32 header of 150000 bytes, ...>]
    assert datagrams[0][:13] == b"\x94\xa1t\x01\x03\xda\xea\x60\xdb\x00\x02\x49\xf0"
    assert all(len(d) <= 65507 for d in datagrams)


def test_mcl_exact_multiple_ends_with_empty_chunk():
    payload = bytes(119_995)  # packed: 5-byte raw32 header + payload = 120000
    datagrams = MclEncoder(None).encode(payload)
    assert len(datagrams) == 3
    assert msgpack.unpackb(datagrams[2], raw=True) == [None, 3, 3, b""]
    dec = MclDecoder()
    results = [dec.feed(d, ADDR, 0.0) for d in datagrams]
    assert results == [None, None, Message(None, payload, ADDR)]


# (name, payload size, number of datagrams) with MCL's default 60000 chunk size
MCL_ROUND_TRIPS = [
    ("empty", 0, 1),
    ("small", 100, 1),
    ("largest single datagram", 59_995, 1),  # 1 + 1 + 3 + 59995 = 60000
    ("one chunk in chunked form", 59_996, 1),
    ("two chunks", 70_000, 2),
    ("three chunks", 150_000, 3),
]


@pytest.mark.parametrize(
    ("size", "count"),
    [pytest.param(*case[1:], id=case[0]) for case in MCL_ROUND_TRIPS],
)
def test_mcl_round_trip(size, count):
    payload = bytes(i % 251 for i in range(size))
    datagrams = MclEncoder().encode(payload)
    assert len(datagrams) == count
    assert len(msgpack.unpackb(datagrams[0], raw=True)) == (2 if size <= 59_995 else 4)
    dec = MclDecoder()
    results = [dec.feed(d, ADDR, 0.0) for d in datagrams]
    assert results[-1] == Message(None, payload, ADDR)
    assert results[:-1] == [None] * (count - 1)
    assert dec.stats.bytes_buffered == 0 and dec.stats.pending == 0


def test_mcl_decodes_bin_and_str_alike():
    dec = MclDecoder()
    for packed in (
        msgpack.packb(["t", b"p"], use_bin_type=True),
        msgpack.packb(["t", b"p"], use_bin_type=False),
        msgpack.packb([b"t", "p"], use_bin_type=True),
    ):
        assert dec.feed(packed, ADDR, 0.0) == Message(b"t", b"p", ADDR)


def small_mcl(payload_size, topic="t", seed=0):
    payload = bytes((i * 3 + seed) % 256 for i in range(payload_size))
    return payload, MclEncoder(topic, chunk_size=64).encode(payload)


def test_mcl_lost_chunk_then_new_message_is_not_merged():
    pa, a = small_mcl(150, seed=1)
    pb, b = small_mcl(150, seed=2)
    assert len(a) == len(b) == 3
    dec = MclDecoder()
    results = [dec.feed(d, ADDR, 0.0) for d in (a[0], a[1], b[0], b[1], b[2])]
    assert results == [None, None, None, None, Message(b"t", pb, ADDR)]
    assert dec.stats == ReassemblyStats(completed=1, superseded=1)


def test_mcl_lost_first_chunk_then_new_message_is_not_merged():
    pa, a = small_mcl(150, seed=1)
    pb, b = small_mcl(150, seed=2)
    dec = MclDecoder()
    results = [dec.feed(d, ADDR, 0.0) for d in (a[1], a[2], b[0], b[1], b[2])]
    assert results[-1] == Message(b"t", pb, ADDR)
    assert dec.stats == ReassemblyStats(completed=1, superseded=1)


def test_mcl_duplicate_chunk_is_ignored():
    pa, a = small_mcl(150)
    dec = MclDecoder()
    results = [dec.feed(d, ADDR, 0.0) for d in (a[0], a[0], a[1], a[2])]
    assert results[-1].payload == pa
    assert dec.stats == ReassemblyStats(completed=1, duplicate_fragments=1)


def test_mcl_senders_and_topics_are_kept_apart():
    pa, a = small_mcl(150, topic="x", seed=1)
    pb, b = small_mcl(150, topic="y", seed=2)
    pc, c = small_mcl(150, topic="x", seed=3)
    other = ("127.0.0.1", 5001)
    dec = MclDecoder()
    out = []
    for i in range(3):
        out.append(dec.feed(a[i], ADDR, 0.0))
        out.append(dec.feed(b[i], ADDR, 0.0))
        out.append(dec.feed(c[i], other, 0.0))
    assert [m for m in out if m] == [
        Message(b"x", pa, ADDR), Message(b"y", pb, ADDR), Message(b"x", pc, other)
    ]


def test_mcl_expiry_and_memory():
    _, a = small_mcl(150)
    dec = MclDecoder(timeout=0.5)
    dec.feed(a[0], ADDR, 1.0)
    dec.feed(a[1], ADDR, 1.2)
    assert dec.stats.bytes_buffered == 128 + 2 * F + M + len(b"t")  # the topic is held too
    assert dec.expire(1.49) == 0
    assert dec.expire(1.5) == 1
    assert dec.stats == ReassemblyStats(expired=1)


def test_mcl_max_bytes_eviction():
    pa, a = small_mcl(150, topic="a")  # chunks of 64, 64 and 25 bytes
    pb, b = small_mcl(150, topic="b")
    bound = 160 + 3 * F + M + 1
    dec = MclDecoder(max_bytes=bound)
    for d in (a[0], a[1], b[0]):
        dec.feed(d, ADDR, 0.0)
        assert dec.stats.bytes_buffered <= bound
    assert dec.stats == ReassemblyStats(evicted=1, bytes_buffered=64 + F + M + len(b"b"), pending=1)
    assert [dec.feed(d, ADDR, 0.0) for d in b[1:]][-1] == Message(b"b", pb, ADDR)
    assert dec.stats == ReassemblyStats(evicted=1, completed=1)


def test_mcl_message_larger_than_max_bytes_evicts_itself():
    _, a = small_mcl(150)  # 153 packed bytes
    dec = MclDecoder(max_bytes=150 + 3 * F + M)
    assert [dec.feed(d, ADDR, 0.0) for d in a] == [None] * 3
    # The third chunk does not fit next to the first two: the message is
    # dropped whole, and no partial entry is left behind.
    assert dec.stats == ReassemblyStats(evicted=1)


def test_mcl_reassembled_garbage_is_inconsistent():
    dec = MclDecoder()
    chunks = [
        msgpack.packb([b"t", 1, 2, b"\xda\x00\x10abc"]),  # claims 16 bytes
        msgpack.packb([b"t", 2, 2, b"de"]),
    ]
    assert [dec.feed(d, ADDR, 0.0) for d in chunks] == [None, None]
    trailing = [msgpack.packb([b"t", 1, 2, b"\x92\x01"]), msgpack.packb([b"t", 2, 2, b"\x02\x03"])]
    assert [dec.feed(d, ADDR, 0.0) for d in trailing] == [None, None]  # [1, 2] and a byte more
    assert dec.stats == ReassemblyStats(inconsistent=2)


def test_mcl_topic_filter():
    _, dropped = small_mcl(150, topic="no")
    payload, kept = small_mcl(150, topic="yes")
    dec = MclDecoder(topics="yes")
    assert [dec.feed(d, ADDR, 0.0) for d in dropped] == [None] * 3
    assert dec.filtered == 3 and dec.stats == ReassemblyStats()
    assert [dec.feed(d, ADDR, 0.0) for d in kept][-1] == Message(b"yes", payload, ADDR)
    assert dec.feed(MclEncoder().encode(b"x")[0], ADDR, 0.0) is None  # nil topic
    assert dec.filtered == 4


MCL_MALFORMED = [
    ("empty", b"", "offset 0: end of datagram does not start a msgpack array of 2 or 4 items"),
    ("empty array", b"\x90", "offset 0: 0x90 does not start"),
    ("map", msgpack.packb({b"t": b"p"}), "offset 0: 0x81 does not start"),
    ("three items", msgpack.packb([b"t", 1, 2]), "offset 0: 0x93 does not start"),
    ("three items, array16", b"\xdc\x00\x03\xa1t\x01\x02",
     "offset 0: expected a msgpack array of 2 or 4 items, got 3"),
    ("native frame", VALID, "offset 0: 0x4d does not start"),
    ("AstroPix readout", READOUT, "offset 0: 0xfe does not start"),
    ("truncated", msgpack.packb([b"topic", b"payload"])[:-1], "offset 0: datagram is not valid msgpack"),
    ("trailing bytes", msgpack.packb([b"t", b"p"]) + b"\x00", "offset 0: datagram is not valid msgpack"),
    ("int topic", msgpack.packb([1, b"p"]), "offset 1: topic is int, expected str/bin or nil"),
    ("index 0", msgpack.packb([b"t", 0, 1, b"x"]), "chunk index 0 / count 1: expected 1 <= i <= n"),
    ("index > count", msgpack.packb([b"t", 3, 2, b"x"]), "chunk index 3 / count 2"),
    ("bool index", msgpack.packb([b"t", True, 1, b"x"]), "chunk index True / count 1"),
    ("str index", msgpack.packb([b"t", b"1", 1, b"x"]), "chunk index b'1' / count 1"),
    ("int chunk", msgpack.packb([b"t", 1, 1, 5]), "chunk is int, expected str/bin"),
    ("deep nesting", b"\x92" + b"\x91" * 5000 + b"\xc0", "offset 0: datagram is not valid msgpack"),
]


@pytest.mark.parametrize(
    ("datagram", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in MCL_MALFORMED],
)
def test_mcl_malformed(datagram, message):
    with pytest.raises(MalformedFrame, match="^" + re.escape(message)):
        MclDecoder().feed(datagram, ADDR, 0.0)


@pytest.mark.parametrize(
    "datagram",
    [
        pytest.param(MclEncoder("topic").encode(b"payload" * 10)[0], id="single"),
        pytest.param(MclEncoder().encode(b"")[0], id="empty nil topic"),
        pytest.param(small_mcl(150)[1][0], id="first chunk"),
        pytest.param(small_mcl(150)[1][2], id="last chunk"),
    ],
)
def test_mcl_every_truncation_is_malformed(datagram):
    MclDecoder().feed(datagram, ADDR, 0.0)  # the whole datagram is valid
    dec = MclDecoder()
    for k in range(len(datagram)):
        try:
            dec.feed(datagram[:k], ADDR, 0.0)
        except MalformedFrame:
            continue
        pytest.fail(f"prefix of {k} bytes was accepted")


@pytest.mark.parametrize(
    ("call", "exc", "message"),
    [
        (lambda: MclEncoder(5), TypeError, "topic=5 must be None, str or bytes"),
        (lambda: MclEncoder(chunk_size=63), ValueError, "chunk_size=63 is out of range; allowed: 64..64989"),
        (lambda: MclEncoder(chunk_size=64990), ValueError, "chunk_size=64990 is out of range"),
        (lambda: MclEncoder(use_bin_type=1), TypeError, "use_bin_type=1 must be a bool"),
        (lambda: MclEncoder().encode(object()), TypeError, "payload=<object object at "),
        (lambda: MclEncoder().encode({b"k": {1, 2}}), TypeError,
         "payload={b'k': {1, 2}} is not msgpack-serialisable: can not serialize 'set' object"),
        (lambda: MclEncoder().encode(2**64), TypeError, "payload=18446744073709551616 is not msgpack-serialisable"),
        (lambda: MclEncoder("x" * 6000, chunk_size=64000).encode(bytes(70000)), ValueError,
         "a chunk datagram would be 70009 bytes, more than the 65000 an MCL listener reads"),
        (lambda: MclDecoder(topics=[]), ValueError, "topics=[] is empty; pass None to accept every topic"),
        (lambda: MclDecoder(max_bytes=0), ValueError, "max_bytes=0 is out of range"),
    ],
)
def test_mcl_arguments(call, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        call()


def test_mcl_without_msgpack_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "msgpack", None)  # makes `import msgpack` fail
    monkeypatch.setattr(_mcl, "_msgpack_module", None)
    for cls in (MclEncoder, MclDecoder):
        with pytest.raises(ImportError, match=re.escape("pip install mcast_trio[mcl]")):
            cls()


# ============================================================== filters


def address_is(a):
    return lambda payload, address: address == a


# (name, topics, filter, [(topic, payload, address, expected), ...])
FILTERS = [
    ("nothing", None, None, [(None, b"", ADDR, True), (b"t", b"x", None, True)]),
    ("topic list", ["a", b"b"], None,
     [(b"a", b"", ADDR, True), (b"b", b"", ADDR, True), (b"c", b"", ADDR, False), (None, b"", ADDR, False)]),
    ("single str topic", "ab", None, [(b"ab", b"", ADDR, True), (b"a", b"", ADDR, False)]),
    ("non-ASCII topic", ["é"], None, [("é".encode(), b"", ADDR, True)]),
    ("bytes regex", None, rb"\xfe\xdc\xba", [(None, READOUT, ADDR, True), (None, b"\xfe\xdc", ADDR, False)]),
    ("str regex", None, r"hit[0-9]", [(None, b"xxhit5", ADDR, True), (None, b"hit", ADDR, False)]),
    ("compiled str regex keeps flags", None, re.compile("abc", re.IGNORECASE),
     [(None, b"xABCx", ADDR, True), (None, b"ab", ADDR, False)]),
    ("compiled bytes regex", None, re.compile(rb"^\x00"),
     [(None, b"\x00a", ADDR, True), (None, b"a\x00", ADDR, False)]),
    ("callable", None, address_is(ADDR), [(None, b"", ADDR, True), (None, b"", ("h", 1), False)]),
    ("topics and regex", ["a"], "ok",
     [(b"a", b"ok", ADDR, True), (b"a", b"no", ADDR, False), (b"b", b"ok", ADDR, False)]),
]


@pytest.mark.parametrize(
    ("topics", "filter", "cases"),
    [pytest.param(*case[1:], id=case[0]) for case in FILTERS],
)
def test_make_filter(topics, filter, cases):
    predicate = make_filter(topics=topics, filter=filter)
    assert [predicate(t, p, a) for t, p, a, _ in cases] == [e for *_, e in cases]


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"topics": []}, ValueError, "topics=[] is empty; pass None to accept every topic"),
        ({"topics": 5}, TypeError, "topics=5 must be None, a str/bytes topic or an iterable of them"),
        ({"topics": [5]}, TypeError, "topics item=5 must be str or bytes"),
        ({"filter": 5}, TypeError,
         "filter=5 must be None, a callable (payload, address) -> bool, or a regular expression"),
        ({"filter": "("}, ValueError, "filter='(' is not a valid regular expression"),
        ({"filter": b"[a"}, ValueError, "filter=b'[a' is not a valid regular expression"),
    ],
)
def test_make_filter_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        make_filter(**kwargs)


# ============================================================== random input


def only_malformed(call, data):
    try:
        call(data)
    except MalformedFrame:
        pass


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_native(data):
    dec = NativeDecoder()
    only_malformed(parse_header, data)
    only_malformed(lambda d: dec.feed(d, ADDR, 0.0), data)
    # Deeper: a valid magic and version, random rest.
    only_malformed(lambda d: dec.feed(b"MCTR\x01" + d, ADDR, 0.0), data)


@settings(max_examples=400, deadline=None)
@given(
    data=st.binary(max_size=200),
    lead=st.sampled_from([b"", b"\x92", b"\x94", b"\x94\xa1t", b"\xdc\x00\x04"]),
)
def test_random_bytes_mcl(data, lead):
    dec = MclDecoder()
    only_malformed(lambda d: dec.feed(d, ADDR, 0.0), lead + data)


@settings(max_examples=200, deadline=None)
@given(
    fields=st.tuples(
        st.integers(0, 3), st.integers(0, 255), st.integers(0, 2**32 - 1),
        st.integers(0, 4), st.integers(0, 4), st.integers(0, 600), st.integers(0, 7),
    ),
    tail=st.binary(max_size=1500),
)
def test_random_native_headers(fields, tail):
    version, flags, total, index, count, chunk, tlen = fields
    datagram = header_bytes(version=version, flags=flags, total=total % 2000, index=index,
                            count=count, chunk=chunk, tlen=tlen) + tail
    try:
        h = parse_header(datagram)
    except MalformedFrame:
        return
    # Whatever is accepted is self-consistent.
    assert len(datagram) - h.payload_offset == h.fragment_size
    r = Reassembler()
    r.feed(h, datagram[h.payload_offset:], 0.0)


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(0, 5000),
    max_datagram=st.integers(512, 1500),
    topic=st.binary(max_size=40),
    data=st.data(),
)
def test_native_round_trip_any_order(size, max_datagram, topic, data):
    payload = bytes(i % 256 for i in range(size))
    datagrams = NativeEncoder(sender_id=1, topic=topic, max_datagram=max_datagram).encode(payload)
    order = data.draw(st.permutations(range(len(datagrams))))
    dec = NativeDecoder()
    results = [dec.feed(datagrams[i], None, 0.0) for i in order]
    assert [m.payload for m in results if m] == [payload]
    assert results[-1] is not None and dec.stats.bytes_buffered == 0


def test_framings_are_told_apart_at_byte_0():
    # Native magic, AstroPix header and every msgpack array start differ.
    assert NATIVE_MAGIC[0] not in set(range(0x90, 0xA0)) | {0xDC, 0xDD, 0xFE}
    assert struct.calcsize("<4sBBBxQIIHHH") == NATIVE_HEADER_SIZE
    assert MCL_CHUNK_SIZE == 60000


def test_mcl_absurd_chunk_count_is_dropped_not_buffered():
    dec = MclDecoder()
    assert dec.feed(msgpack.packb([b"t", 1, 70_000, b"x"]), ADDR, 0.0) is None
    assert dec.stats == ReassemblyStats(oversized=1)
