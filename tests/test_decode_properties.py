"""Property tests: the compiled decoder equals the reference on random and
mutated streams; serialization round-trips; only MalformedReadout is raised."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcast_trio import AstroPix4Readout, MalformedReadout, decode_readouts
from mcast_trio import _decode, _reference
from mcast_trio._format import HIT_DTYPE

settings.register_profile("mcast", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mcast")

# Bytes that matter to the walk, heavily weighted, plus anything at all.
interesting = st.sampled_from([0xBC, 0xBC, 0xFF, 0xE0, 0xE1, 0xE5, 0xFE, 0xDF, 0x00, 0x12, 0x7F])
byte = st.one_of(interesting, st.integers(0, 255))
raw_bytes = st.lists(byte, max_size=80).map(bytes)
extra_st = st.one_of(st.none(), st.lists(byte, max_size=9).map(bytes))

clean_word = st.tuples(st.integers(0xE0, 0xFE), st.lists(st.integers(0, 0xDF).filter(lambda b: b != 0xBC),
                                                          min_size=7, max_size=7)).map(lambda t: bytes([t[0], *t[1]]))
token = st.one_of(
    clean_word,  # a hit
    clean_word.map(lambda w: w[: len(w) // 2]),  # a truncated hit
    st.lists(st.just(0xBC), min_size=1, max_size=3).map(bytes),  # idle
    st.lists(st.just(0xFF), min_size=1, max_size=2).map(bytes),  # padding
    st.integers(0xE0, 0xFE).map(lambda b: bytes([b])),  # stray start byte
    st.lists(st.integers(0, 255), min_size=1, max_size=5).map(bytes),  # garbage
)
stream = st.lists(token, max_size=40).map(b"".join)


def _compiled(data: bytes, extra):
    out = np.zeros(len(data) // 8 + 1, dtype=HIT_DTYPE)
    n, flags, start, dropped = _decode.decode_one(data, extra, 5, 99, out.view(np.uint8))
    return out[:n], flags, start, dropped


def _same(data: bytes, extra):
    ref_hits, ref_flags, ref_start, ref_dropped = _reference.decode_data(data, extra, 5, 99)
    hits, flags, start, dropped = _compiled(data, extra)
    assert (hits == ref_hits).all() and len(hits) == len(ref_hits)
    assert (flags, start, dropped) == (ref_flags, ref_start, ref_dropped)


@given(raw_bytes, extra_st)
def test_compiled_equals_reference_on_random_bytes(data, extra):
    _same(data, extra)


@given(stream, extra_st)
def test_compiled_equals_reference_on_structured_streams(data, extra):
    _same(data, extra)


@given(stream, st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["delete", "insert", "flip"]),
                                  st.integers(0, 255)), max_size=6))
def test_compiled_equals_reference_on_mutated_streams(data, mutations):
    buf = bytearray(data)
    for pos, kind, value in mutations:
        if not buf and kind != "insert":
            continue
        pos %= len(buf) + (kind == "insert")
        if kind == "delete":
            del buf[pos]
        elif kind == "insert":
            buf.insert(pos, value)
        else:
            buf[pos] ^= value or 1
    _same(bytes(buf), None)


def _datagram(data: bytes, readout_id: int, timestamp: int = 1) -> bytes:
    return AstroPix4Readout(data, readout_id, timestamp).to_bytes()


@given(stream, st.lists(st.integers(0, 10_000), max_size=12), st.sampled_from(["always", "consecutive", "never"]))
def test_batch_equals_reference_on_a_stream_cut_into_readouts(data, cuts, carry):
    # Split hits across readouts wherever the cuts fall.
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    datagrams = [_datagram(p, i) for i, p in enumerate(pieces)]
    batch = decode_readouts(datagrams, carry=carry)
    mode = {"always": 0, "consecutive": 1, "never": 2}[carry]
    ref_hits, ref_rows, ref_extra, ref_last = _reference.decode_batch(datagrams, None, mode, -1)
    assert (batch.hits.view(np.ndarray) == ref_hits).all() and len(batch.hits) == len(ref_hits)
    assert (batch.readouts.view(np.ndarray) == ref_rows).all()
    assert (batch.extra_bytes, batch.last_id) == (ref_extra, ref_last)


@given(stream)
def test_byte_at_a_time(data):
    # Every readout carries a single byte: extra bytes travel readout to readout.
    datagrams = [_datagram(data[i:i + 1], i) for i in range(len(data))]
    batch = decode_readouts(datagrams)
    ref_hits, ref_rows, _, _ = _reference.decode_batch(datagrams)
    assert (batch.hits.view(np.ndarray) == ref_hits).all() and len(batch.hits) == len(ref_hits)
    assert (batch.readouts.view(np.ndarray) == ref_rows).all()


@given(st.lists(st.one_of(raw_bytes, stream.map(lambda d: _datagram(d, 3)),
                          stream.map(lambda d: _datagram(d, 4)[:-1])), max_size=10))
def test_batch_survives_arbitrary_datagrams(datagrams):
    batch = decode_readouts(datagrams)
    ref_hits, ref_rows, ref_extra, _ = _reference.decode_batch(datagrams)
    assert (batch.hits.view(np.ndarray) == ref_hits).all() and len(batch.hits) == len(ref_hits)
    assert (batch.readouts.view(np.ndarray) == ref_rows).all()
    assert batch.n_malformed == int(ref_rows["malformed"].sum())
    # Every malformed datagram is reported with a message; others decode.
    for index, message in batch.errors:
        assert batch.readouts.malformed[index]
        with pytest.raises(MalformedReadout) as info:
            AstroPix4Readout.from_bytes(datagrams[index])
        assert str(info.value) == message


@given(raw_bytes)
def test_from_bytes_raises_only_malformed_readout(datagram):
    try:
        readout = AstroPix4Readout.from_bytes(datagram)
    except MalformedReadout:
        return
    readout.decode()


@given(stream, st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_to_bytes_from_bytes_round_trip(data, readout_id, timestamp):
    readout = AstroPix4Readout(data, readout_id, timestamp)
    raw = readout.to_bytes()
    assert raw[:3] == b"\xfe\xdc\xba"
    assert struct.unpack_from("<IQI", raw, 3) == (readout_id, timestamp, len(readout.data()))
    again = AstroPix4Readout.from_bytes(raw)
    assert again == readout and again.to_bytes() == raw
    assert (again.decode() == readout.decode()).all()


@given(stream, st.integers(0, 18))
def test_truncated_datagrams_are_malformed(data, cut):
    raw = _datagram(data, 1)
    cut = min(cut, len(raw) - 1)
    with pytest.raises(MalformedReadout):
        AstroPix4Readout.from_bytes(raw[: len(raw) - 1 - cut])


def _compiled_chains(datagrams, chain, state, mode):
    from mcast_trio._batch import decode_chains

    lens = np.array([len(d) for d in datagrams], dtype=np.int64)
    offs = np.zeros(len(lens), dtype=np.int64)
    if len(lens) > 1:
        np.cumsum(lens[:-1], out=offs[1:])
    extras = np.zeros(8 * len(state), dtype=np.uint8)
    for g, (extra, _last) in enumerate(state):
        if extra:
            extras[8 * g:8 * g + len(extra)] = np.frombuffer(extra, np.uint8)
    extra_lens = np.array([-1 if e is None else len(e) for e, _l in state], dtype=np.int8)
    last_ids = np.array([last for _e, last in state], dtype=np.int64)
    batch = decode_chains(b"".join(datagrams), offs, lens, np.array(chain, dtype=np.int64),
                          extras, extra_lens, last_ids, mode)
    out = [(None if n < 0 else extras[8 * g:8 * g + n].tobytes(), int(last))
           for g, (n, last) in enumerate(zip(extra_lens.tolist(), last_ids.tolist()))]
    return batch, out


@given(stream, st.lists(st.integers(0, 10_000), max_size=12), st.lists(st.integers(0, 3), max_size=13),
       st.lists(st.tuples(st.one_of(st.none(), st.lists(byte, max_size=8).map(bytes)),
                          st.integers(-1, 20)), min_size=4, max_size=4),
       st.lists(st.integers(0, 13), max_size=3), st.sampled_from([0, 1, 2]))
def test_chains_equal_reference(data, cuts, owners, state, garbage, mode):
    """decode_chains (several carry chains, rows in arrival order, malformed
    rows among them) equals the reference on the same input."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    datagrams = [_datagram(p, i) for i, p in enumerate(pieces)]
    for k in sorted({g % (len(datagrams) + 1) for g in garbage}, reverse=True):
        datagrams.insert(k, b"\xff" * 5)  # malformed
    chain = [(owners[k] if k < len(owners) else k) % 4 for k in range(len(datagrams))]
    batch, out = _compiled_chains(datagrams, chain, state, mode)
    ref_hits, ref_rows, ref_state = _reference.decode_chains(datagrams, chain, state, mode)
    assert (batch.hits.view(np.ndarray) == ref_hits).all() and len(batch.hits) == len(ref_hits)
    assert (batch.readouts.view(np.ndarray) == ref_rows).all()
    assert out == [(e, last) for e, last in ref_state]


def test_chains_keep_each_senders_split_hits():
    """Two senders' split hits interleaved in one call, with a malformed
    datagram between readout k and k+1 of one of them: each chain completes
    its own hits, as decoding each sender alone does."""
    from mcast_trio.sim import DaqSimulator

    a = DaqSimulator(1, start_ns=0, chip_id=1, mean_hits=3.0, split_fraction=0.6).generate(40)
    b = DaqSimulator(2, start_ns=0, chip_id=2, mean_hits=3.0, split_fraction=0.6).generate(40)
    datagrams, chain = [], []
    for k, (da, db) in enumerate(zip(a.datagrams(), b.datagrams())):
        datagrams += [da, db]
        chain += [0, 1]
        if k % 3 == 0:
            datagrams.append(b"\x00" * 9)
            chain.append(k % 2)
    batch, _out = _compiled_chains(datagrams, chain, [(None, -1), (None, -1)], 1)
    hits = batch.hits.view(np.ndarray)
    for truth, chip in ((a.truth, 1), (b.truth, 2)):
        mine = hits[hits["chip_id"] == chip]
        assert len(mine) == len(truth)
        for name in HIT_DTYPE.names:
            np.testing.assert_array_equal(mine[name], truth[name])
