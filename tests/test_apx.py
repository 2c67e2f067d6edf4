"""Tests of ``.apx`` reading and writing (``mcast_trio._apx``)."""

from __future__ import annotations

import io
import itertools
import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mcast_trio
from mcast_trio._apx import (
    APX_MAGIC,
    ApxReader,
    ApxWriter,
    TruncatedRecord,
    TruncatedRecordWarning,
    open_apx,
)
from mcast_trio._batch import decode_readouts
from mcast_trio._errors import MalformedReadout
from mcast_trio._format import HIT_DTYPE
from mcast_trio._readout import AstroPix4Readout
from mcast_trio.sim import DaqSimulator

REAL_FILE = "20250723_092534_data.apx"


def _sim_datagrams(n: int, seed: int = 3, **kwargs) -> list[bytes]:
    return DaqSimulator(seed, start_ns=1_700_000_000_000_000_000, **kwargs).datagrams(n)


def _write(path, records, header=None, **kwargs) -> None:
    with open_apx(path, "wb", header, **kwargs) as out:
        out.write_many(records)


def _preamble(header_bytes: bytes) -> bytes:
    return APX_MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes


def _read_all(path, **kwargs):
    """(records, truncated, warnings) of reading ``path`` to the end."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_apx(path, **kwargs) as apx:
            records = list(apx.records())
            truncated = apx.truncated
    return records, truncated, [w for w in caught if issubclass(w.category, TruncatedRecordWarning)]


# -- the real file -------------------------------------------------------------


def test_real_file_reads_775_readouts_and_rewrites_byte_identical(astropix_data, tmp_path):
    src = astropix_data / REAL_FILE
    with open_apx(src) as apx:
        assert apx.header["readout_uid"] == 4000
        assert set(apx.metadata) == {"configuration", "args"}
        assert "readout_uid" not in apx.metadata
        assert apx.metadata["args"]["maxtime"] == 1.0
        readouts = list(apx)
        assert apx.truncated is None
        assert apx.records_read == 775
        header = apx.header
    assert len(readouts) == 775
    assert all(isinstance(r, AstroPix4Readout) for r in readouts)
    # First readout as listed in the reference CSV.
    assert (readouts[0].readout_id, readouts[0].timestamp) == (0, 1753255536707629800)
    assert [r.readout_id for r in readouts] == list(range(775))
    out = tmp_path / "copy.apx"
    _write(out, readouts, header)
    assert out.read_bytes() == src.read_bytes()
    # Raw records re-written give the same bytes too, through every policy.
    for policy in ("record", "batch", "none"):
        with open_apx(src) as apx, open_apx(out, "wb", apx.header, flush=policy) as w:
            for batch in apx.batches(100):
                w.write_many(batch)
        assert out.read_bytes() == src.read_bytes()


def test_real_file_batches_decode_to_the_reference_hit_count(astropix_data):
    with open_apx(astropix_data / REAL_FILE) as apx:
        batches = list(apx.batches(300))
    assert [len(b) for b in batches] == [300, 300, 175]
    decoded = decode_readouts(list(itertools.chain.from_iterable(batches)))
    # 776 hits, as in the reference decoder's CSV (one line per hit).
    csv_lines = (astropix_data / REAL_FILE.replace(".apx", ".csv")).read_text().splitlines()
    assert len(decoded.hits) == len([ln for ln in csv_lines if ln and ln[0].isdigit()]) == 776


# -- writer --------------------------------------------------------------------


def test_writer_layout_default_header():
    buf = io.BytesIO()
    with ApxWriter(buf) as out:
        assert out.write(bytes.fromhex("fedcba") + struct.pack("<IQI", 7, 9, 2) + b"\xbc\xbc") == 21
    text = json.dumps({"readout_uid": 4000}).encode()
    assert buf.getvalue() == _preamble(text) + bytes.fromhex("fedcba") + struct.pack("<IQI", 7, 9, 2) + b"\xbc\xbc"


def test_writer_header_keys_kept_and_uid_first(tmp_path):
    path = tmp_path / "h.apx"
    with open_apx(path, "wb", {"run": 12, "config": {"a": [1, 2.5, None]}}) as out:
        assert out.header == {"readout_uid": 4000, "run": 12, "config": {"a": [1, 2.5, None]}}
        assert list(out.header) == ["readout_uid", "run", "config"]
    with open_apx(path) as apx:
        assert apx.header == {"readout_uid": 4000, "run": 12, "config": {"a": [1, 2.5, None]}}
        assert apx.metadata == {"run": 12, "config": {"a": [1, 2.5, None]}}
        assert list(apx) == []
    # A header giving readout_uid keeps its key order.
    with open_apx(path, "wb", {"run": 1, "readout_uid": 4000}) as out:
        pass
    assert path.read_bytes() == _preamble(b'{"run": 1, "readout_uid": 4000}')


@pytest.mark.parametrize(
    ("header", "exc", "match"),
    [
        ({"readout_uid": 3000}, ValueError, r"readout_uid=3000 .*allowed: 4000"),
        ({"readout_uid": "4000"}, ValueError, r"readout_uid='4000'"),
        ({"readout_uid": True}, ValueError, r"readout_uid=True"),
        ([("readout_uid", 4000)], TypeError, r"header=.* must be a mapping"),
        ({"x": object()}, ValueError, r"header is not JSON-serializable"),
    ],
)
def test_writer_rejects_bad_headers(tmp_path, header, exc, match):
    path = tmp_path / "bad.apx"
    with pytest.raises(exc, match=match):
        open_apx(path, "wb", header)
    assert not path.exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "r"}, r"mode='r' is not supported; allowed: 'rb', 'wb', 'xb'"),
        ({"mode": "ab"}, r"mode='ab'"),
        ({"mode": "wb", "flush": "always"}, r"flush='always' is not a flush policy; allowed: 'record', 'batch', 'none'"),
        ({"mode": "wb", "strict": True}, r"strict=True only applies to mode='rb'"),
        ({"mode": "rb", "header": {}}, r"header=\{\} only applies to the write modes"),
        ({"mode": "rb", "flush": "record"}, r"flush='record' only applies"),
        ({"mode": "rb", "fsync": True}, r"fsync=True only applies"),
    ],
)
def test_open_apx_argument_errors(tmp_path, kwargs, match):
    path = tmp_path / "a.apx"
    _write(path, [])
    with pytest.raises(ValueError, match=match):
        open_apx(path, **kwargs)


def test_writer_argument_types(tmp_path):
    with pytest.raises(TypeError, match=r"fsync='yes' must be a bool"):
        ApxWriter(tmp_path / "a.apx", fsync="yes")
    with pytest.raises(ValueError, match=r"buffer_size=0 is out of range"):
        ApxWriter(tmp_path / "a.apx", buffer_size=0)
    with pytest.raises(TypeError, match=r"must be a path or a binary file object"):
        ApxWriter(12.5)
    with pytest.raises(TypeError, match=r"strict=1 must be a bool"):
        ApxReader(io.BytesIO(_preamble(b'{"readout_uid": 4000}')), strict=1)


def test_xb_mode_refuses_to_overwrite(tmp_path):
    path = tmp_path / "x.apx"
    with open_apx(path, "xb") as out:
        out.write_many(_sim_datagrams(3))
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        open_apx(path, "xb")
    assert path.read_bytes() == before


def test_writer_accepts_readouts_and_bytes(tmp_path):
    path = tmp_path / "mixed.apx"
    datagrams = _sim_datagrams(20)
    readouts = [AstroPix4Readout.from_bytes(d) for d in datagrams]
    with open_apx(path, "wb") as out:
        assert out.write_many(readouts[:10]) == 10
        for d in datagrams[10:15]:
            out.write(bytearray(d))
        out.write_many(memoryview(d) for d in datagrams[15:])
        assert out.records_written == 20
        assert out.bytes_written == path.stat().st_size
    with open_apx(path) as apx:
        assert list(apx.records()) == datagrams
        assert list(apx) == readouts


def test_writer_keeps_record_bytes_unchanged(tmp_path):
    # A serialized record whose data ends with padding is well formed (the
    # length matches); the writer does not re-serialize it.
    record = bytes.fromhex("fedcba") + struct.pack("<IQI", 1, 2, 3) + b"\xbc\xff\xff"
    path = tmp_path / "raw.apx"
    _write(path, [record])
    with open_apx(path) as apx:
        assert list(apx.records()) == [record]


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (b"\xfe\xdc\xba" + b"\0" * 10, r"13-byte datagram is shorter than the 19-byte readout header"),
        (b"\xfe\xdc\xbb" + struct.pack("<IQI", 1, 2, 0), r"bad readout header fe dc bb at offset 0"),
        (b"\xfe\xdc\xba" + struct.pack("<IQI", 1, 2, 5) + b"\xbc", r"length field at offset 15 says 5 data bytes, but 1"),
    ],
)
def test_writer_refuses_malformed_records(tmp_path, record, match):
    path = tmp_path / "m.apx"
    good = _sim_datagrams(2)
    with open_apx(path, "wb") as out:
        out.write(good[0])
        with pytest.raises(MalformedReadout, match="refusing to write a malformed record: " + match):
            out.write(record)
        with pytest.raises(MalformedReadout):
            out.write_many([good[1], record, good[0]])
        assert out.records_written == 2
    with open_apx(path) as apx:
        assert list(apx.records()) == good[:2]


def test_writer_rejects_other_types_and_closed_use(tmp_path):
    out = open_apx(tmp_path / "t.apx", "wb")
    with pytest.raises(TypeError, match=r"must be an AstroPix4Readout or a serialized readout"):
        out.write("fedcba")
    out.close()
    out.close()  # idempotent
    assert out.closed
    with pytest.raises(ValueError, match="closed ApxWriter"):
        out.write(_sim_datagrams(1)[0])
    with pytest.raises(ValueError, match="closed ApxWriter"):
        out.flush()


def test_flush_policies_visibility(tmp_path):
    """What another reader of the file sees before close, per policy."""
    records = _sim_datagrams(30)
    size = lambda p: os.stat(p).st_size  # noqa: E731

    path = tmp_path / "record.apx"
    with open_apx(path, "wb", flush="record") as out:
        for i, record in enumerate(records):
            out.write(record)
            assert size(path) == out.bytes_written  # on disk after every write
        _, truncated, _ = _read_all(path)
        assert truncated is None

    path = tmp_path / "batch.apx"
    with open_apx(path, "wb", flush="batch") as out:
        header_size = size(path)
        assert header_size == out.bytes_written  # the header is flushed at once
        out.write(records[0])
        assert size(path) == header_size  # a single write stays buffered
        out.write_many(records[1:10])
        assert size(path) == out.bytes_written  # flushed at the end of the batch
        out.write_many([])
        assert size(path) == out.bytes_written

    path = tmp_path / "none.apx"
    with open_apx(path, "wb", flush="none") as out:
        header_size = size(path)
        out.write_many(records)
        assert size(path) == header_size  # nothing flushed until the buffer fills
        out.flush()
        assert size(path) == out.bytes_written
    for name in ("record", "batch", "none"):
        got, truncated, _ = _read_all(tmp_path / f"{name}.apx")
        assert truncated is None
        assert got == (records if name != "batch" else records[:10])


@pytest.mark.parametrize("policy", ["record", "batch", "none"])
def test_fsync_policies_write_correct_files(tmp_path, policy):
    path = tmp_path / "f.apx"
    records = _sim_datagrams(50)
    with open_apx(path, "wb", {"fsync": True}, flush=policy, fsync=True) as out:
        out.write_many(records[:25])
        for record in records[25:]:
            out.write(record)
        assert out.fsync is True
    with open_apx(path) as apx:
        assert apx.metadata == {"fsync": True}
        assert list(apx.records()) == records


def test_writer_to_buffered_file_object_flushes_per_record(tmp_path):
    path = tmp_path / "obj.apx"
    records = _sim_datagrams(5)
    with open(path, "wb") as f:  # a buffered file object
        out = ApxWriter(f)
        for record in records:
            out.write(record)
            assert path.stat().st_size == out.bytes_written
        out.close()
        assert not f.closed  # the caller's file stays open
    with open_apx(path) as apx:
        assert list(apx.records()) == records


# -- reader: header errors --------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"not an \.apx file: it starts with b'' at offset 0"),
        (b"%PDF-1.4 hello", r"not an \.apx file: it starts with b'%PDF-1' at offset 0, expected the magic b'%APXDF'"),
        (b"%APXDF\x05\x00", r"ends at offset 8, inside the 4-byte header length at offset 6"),
        (APX_MAGIC + struct.pack("<I", 100) + b'{"readout_uid": 4000}',
         r"header length at offset 6 says 100 bytes, but the file ends after 21 of them \(offset 31\)"),
        (APX_MAGIC + struct.pack("<I", 0xFFFFFFFF) + b"{}", r"says 4294967295 bytes, but the file ends after 2"),
        (_preamble(b'{"readout_uid": 4000, "x": "\xff"}'), r"header at offset 10 is not valid UTF-8 \(byte 38"),
        (_preamble(b'{"readout_uid": 4000,'), r"header at offset 10 is not valid JSON"),
        (_preamble(b"[" * 100_000), r"header at offset 10 is not valid JSON"),
        (_preamble(b"[4000]"), r"header at offset 10 is a JSON list, expected an object"),
        (_preamble(b'{"uid": 4000}'), r"has no readout_uid"),
        (_preamble(b'{"readout_uid": 3000}'), r"readout_uid=3000 in the header at offset 10 is not supported; allowed: 4000"),
        (_preamble(b'{"readout_uid": 4000.0}'), r"readout_uid=4000\.0"),
        (_preamble(b'{"readout_uid": "4000"}'), r"readout_uid='4000'"),
    ],
)
def test_reader_header_errors(tmp_path, content, match):
    path = tmp_path / "bad.apx"
    path.write_bytes(content)
    with pytest.raises(MalformedReadout, match=match):
        open_apx(path)
    with pytest.raises(MalformedReadout, match=match):
        ApxReader(io.BytesIO(content))


# -- reader: records ------------------------------------------------------------


def test_reader_round_trip_file_object_and_reiteration(tmp_path):
    records = _sim_datagrams(40, split_fraction=0.3)
    buf = io.BytesIO()
    with ApxWriter(buf, {"a": 1}, flush="none") as out:
        out.write_many(records)
    raw = buf.getvalue()
    reader = ApxReader(io.BytesIO(raw), chunk_size=7)  # tiny chunks: records span reads
    assert reader.path is None
    assert reader.data_offset == len(_preamble(json.dumps({"readout_uid": 4000, "a": 1}).encode()))
    assert list(reader.records()) == records
    assert list(reader.records()) == records  # starts again at the first record
    offsets = [off for off, _ in reader.records_with_offsets()]
    assert offsets == list(np.cumsum([reader.data_offset] + [len(r) for r in records[:-1]]))
    assert [r.to_bytes() for r in reader] == records
    assert reader.read_all() == [AstroPix4Readout.from_bytes(r) for r in records]
    with pytest.raises(ValueError, match=r"size=0 is out of range"):
        next(reader.batches(0))
    reader.close()
    with pytest.raises(ValueError, match="closed ApxReader"):
        next(iter(reader))


def test_reader_large_record_and_empty_data(tmp_path):
    big = AstroPix4Readout(bytes(range(0xE0, 0xE8)) * 200_000, 5, 6)  # 1.6 MB > one chunk
    empty = AstroPix4Readout(b"\xff" * 10, 6, 7)  # all padding: zero data bytes
    path = tmp_path / "big.apx"
    _write(path, [big, empty, big])
    with open_apx(path) as apx:
        got = list(apx)
    assert got == [big, empty, big]
    assert len(got[1].data()) == 0


def test_sim_file_decodes_to_the_truth_through_batches(tmp_path):
    sim = DaqSimulator(11, start_ns=0, split_fraction=0.4, padding_fraction=0.3)
    batch = sim.generate(3000)
    path = tmp_path / "sim.apx"
    _write(path, batch.datagrams(), {"simulated": True}, flush="batch")
    hits = []
    extra, last = None, -1
    with open_apx(path) as apx:
        for records in apx.batches(512):
            decoded = decode_readouts(records, extra_bytes=extra, last_id=last)
            extra, last = decoded.extra_bytes, decoded.last_id
            hits.append(np.asarray(decoded.hits))
    hits = np.concatenate(hits)
    assert len(hits) == len(batch.truth) > 5000
    for name in HIT_DTYPE.names:
        np.testing.assert_array_equal(hits[name], batch.truth[name], err_msg=name)


def _file_with(tmp_path, records, name="t.apx"):
    path = tmp_path / name
    _write(path, records)
    return path


def test_truncated_final_record_every_cut(tmp_path):
    records = _sim_datagrams(4, mean_hits=3)
    path = _file_with(tmp_path, records)
    full = path.read_bytes()
    last_start = len(full) - len(records[-1])
    for cut in range(last_start, len(full) + 1):
        path.write_bytes(full[:cut])
        got, truncated, caught = _read_all(path)
        assert got == records[:3] + ([records[3]] if cut == len(full) else [])
        if cut in (last_start, len(full)):
            assert truncated is None and caught == []
            continue
        size = cut - last_start
        assert truncated == TruncatedRecord(
            offset=last_start, size=size, expected=len(records[-1]) if size >= 19 else None, index=3
        )
        assert truncated.missing == (len(records[-1]) - size if size >= 19 else None)
        assert len(caught) == 1
        message = str(caught[0].message)
        assert f"record 3 at offset {last_start} is truncated" in message
        assert str(path) in message
        # strict: the complete records come out first, then the error.
        seen = []
        with open_apx(path, strict=True) as apx, pytest.raises(MalformedReadout, match=f"offset {last_start}"):
            for record in apx.records():
                seen.append(record)
        assert seen == records[:3]
        assert apx.truncated.offset == last_start


def test_truncated_within_the_only_record(tmp_path):
    records = _sim_datagrams(1)
    path = _file_with(tmp_path, records)
    full = path.read_bytes()
    path.write_bytes(full[:-1])
    with pytest.warns(TruncatedRecordWarning, match=r"record 0 at offset \d+ is truncated: the file ends after"):
        with open_apx(path) as apx:
            assert list(apx) == []
    assert apx.truncated.expected == len(records[0])
    assert apx.truncated.size == len(records[0]) - 1


def test_bad_record_header_in_the_middle(tmp_path):
    records = _sim_datagrams(6)
    path = _file_with(tmp_path, records)
    full = bytearray(path.read_bytes())
    data_offset = len(full) - sum(map(len, records))
    bad_at = data_offset + sum(len(r) for r in records[:3])
    full[bad_at + 1] ^= 0x01
    path.write_bytes(bytes(full))
    seen = []
    with open_apx(path) as apx:
        with pytest.raises(MalformedReadout, match=rf"bad record header fe dd ba at offset {bad_at} \(record 3\)"):
            for readout in apx:
                seen.append(readout)
    assert [r.to_bytes() for r in seen] == records[:3]


def test_length_field_corruption_is_reported_not_crashing(tmp_path):
    records = _sim_datagrams(6)
    path = _file_with(tmp_path, records)
    full = bytearray(path.read_bytes())
    data_offset = len(full) - sum(map(len, records))
    at = data_offset + sum(len(r) for r in records[:2])
    # Length too small: the record would end in the middle of its data; it is
    # not delivered (nothing confirms where it ends).
    struct.pack_into("<I", full, at + 15, 1)
    path.write_bytes(bytes(full))
    seen = []
    with open_apx(path) as apx, pytest.raises(MalformedReadout, match=rf"record 2 at offset {at} is damaged"):
        for record in apx.records():
            seen.append(record)
    assert seen == records[:2]
    # Length huge in the middle: the record runs past the end of the file, but
    # complete records follow, so it is damage, not a truncated last record.
    struct.pack_into("<I", full, at + 15, 0xFFFFFFF0)
    path.write_bytes(bytes(full))
    seen = []
    with open_apx(path) as apx, pytest.raises(MalformedReadout, match=r"past the end of the file, but a record"):
        for record in apx.records():
            seen.append(record)
    assert seen == records[:2]
    assert apx.truncated is None
    # Length huge in the last record: that is a truncated record.
    last = len(full) - len(records[-1])
    full = bytearray(path.read_bytes()[:data_offset]) + b"".join(records)
    struct.pack_into("<I", full, last + 15, 0xFFFFFFF0)
    path.write_bytes(bytes(full))
    got, truncated, caught = _read_all(path)
    assert got == records[:5]
    assert truncated.offset == last and truncated.expected == 19 + 0xFFFFFFF0
    assert len(caught) == 1


def test_garbage_tail_that_is_not_a_record_prefix(tmp_path):
    records = _sim_datagrams(2)
    path = _file_with(tmp_path, records)
    last = path.stat().st_size - len(records[-1])
    path.write_bytes(path.read_bytes() + b"\x00\x01")
    # The last record's end is not confirmed (its length field could be the
    # damaged part): it is not delivered.
    seen = []
    with open_apx(path) as apx, pytest.raises(
        MalformedReadout, match=rf"record 1 at offset {last} is damaged or followed by garbage: .* are 00 01, not"
    ):
        for record in apx.records():
            seen.append(record)
    assert seen == records[:1]


# -- reader: any bytes ------------------------------------------------------------

_HEADER_BYTES = _preamble(json.dumps({"readout_uid": 4000}).encode())
_SIM_BODY = b"".join(_sim_datagrams(6, seed=5, split_fraction=0.5))


def _check_any_bytes(content: bytes) -> None:
    """Reading ``content`` raises only MalformedReadout; when it succeeds, the
    records (and the truncated tail) are exactly the bytes after the header."""
    stream = io.BytesIO(content)
    try:
        reader = ApxReader(stream, chunk_size=16)
    except MalformedReadout:
        return
    records = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for readout in reader:
                records.append(readout.to_bytes())
        except MalformedReadout:
            return
        # Read again, raw: the records and the truncated tail are the body.
        raw = list(ApxReader(io.BytesIO(content)).records())
    body = content[reader.data_offset:]
    truncated = reader.truncated
    tail = b"" if truncated is None else body[truncated.offset - reader.data_offset:]
    assert all(issubclass(w.category, TruncatedRecordWarning) for w in caught)
    assert len(caught) == 2 * (truncated is not None)
    assert b"".join(raw) + tail == body
    assert len(raw) == len(records)


_settings = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(st.binary(max_size=200))
def test_any_bytes_only_malformed_readout(content):
    _check_any_bytes(content)
    _check_any_bytes(APX_MAGIC + content)
    _check_any_bytes(_HEADER_BYTES + content)


@_settings
@given(
    st.lists(
        st.tuples(st.integers(0, len(_HEADER_BYTES) + len(_SIM_BODY) - 1), st.integers(0, 255)),
        max_size=4,
    ),
    st.integers(0, len(_HEADER_BYTES) + len(_SIM_BODY)),
    st.binary(max_size=30),
)
def test_mutated_files_only_malformed_readout(flips, cut, junk):
    content = bytearray(_HEADER_BYTES + _SIM_BODY)
    for at, value in flips:
        content[at] = value
    _check_any_bytes(bytes(content))
    _check_any_bytes(bytes(content[:cut]))
    _check_any_bytes(bytes(content[:cut]) + junk)


@_settings
@given(st.lists(st.binary(max_size=40), max_size=8), st.binary(max_size=40))
def test_valid_records_any_data_then_any_tail(datas, tail):
    records = [AstroPix4Readout(d, i, i * 3).to_bytes() for i, d in enumerate(datas)]
    content = _HEADER_BYTES + b"".join(records) + tail
    reader = ApxReader(io.BytesIO(content))
    got = []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            for record in reader.records():
                got.append(record)
        except MalformedReadout as exc:
            # The tail is garbage; at most the last record, whose end it
            # follows, is not confirmed.
            assert "bad record header" in str(exc) or "followed by garbage" in str(exc)
            assert len(got) >= len(records) - 1
    assert got[: len(records)] == records[: len(got)]
    if not tail:
        assert got == records


# -- a writer killed mid-stream ----------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    from mcast_trio._apx import open_apx
    from mcast_trio.sim import DaqSimulator

    path, policy = sys.argv[1], sys.argv[2]
    sim = DaqSimulator(7, start_ns=0, mean_hits=4.0, split_fraction=0.3, padding_fraction=0.2)
    with open_apx(path, "wb", {"child": True}, flush=policy) as out:
        print("started", flush=True)
        for datagram in sim.stream(batch_size=256):
            out.write(datagram)
    """
)


