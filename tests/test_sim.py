"""Tests of the DAQ simulator (``mcast_trio.sim``)."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcast_trio import _reference
from mcast_trio._batch import decode_readouts
from mcast_trio._format import HIT_DTYPE, READOUT_DTYPE, DecodingStatus, is_valid_start_byte
from mcast_trio._readout import AstroPix4Readout
from mcast_trio.sim import DaqSimulator, SimBatch

START = 1_753_255_536_707_629_800
FIELDS = HIT_DTYPE.names
#: The per-readout DecodingStatus column of READOUT_DTYPE.
STATUS = "status" if "status" in READOUT_DTYPE.names else "flags"


def _reference_decode(batches, carry=_reference.CARRY_ALWAYS):
    """Decode batches in sequence with the reference, carrying across batches."""
    extra, last = None, -1
    hits, rows = [], []
    for batch in batches:
        h, r, extra, last = _reference.decode_batch(batch.datagrams(), extra, carry, last)
        hits.append(h)
        rows.append(r)
    return np.concatenate(hits), np.concatenate(rows), extra


def _assert_hits_equal(got, want):
    assert len(got) == len(want)
    for name in FIELDS:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


# -- determinism -----------------------------------------------------------------


def test_same_seed_same_bytes_and_truth():
    a = DaqSimulator(42, start_ns=START, split_fraction=0.3).generate(500)
    b = DaqSimulator(42, start_ns=START, split_fraction=0.3).generate(500)
    assert a.buffer == b.buffer
    assert a.truth.tobytes() == b.truth.tobytes()
    c = DaqSimulator(43, start_ns=START, split_fraction=0.3).generate(500)
    assert c.buffer != a.buffer
    assert not np.array_equal(c.truth["row"][:50], a.truth["row"][:50])


def test_sequence_of_calls_is_reproducible():
    def run():
        sim = DaqSimulator(1, start_ns=0, split_fraction=0.5)
        return [sim.datagrams(7), sim.datagrams(0), sim.datagrams(30)]

    assert run() == run()


def test_default_start_is_now():
    before = time.time_ns()
    batch = DaqSimulator(0).generate(2)
    assert before <= int(batch.timestamps[0]) <= time.time_ns()


# -- the decoder recovers the truth --------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"split_fraction": 0.5, "padding_fraction": 0.5},
        {"split_fraction": 1.0, "padding_fraction": 1.0, "mean_hits": 6.0, "max_idle_gap": 0},
        {"split_fraction": 1.0, "mean_hits": 0.4, "lead_idles": 0, "trailing_idles": 1, "chip_id": 30},
        {"mean_hits": 0.0},
    ],
)
def test_reference_decoder_recovers_the_truth(kwargs):
    sim = DaqSimulator(5, start_ns=START, **kwargs)
    batches = [sim.generate(n) for n in (60, 1, 0, 45)]
    hits, rows, extra = _reference_decode(batches)
    truth = np.concatenate([np.asarray(b.truth) for b in batches])
    _assert_hits_equal(hits, truth)
    assert rows["dropped_bytes"].sum() == 0
    assert not (rows[STATUS] & (DecodingStatus.INCOMPLETE_HIT_DROPPED | DecodingStatus.ORPHAN_BYTES_DROPPED)).any()
    # The pending split hit (if any) is the extra bytes the decoder holds.
    assert (extra is not None) == sim.pending_split


def test_split_hits_are_reassembled_across_readouts_and_batches():
    sim = DaqSimulator(9, start_ns=START, split_fraction=0.6, mean_hits=2.0)
    batches = [sim.generate(100), sim.generate(100)]
    n_split = sum(b.n_split for b in batches)
    assert n_split > 60
    hits, rows, _ = _reference_decode(batches)
    _assert_hits_equal(hits, np.concatenate([np.asarray(b.truth) for b in batches]))
    matched = (rows[STATUS] & DecodingStatus.ORPHAN_BYTES_MATCHED) != 0
    valid_extra = (rows[STATUS] & DecodingStatus.VALID_EXTRA_BYTES) != 0
    assert valid_extra.sum() == n_split
    # Every split but a last pending one was matched in the readout after it.
    assert matched.sum() == n_split - sim.pending_split
    assert np.array_equal(matched[1:], valid_extra[:-1])


def test_split_hits_lost_and_flagged_without_carry():
    sim = DaqSimulator(9, start_ns=START, split_fraction=0.6)
    batch = sim.generate(200)
    hits, rows, extra = _reference_decode([batch], carry=_reference.CARRY_NEVER)
    truth = np.asarray(batch.truth)
    # The split hits are the first hit of the readout after a split.
    after_split = np.zeros(len(batch), dtype=bool)
    after_split[1:] = (rows[STATUS][:-1] & DecodingStatus.VALID_EXTRA_BYTES) != 0
    ids_after = batch.readout_ids[after_split]
    lost = np.isin(truth["readout_id"], ids_after) & (truth["decoding_order"] == 0)
    assert lost.sum() == after_split.sum() == batch.n_split - sim.pending_split > 50
    kept = truth[~lost]
    kept_order = kept["decoding_order"] - np.isin(kept["readout_id"], ids_after)
    assert len(hits) == len(kept)
    for name in FIELDS:
        want = kept_order if name == "decoding_order" else kept[name]
        np.testing.assert_array_equal(hits[name], want, err_msg=name)
    not_used = (rows[STATUS] & DecodingStatus.ORPHAN_BYTES_NOT_USED) != 0
    assert np.array_equal(not_used, after_split)
    assert extra is None


def test_batch_decoder_recovers_the_truth_of_a_large_batch():
    sim = DaqSimulator(2, start_ns=START, split_fraction=0.3, padding_fraction=0.2, mean_hits=3.0)
    batch = sim.generate(20_000)
    decoded = decode_readouts(batch.buffer, batch.lengths, offsets=batch.offsets)
    assert decoded.n_malformed == 0
    _assert_hits_equal(decoded.hits, batch.truth)
    decoded_list = decode_readouts(batch.datagrams())
    _assert_hits_equal(decoded_list.hits, batch.truth)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    mean_hits=st.floats(0.0, 6.0),
    split_fraction=st.floats(0.0, 1.0),
    padding_fraction=st.floats(0.0, 1.0),
    max_idle_gap=st.integers(0, 3),
    lead_idles=st.integers(0, 3),
    trailing_idles=st.integers(1, 3),
    chip_id=st.integers(0, 30),
    rows=st.integers(1, 32),
    columns=st.integers(1, 32),
    tot=st.sampled_from(["gamma", "exponential", "landau", "constant"]),
    sizes=st.lists(st.integers(0, 12), min_size=1, max_size=3),
)
def test_any_parameters_reference_decoder_recovers_the_truth(sizes, tot, **kwargs):
    sim = DaqSimulator(start_ns=0, tot_distribution=tot, tot_mean_us=50.0, **kwargs)
    batches = [sim.generate(n) for n in sizes]
    hits, rows, _ = _reference_decode(batches)
    _assert_hits_equal(hits, np.concatenate([np.asarray(b.truth) for b in batches]))
    assert rows["dropped_bytes"].sum() == 0
    for batch in batches:
        for data in batch.data():
            words, _flags, _extra, _dropped = _reference.walk(data, None)
            assert all(is_valid_start_byte(w[0]) for w in words)


# -- the bytes ------------------------------------------------------------------------


def test_every_generated_hit_starts_with_a_valid_start_byte():
    for chip_id in (0, 13, 30):
        batch = DaqSimulator(3, start_ns=0, chip_id=chip_id, mean_hits=4.0).generate(200)
        assert (batch.truth["chip_id"] == chip_id).all()
        assert (batch.truth["payload"] == 7).all()
        starts = 0
        for data in batch.data():
            words, flags, extra, dropped = _reference.walk(data, None)
            assert flags == 0 and dropped == 0
            assert all(is_valid_start_byte(w[0]) for w in words)
            starts += len(words)
        assert starts == len(batch.truth) > 500
        # The start byte is 111 + the chip id, bits reversed.
        word = _reference.encode_word(chip_id=chip_id, payload=7)
        assert word[0] == 0b11100000 | int(f"{chip_id:05b}"[::-1], 2)


def test_layout_idles_padding_and_readout_size():
    sim = DaqSimulator(4, start_ns=START, padding_fraction=1.0, readout_size=64, mean_hits=3.0)
    batch = sim.generate(300)
    data = batch.data()
    board = batch.board_data()
    for d, raw in zip(data, board):
        assert d.startswith(b"\xbc\xbc")  # two leading idles, like the real chip
        assert d.endswith(b"\xbc" * 6)  # trailing idles (no split hits here)
        assert not d.endswith(b"\xff")
        assert len(raw) % 64 == 0 and raw.startswith(d) and set(raw[len(d):]) <= {0xFF}
    assert sum(len(raw) > len(d) for d, raw in zip(data, board)) > 250
    # Padding interleaved with idle bytes between hits, sometimes.
    assert sum(b"\xbc\xff" in d or d[10:].find(b"\xff") >= 0 for d in data) > 50
    readouts = batch.readouts()
    assert [r.to_bytes() for r in readouts] == batch.datagrams()
    assert [r.data() for r in readouts] == data
    assert all(isinstance(r, AstroPix4Readout) for r in readouts)


def test_serialized_layout_matches_the_spec():
    batch = DaqSimulator(6, start_ns=START, period_ns=1000, start_id=10).generate(50)
    for k, datagram in enumerate(batch.datagrams()):
        readout = AstroPix4Readout.from_bytes(datagram)
        assert readout.readout_id == 10 + k
        assert readout.timestamp == START + 1000 * k
        assert datagram[:3] == b"\xfe\xdc\xba"
        assert int.from_bytes(datagram[15:19], "little") == len(datagram) - 19
    assert list(batch.offsets) == list(np.cumsum([0] + list(batch.lengths[:-1])))
    assert len(batch.buffer) == int(batch.lengths.sum())


def test_readout_ids_wrap_and_timestamps():
    sim = DaqSimulator(0, start_id=2**32 - 3, start_ns=5, period_ns=7, jitter_ns=3)
    batch = sim.generate(6)
    assert batch.readout_ids.tolist() == [2**32 - 3, 2**32 - 2, 2**32 - 1, 0, 1, 2]
    assert sim.next_readout_id == 3
    base = 5 + 7 * np.arange(6)
    assert ((batch.timestamps >= base) & (batch.timestamps < base + 3)).all()
    assert (np.diff(batch.timestamps.astype(np.int64)) > 0).all()
    decoded = decode_readouts(batch.datagrams(), carry="consecutive")
    assert decoded.readouts["readout_id"].tolist() == batch.readout_ids.tolist()


def test_tot_is_quantized_and_follows_the_spectrum():
    for kind, mean in [("gamma", 10.0), ("exponential", 4.0), ("landau", 30.0), ("constant", 12.34)]:
        batch = DaqSimulator(8, start_ns=0, mean_hits=10.0, tot_distribution=kind, tot_mean_us=mean).generate(2000)
        t = batch.truth
        cycles = t["ts_dec2"].astype(np.int64) - t["ts_dec1"]
        np.testing.assert_array_equal(t["tot_us"], cycles / 20.0)
        assert (cycles >= 0).all() and (cycles < 2**17).all()
        assert (t["ts_dec1"] < 2**17).all()
        if kind == "constant":
            assert (t["tot_us"] == round(mean * 20) / 20).all()
        else:
            assert abs(t["tot_us"].mean() - mean) < 0.05 * mean, kind
    # Rollovers happen and decode back (ts_dec2 < ts_dec1 before the rollover).
    batch = DaqSimulator(8, start_ns=0, mean_hits=10.0, tot_mean_us=3000.0).generate(500)
    assert (batch.truth["ts_dec2"] >= 2**17).sum() > 100
    hits, _, _ = _reference_decode([batch])
    _assert_hits_equal(hits, batch.truth)


def test_fields_cover_the_matrix():
    t = DaqSimulator(1, start_ns=0, rows=16, columns=32, mean_hits=20.0).generate(200).truth
    assert set(t["row"].tolist()) == set(range(16))
    assert set(t["column"].tolist()) == set(range(32))
    for name, top in [("ts_neg1", 2), ("ts_neg2", 2), ("ts_tdc1", 32), ("ts_tdc2", 32), ("ts_fine1", 8)]:
        assert set(t[name].tolist()) == set(range(top)), name


def test_hit_rate_sets_the_mean():
    sim = DaqSimulator(0, start_ns=0, hit_rate=3000.0, period_ns=1_000_000)
    assert sim.mean_hits == pytest.approx(3.0)
    batch = sim.generate(3000)
    assert abs(len(batch.truth) / 3000 - 3.0) < 0.15


# -- the API ------------------------------------------------------------------------------


def test_datagrams_readouts_stream_and_truth_agree():
    kwargs = dict(start_ns=START, split_fraction=0.4, readout_size=32)
    a = DaqSimulator(12, **kwargs)
    b = DaqSimulator(12, **kwargs)
    c = DaqSimulator(12, keep_truth=True, **kwargs)
    d = DaqSimulator(12, **kwargs)
    first = a.generate(100)
    assert b.datagrams(100) == first.datagrams()
    streamed = list(itertools.islice(c.stream(batch_size=100), 100))
    assert streamed == first.datagrams()
    assert [r.to_bytes() for r in d.readouts(100)] == first.datagrams()
    assert c.truth.tobytes() == first.truth.tobytes()
    assert c.hits_generated == len(first.truth) and c.readouts_generated == 100
    with pytest.raises(RuntimeError, match="keep_truth=True"):
        a.truth
    assert len(list(DaqSimulator(0, start_ns=0).stream(10, batch_size=3))) == 10
    assert isinstance(first, SimBatch) and len(first) == 100


def test_fast_path_a_million_hits():
    sim = DaqSimulator(0, start_ns=START, mean_hits=2.0, split_fraction=0.2, padding_fraction=0.05)
    t0 = time.perf_counter()
    batch = sim.generate(500_000)
    datagrams = batch.datagrams()
    elapsed = time.perf_counter() - t0
    assert len(batch.truth) > 950_000 and len(datagrams) == 500_000
    assert elapsed < 5.0, f"generating ~1M hits took {elapsed:.2f} s"
    # Spot-check the first 10k readouts (fast with either decoder backend).
    decoded = decode_readouts(datagrams[:10_000])
    want = batch.truth[batch.truth["readout_id"] < 10_000]
    _assert_hits_equal(decoded.hits, want)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"columns": 35}, ValueError, r"columns=35 is out of range; allowed: 1\.\.32 \(the column field of a hit is 5 bits wide\)"),
        ({"rows": 0}, ValueError, r"rows=0 is out of range; allowed: 1\.\.32"),
        ({"rows": 33}, ValueError, r"rows=33 is out of range"),
        ({"rows": 16.0}, TypeError, r"rows=16\.0 must be an integer"),
        ({"chip_id": 31}, ValueError, r"chip_id=31 is out of range; allowed: 0\.\.30 \(chip id 31 would make the start byte ff"),
        ({"mean_hits": -1}, ValueError, r"mean_hits=-1\.0 is out of range"),
        ({"mean_hits": float("nan")}, ValueError, r"mean_hits=nan is out of range"),
        ({"mean_hits": 2.0, "hit_rate": 10.0}, ValueError, r"mean_hits=2\.0 and hit_rate=10\.0 were both given; allowed: at most one"),
        ({"hit_rate": -5}, ValueError, r"hit_rate=-5\.0 is out of range"),
        ({"tot_distribution": "landau2"}, ValueError, r"tot_distribution='landau2' is not supported; allowed: 'gamma', 'exponential', 'landau', 'constant'"),
        ({"tot_mean_us": 0}, ValueError, r"tot_mean_us=0\.0 is out of range"),
        ({"tot_mean_us": 7000}, ValueError, r"tot_mean_us=7000\.0 is out of range"),
        ({"tot_shape": 0}, ValueError, r"tot_shape=0\.0 is out of range; allowed: > 0\.0"),
        ({"split_fraction": 1.5}, ValueError, r"split_fraction=1\.5 is out of range; allowed: \[0\.0, 1\.0\]"),
        ({"padding_fraction": "0.1"}, TypeError, r"padding_fraction='0\.1' must be a number"),
        ({"trailing_idles": 0}, ValueError, r"trailing_idles=0 is out of range; allowed: 1\.\.1024"),
        ({"readout_size": 0}, ValueError, r"readout_size=0 is out of range"),
        ({"start_id": 2**32}, ValueError, r"start_id=4294967296 is out of range; allowed: 0\.\.4294967295"),
        ({"start_ns": -1}, ValueError, r"start_ns=-1 is out of range"),
        ({"period_ns": 0}, ValueError, r"period_ns=0 is out of range; allowed: >= 1"),
        ({"jitter_ns": 10, "period_ns": 10}, ValueError, r"jitter_ns=10 is out of range; allowed: 0\.\.9"),
        ({"keep_truth": 1}, TypeError, r"keep_truth=1 must be a bool"),
        ({"split_fraction": True}, TypeError, r"split_fraction=True must be a number"),
    ],
)
def test_argument_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DaqSimulator(0, **kwargs)


def test_method_argument_validation():
    sim = DaqSimulator(0, start_ns=0)
    with pytest.raises(ValueError, match=r"n=-1 is out of range; allowed: >= 0"):
        sim.generate(-1)
    with pytest.raises(ValueError, match=r"batch_size=0 is out of range"):
        next(sim.stream(5, batch_size=0))
    assert sim.readouts_generated == 0
