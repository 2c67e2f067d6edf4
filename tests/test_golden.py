"""Golden real data: the shared AstroPix 4 run decodes to exactly the hits the
reference decoder of astropix-analysis found in it (every column)."""

from __future__ import annotations

import csv
import json
import struct

import numpy as np
import pytest

from mcast_trio import HIT_DTYPE, AstroPix4Readout, decode_readouts
from mcast_trio import _reference

APX = "20250723_092534_data.apx"
CSV = "20250723_092534_data.csv"


def _records(raw: bytes) -> list[bytes]:
    assert raw[:6] == b"%APXDF"
    (hlen,) = struct.unpack_from("<I", raw, 6)
    pos = 10 + hlen
    out = []
    while pos < len(raw):
        (n,) = struct.unpack_from("<I", raw, pos + 15)
        out.append(raw[pos:pos + 19 + n])
        pos += 19 + n
    assert pos == len(raw)
    return out


@pytest.fixture(scope="module")
def golden(astropix_data):
    raw = (astropix_data / APX).read_bytes()
    with open(astropix_data / CSV, newline="") as f:
        lines = [line for line in f if not line.startswith("#")]
    table = list(csv.DictReader(lines))
    expected = np.zeros(len(table), dtype=HIT_DTYPE)
    for i, row in enumerate(table):
        for name in HIT_DTYPE.names:
            expected[name][i] = float(row[name]) if name == "tot_us" else int(row[name])
    header = json.loads(raw[10:10 + struct.unpack_from("<I", raw, 6)[0]])
    return _records(raw), expected, header


def test_shape_of_the_golden_data(golden):
    records, expected, header = golden
    assert header["readout_uid"] == 4000
    assert len(records) == 775
    assert len(expected) == 776


def test_batch_decoder_reproduces_reference_hits(golden):
    records, expected, _ = golden
    batch = decode_readouts(records)
    assert batch.n_malformed == 0
    assert len(batch.hits) == len(expected)
    for name in HIT_DTYPE.names:
        np.testing.assert_array_equal(batch.hits[name], expected[name], err_msg=name)
    assert batch.readouts.n_hits.sum() == 776


def test_batch_from_one_buffer_with_lengths(golden):
    records, expected, _ = golden
    buf = b"".join(records)
    batch = decode_readouts(buf, [len(r) for r in records])
    assert (batch.hits.view(np.ndarray) == expected).all()


def test_readout_objects_carrying_extra_bytes(golden):
    records, expected, _ = golden
    hits = []
    extra = None
    for record in records:
        readout = AstroPix4Readout.from_bytes(record)
        hits.append(readout.decode(extra))
        extra = readout.extra_bytes()
    got = np.concatenate(hits)
    assert (got == expected).all()


def test_reference_decoder_agrees(golden):
    records, expected, _ = golden
    hits, readouts, _, _ = _reference.decode_batch(records)
    assert (hits == expected).all()


def test_round_trip_of_every_record(golden):
    records, _, _ = golden
    for record in records:
        assert AstroPix4Readout.from_bytes(record).to_bytes() == record