@pytest.mark.parametrize("policy", ["record", "none"])
def test_sigkill_mid_stream_leaves_only_complete_records(tmp_path, policy):
    path = tmp_path / "killed.apx"
    package_root = str(pathlib.Path(mcast_trio.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), policy], stdout=subprocess.PIPE, env=env,
        cwd=path.parent,  # not the repository: import the installed package
    )
    try:
        assert child.stdout.readline() == b"started\n"
        deadline = time.monotonic() + 30
        # Let it write a good amount (several buffer flushes for "none").
        while (not path.exists() or path.stat().st_size < 600_000) and time.monotonic() < deadline:
            assert child.poll() is None, "the writer exited on its own"
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    size = path.stat().st_size
    assert size >= 600_000
    records, truncated, caught = _read_all(path)
    assert len(records) > 1000
    # Every complete record is intact: exactly what the simulator produced.
    sim = DaqSimulator(7, start_ns=0, mean_hits=4.0, split_fraction=0.3, padding_fraction=0.2)
    expected = list(itertools.islice(sim.stream(batch_size=256), len(records) + 1))
    assert records == expected[: len(records)]
    with open_apx(path) as apx:
        end = apx.data_offset + sum(map(len, records))
        assert apx.metadata == {"child": True}
    if truncated is None:
        assert end == size and caught == []
    else:
        # At most one partial record, at the end: a prefix of the next one.
        assert (truncated.offset, truncated.size, truncated.index) == (end, size - end, len(records))
        assert 0 < truncated.size < len(expected[-1])
        assert path.read_bytes()[end:] == expected[-1][: truncated.size]
        assert len(caught) == 1


