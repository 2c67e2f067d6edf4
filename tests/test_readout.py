"""The readout class: construction, validation, serialization, accessors."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest

from mcast_trio import HIT_DTYPE, AstroPix4Readout, DecodingStatus, MalformedReadout

A = bytes.fromhex("e0 11 22 33 44 55 66 77")
B = bytes.fromhex("e1 12 23 34 45 56 67 78")


def test_serialization_is_the_spec_layout():
    readout = AstroPix4Readout(b"\xbc" + A + b"\xff\xff", 0x01020304, 0x1122334455667788)
    raw = readout.to_bytes()
    assert raw == (b"\xfe\xdc\xba" + bytes.fromhex("04030201") + bytes.fromhex("8877665544332211")
                   + struct.pack("<I", 9) + b"\xbc" + A)
    assert len(readout) == 9
    assert readout.data() == b"\xbc" + A


def test_timestamp_is_latched_when_not_given():
    before = time.time_ns()
    readout = AstroPix4Readout(A, 1)
    assert before <= readout.timestamp <= time.time_ns()


def test_str_matches_astropix_analysis():
    assert str(AstroPix4Readout(A, 3, 42)) == "AstroPix4Readout(8 bytes, readout_id = 3, timestamp = 42 ns)"


@pytest.mark.parametrize("kwargs, kind, text", [
    (dict(data=A, readout_id=-1), ValueError, "readout_id=-1 is out of range; allowed: 0..4294967295"),
    (dict(data=A, readout_id=2**32), ValueError, "readout_id=4294967296 is out of range"),
    (dict(data=A, readout_id="1"), TypeError, "readout_id='1' must be an integer"),
    (dict(data=A, readout_id=True), TypeError, "readout_id=True must be an integer"),
    (dict(data=A, readout_id=1, timestamp=-5), ValueError, "timestamp=-5 is out of range"),
    (dict(data=A, readout_id=1, timestamp=2**64), ValueError, "timestamp=18446744073709551616 is out of range"),
    (dict(data="e0", readout_id=1), TypeError, "data='e0' must be bytes-like"),
    (dict(data=12, readout_id=1), TypeError, "data=12 must be bytes-like"),
])
def test_invalid_arguments_name_the_argument(kwargs, kind, text):
    with pytest.raises(kind, match=text.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        AstroPix4Readout(**kwargs)


@pytest.mark.parametrize("datagram, text", [
    (b"", "0-byte datagram is shorter than the 19-byte readout header"),
    (b"\xfe\xdc\xba" + b"\0" * 10, "13-byte datagram is shorter than the 19-byte readout header"),
    (b"\xfe\xdc\xbb" + b"\0" * 16, "bad readout header fe dc bb at offset 0, expected fe dc ba"),
    (b"\xfe\xdc\xba" + b"\0" * 12 + struct.pack("<I", 5) + b"\xbc" * 4,
     "length field at offset 15 says 5 data bytes, but 4 bytes follow the 19-byte header"),
    (b"\xfe\xdc\xba" + b"\0" * 12 + struct.pack("<I", 1) + b"\xbc" * 4,
     "length field at offset 15 says 1 data bytes, but 4 bytes follow"),
])
def test_malformed_datagrams(datagram, text):
    with pytest.raises(MalformedReadout, match=text) as info:
        AstroPix4Readout.from_bytes(datagram)
    assert isinstance(info.value, ValueError)


def test_hits_are_a_record_array_with_attribute_access():
    readout = AstroPix4Readout(A + b"\xbc" + B, 9, 1000)
    hits = readout.decode()
    assert hits.dtype == HIT_DTYPE and isinstance(hits, np.recarray)
    assert list(hits.decoding_order) == [0, 1]
    assert list(hits["readout_id"]) == [9, 9]
    assert [hit.column for hit in hits] == list(hits.column)
    assert hits.tot_us.dtype == np.float64
    assert readout.hits() is hits and readout.decoded()


def test_decode_is_cached_per_extra_bytes():
    readout = AstroPix4Readout(bytes.fromhex("56 67 78") + A, 2, 0)
    alone = readout.decode()
    assert len(alone) == 1 and readout.decoding_status() == DecodingStatus.ORPHAN_BYTES_NOT_USED
    assert readout.decode() is alone
    joined = readout.decode(B[:5])
    assert len(joined) == 2 and readout.decoding_status() == DecodingStatus.ORPHAN_BYTES_MATCHED
    assert DecodingStatus.ORPHAN_BYTES_MATCHED in readout.decoding_status()


def test_decoding_status_flags_have_reference_bit_positions():
    assert [f.value for f in DecodingStatus] == [1, 2, 4, 8, 16, 32]
    assert [f.name for f in DecodingStatus] == [
        "ORPHAN_BYTES_MATCHED", "ORPHAN_BYTES_DROPPED", "ORPHAN_BYTES_NOT_USED",
        "VALID_EXTRA_BYTES", "INVALID_EXTRA_BYTES", "INCOMPLETE_HIT_DROPPED"]
    assert not DecodingStatus(0)


def test_field_decoding_by_hand():
    # Build the bit pattern of the spec directly: chip 3, payload 7, row 5,
    # column 17, ts_coarse1 = gray(…) etc., then reverse every byte.
    bits = "".join([
        f"{3:05b}", f"{7:03b}", f"{5:05b}", f"{17:05b}", "1", f"{0x1234:014b}", f"{5:03b}", f"{9:05b}",
        "0", f"{0x0042:014b}", f"{2:03b}", f"{31:05b}",
    ])
    assert len(bits) == 64
    word = bytes(int(bits[i:i + 8][::-1], 2) for i in range(0, 64, 8))
    hit = AstroPix4Readout(word, 1, 2).decode()[0]
    assert (hit.chip_id, hit.payload, hit.row, hit.column, hit.ts_neg1) == (3, 7, 5, 17, 1)
    assert (hit.ts_coarse1, hit.ts_fine1, hit.ts_tdc1) == (0x1234, 5, 9)
    assert (hit.ts_neg2, hit.ts_coarse2, hit.ts_fine2, hit.ts_tdc2) == (0, 0x42, 2, 31)

    def gray(g):
        b = 0
        while g:
            b ^= g
            g >>= 1
        return b
    d1, d2 = gray((0x1234 << 3) + 5), gray((0x42 << 3) + 2)
    assert d2 < d1  # exercises the rollover
    assert hit.ts_dec1 == d1 and hit.ts_dec2 == d2 + 2**17
    assert hit.tot_us == (d2 + 2**17 - d1) / 20.0