_CHILD_BIG = textwrap.dedent(
    """
    import sys
    from mcast_trio._apx import open_apx
    from mcast_trio._readout import AstroPix4Readout

    path = sys.argv[1]
    small = [AstroPix4Readout(bytes([0xbc, 0xe0 + i]) * 8, i, i) for i in range(3)]
    big = AstroPix4Readout(bytes(range(0xe0, 0xe8)) * (4 << 20), 3, 3)  # 32 MiB of data
    with open_apx(path, "wb", flush="record") as out:
        out.write_many(small)
        print("started", flush=True)
        while True:
            out.write(big)  # one os.write of 32 MiB each
    """
)


def test_sigkill_during_a_large_write_is_reported_as_truncated(tmp_path):
    """A kill that lands inside the write() of a big record leaves a prefix of
    it; the reader yields the records before it and reports the rest."""
    package_root = str(pathlib.Path(mcast_trio.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    big = AstroPix4Readout(bytes(range(0xE0, 0xE8)) * (4 << 20), 3, 3).to_bytes()
    small = [AstroPix4Readout(bytes([0xBC, 0xE0 + i]) * 8, i, i).to_bytes() for i in range(3)]
    for attempt in range(3):
        path = tmp_path / f"big{attempt}.apx"
        child = subprocess.Popen([sys.executable, "-c", _CHILD_BIG, str(path)], stdout=subprocess.PIPE, env=env,
                                 cwd=path.parent)
        try:
            assert child.stdout.readline() == b"started\n"
            deadline = time.monotonic() + 30
            start = path.stat().st_size
            while path.stat().st_size < start + (1 << 20) and time.monotonic() < deadline:
                assert child.poll() is None
                time.sleep(0.0005)
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=10) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
        records, truncated, caught = _read_all(path)
        size = path.stat().st_size
        assert records[:3] == small
        assert all(r == big for r in records[3:])
        with open_apx(path) as apx:
            end = apx.data_offset + sum(map(len, records))
        if truncated is None:  # the kill fell between two writes: rare, retry
            assert end == size and caught == []
            continue
        assert (truncated.offset, truncated.size, truncated.expected) == (end, size - end, len(big))
        assert path.read_bytes()[end:] == big[: truncated.size]
        assert len(caught) == 1 and issubclass(caught[0].category, TruncatedRecordWarning)
        with open_apx(path, strict=True) as apx, pytest.raises(MalformedReadout, match=f"at offset {end} is truncated"):
            list(apx.records())
        return
    pytest.fail("three kills in a row fell between two 32 MiB writes")


def test_write_records_writes_back_to_back_readouts_checked_together(tmp_path):
    from mcast_trio import MalformedReadout, open_apx
    from mcast_trio.sim import DaqSimulator

    records = [r.to_bytes() for r in DaqSimulator(4, start_ns=0).readouts(50)]
    data = b"".join(records)
    lengths = [len(r) for r in records]
    path = tmp_path / "bulk.apx"
    with ApxWriter(path, flush="batch") as writer:
        assert writer.write_records(data, lengths) == 50
        assert writer.records_written == 50
        # one malformed record: nothing of that call is written, the message says which
        bad = records[:3] + [records[3][:-1] + b"\x00\x00"] + records[4:6]
        with pytest.raises(MalformedReadout, match=r"^readout 3 at offset \d+: length field"):
            writer.write_records(b"".join(bad), [len(r) for r in bad])
        with pytest.raises(ValueError, match="lengths add up to"):
            writer.write_records(data, lengths[:-1])
    with open_apx(path) as reader:
        assert [r.to_bytes() for r in reader] == records
