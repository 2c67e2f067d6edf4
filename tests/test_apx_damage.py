"""Damaged ``.apx`` files: every reading style delivers every complete record
before the damage; ``recover=True`` resyncs on the next plausible record
header and reports what it skipped (issue 7, ".apx damage hides good
records")."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import tracemalloc
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mcast_trio
from mcast_trio import (
    ApxStatistics,
    DamagedRegion,
    MalformedReadout,
    TruncatedRecord,
    TruncatedRecordWarning,
    open_apx,
)
from mcast_trio._apx import APX_MAGIC, ApxReader
from mcast_trio._readout import AstroPix4Readout
from mcast_trio._reference import parse_fixed
from mcast_trio.sim import DaqSimulator

REAL_FILE = "20250723_092534_data.apx"
STYLES = ("iterate", "records", "records_with_offsets", "batches_1", "batches_7", "batches_default", "read_all")


def _sim_records(n: int, seed: int = 3, **kwargs) -> list[bytes]:
    return DaqSimulator(seed, start_ns=1_700_000_000_000_000_000, **kwargs).datagrams(n)


def _apx_bytes(records, header=None) -> bytes:
    buf = io.BytesIO()
    with open_apx(buf, "wb", header) as out:
        out.write_many(records)
    return buf.getvalue()


def _offsets(data_offset: int, records) -> list[int]:
    out, at = [], data_offset
    for record in records:
        out.append(at)
        at += len(record)
    return out


def _read(reader: ApxReader, style: str):
    """(records as bytes, the MalformedReadout raised or None) reading in ``style``."""
    got: list[bytes] = []
    try:
        if style == "iterate":
            for readout in reader:
                got.append(readout.to_bytes())
        elif style == "records":
            for record in reader.records():
                got.append(record)
        elif style == "records_with_offsets":
            for offset, record in reader.records_with_offsets():
                assert offset == reader.data_offset + sum(map(len, got))
                got.append(record)
        elif style.startswith("batches"):
            size = {"batches_1": 1, "batches_7": 7}.get(style)
            batches = reader.batches() if size is None else reader.batches(size)
            for batch in batches:
                assert 0 < len(batch) <= (size or 4096)
                got.extend(batch)
        elif style == "read_all":
            got = [r.to_bytes() for r in reader.read_all()]
        else:  # pragma: no cover
            raise AssertionError(style)
    except MalformedReadout as exc:
        if style == "read_all":
            got = [r.to_bytes() for r in exc.readouts]
        return got, exc
    return got, None


def _damaged_length(content: bytes, offset: int, byte: int, xor: int) -> bytes:
    damaged = bytearray(content)
    damaged[offset + 15 + byte] ^= xor
    return bytes(damaged)


def _tiles(reader: ApxReader, yielded: list[tuple[int, bytes]], size: int) -> None:
    """The records, damaged regions and truncated tail cover the file exactly."""
    stats = reader.statistics()
    spans = [(off, len(rec)) for off, rec in yielded]
    spans += [(region.offset, region.size) for region in stats.damaged]
    if stats.truncated is not None:
        spans.append((stats.truncated.offset, stats.truncated.size))
    spans.sort()
    at = reader.data_offset
    for offset, length in spans:
        assert offset == at, (offset, at, spans)
        at += length
    assert at == size
    assert stats.finished
    assert stats.records == len(yielded)
    assert stats.record_bytes == sum(len(rec) for _, rec in yielded)
    assert stats.bytes_skipped == sum(region.size for region in stats.damaged)
    assert reader.data_offset + stats.record_bytes + stats.bytes_skipped + (
        stats.truncated.size if stats.truncated else 0
    ) == size


# -- one flipped byte in a length field ------------------------------------------


@pytest.mark.parametrize("byte", [0, 1, 2, 3])
@pytest.mark.parametrize("xor", [0x01, 0x04, 0x20, 0x80])
def test_length_damage_every_style_yields_the_records_before_it(byte, xor):
    records = _sim_records(60, split_fraction=0.3)
    clean = _apx_bytes(records, {"run": 1})
    data_offset = len(clean) - sum(map(len, records))
    offsets = _offsets(data_offset, records)
    k = 23
    content = _damaged_length(clean, offsets[k], byte, xor)
    for style in STYLES:
        with ApxReader(io.BytesIO(content), chunk_size=64) as reader:
            got, exc = _read(reader, style)
            assert got == records[:k], style
            assert exc is not None, style
            assert f"record {k} at offset {offsets[k]} is damaged" in str(exc)
            stats = reader.statistics()
            assert stats.damaged == (DamagedRegion(offsets[k], None, k, str(exc)),)
            assert (stats.records, stats.bytes_skipped, stats.finished) == (k, 0, False)
            assert reader.truncated is None
    # recover=True: every record but the damaged one, the skipped bytes exact.
    with ApxReader(io.BytesIO(content), recover=True, chunk_size=64) as reader:
        yielded = list(reader.records_with_offsets())
        assert [rec for _, rec in yielded] == records[:k] + records[k + 1:]
        assert [off for off, _ in yielded] == offsets[:k] + offsets[k + 1:]
        stats = reader.statistics()
        assert stats.bytes_skipped == len(records[k])
        assert [(r.offset, r.size, r.index) for r in stats.damaged] == [(offsets[k], len(records[k]), k)]
        assert stats.damaged[0].end == offsets[k + 1]
        _tiles(reader, yielded, len(content))


def test_real_file_length_damage_in_record_165(astropix_data, tmp_path):
    """The case of the issue: one flipped byte in the length field of record
    165 of the real file; before, batches() and read_all() yielded nothing."""
    src = astropix_data / REAL_FILE
    clean_bytes = src.read_bytes()
    with open_apx(src) as apx:
        clean = list(apx.records_with_offsets())
    assert len(clean) == 775
    records = [rec for _, rec in clean]
    k = 165
    for byte, xor in [(0, 0x04), (0, 0x10), (1, 0x01), (2, 0x04), (3, 0x80)]:
        path = tmp_path / f"damaged-{byte}-{xor}.apx"
        path.write_bytes(_damaged_length(clean_bytes, clean[k][0], byte, xor))
        for style in STYLES:
            with open_apx(path) as apx:
                got, exc = _read(apx, style)
            assert got == records[:k], (byte, xor, style)
            assert exc is not None and f"offset {clean[k][0]}" in str(exc)
        with open_apx(path, recover=True) as apx:
            readouts = apx.read_all()
            stats = apx.statistics()
            yielded = list(apx.records_with_offsets())
        assert [r.to_bytes() for r in readouts] == records[:k] + records[k + 1:]
        assert [r.readout_id for r in readouts] == [i for i in range(775) if i != k]
        assert stats.records == 774 and stats.bytes_skipped == len(records[k]) == 35
        assert stats.damaged[0].offset == clean[k][0] and stats.damaged[0].index == k
        with open_apx(path, recover=True) as apx:
            list(apx.records())
            _tiles(apx, yielded, len(clean_bytes))


def test_real_file_clean_read_reports_nothing(astropix_data):
    with open_apx(astropix_data / REAL_FILE, recover=True) as apx:
        assert apx.statistics() == ApxStatistics()
        iterator = iter(apx)
        next(iterator)
        assert apx.statistics().records == 1 and not apx.statistics().finished
        rest = list(iterator)
        stats = apx.statistics()
    assert len(rest) == 774
    assert stats == ApxStatistics(records=775, record_bytes=stats.record_bytes, finished=True)
    assert apx.data_offset + stats.record_bytes == (astropix_data / REAL_FILE).stat().st_size


def test_several_damaged_records_are_skipped_exactly(tmp_path):
    records = _sim_records(80, seed=9, split_fraction=0.2)
    clean = _apx_bytes(records)
    data_offset = len(clean) - sum(map(len, records))
    offsets = _offsets(data_offset, records)
    content = bytearray(clean)
    content[offsets[5] + 16] ^= 0x01  # length grows by 256
    content[offsets[6]] = 0x00  # the next record's header too: one region
    content[offsets[30] + 1] ^= 0x01  # a header
    content[offsets[50] + 15] ^= 0x02  # a length
    content[offsets[51] + 15] ^= 0x01  # and the next record's length
    path = tmp_path / "several.apx"
    path.write_bytes(bytes(content))
    with open_apx(path, recover=True) as apx:
        yielded = list(apx.records_with_offsets())
        stats = apx.statistics()
        _tiles(apx, yielded, len(content))
    lost = {5, 6, 30, 50, 51}
    assert [rec for _, rec in yielded] == [r for i, r in enumerate(records) if i not in lost]
    assert [(r.offset, r.size, r.index) for r in stats.damaged] == [
        (offsets[5], len(records[5]) + len(records[6]), 5),
        (offsets[30], len(records[30]), 28),
        (offsets[50], len(records[50]) + len(records[51]), 47),
    ]
    assert stats.bytes_skipped == sum(len(records[i]) for i in lost)
    assert "bad record header fe dd ba" in stats.damaged[1].reason
    # Without recover, the same file stops at the first damage, in every style.
    for style in STYLES:
        with open_apx(path) as apx:
            got, exc = _read(apx, style)
        assert got == records[:5] and f"offset {offsets[5]}" in str(exc)


def test_chance_record_header_inside_data_does_not_resync(tmp_path):
    """``fe dc ba`` inside a damaged record's data, with a length that fits
    in the file, is not taken for a record: what follows it is not a record
    header."""
    fake = b"\xfe\xdc\xba" + struct.pack("<IQI", 7, 7, 3) + b"\xbc\xbc\xbc" + b"\xe0\x01\x02\x03\x04\x05\x06\x07"
    records = _sim_records(10, seed=4)
    records[4] = AstroPix4Readout(b"\xbc\xbe" + fake + b"\xbc" * 8, 4, 44).to_bytes()
    clean = _apx_bytes(records)
    offsets = _offsets(len(clean) - sum(map(len, records)), records)
    content = bytearray(clean)
    content[offsets[4]] ^= 0x10  # the header of the record holding the fake one
    with ApxReader(io.BytesIO(bytes(content)), recover=True) as reader:
        got = list(reader.records())
        stats = reader.statistics()
    assert got == records[:4] + records[5:]
    assert [(r.offset, r.size) for r in stats.damaged] == [(offsets[4], len(records[4]))]
    # Control: undamaged, the fake header stays inside its record.
    with ApxReader(io.BytesIO(clean)) as reader:
        assert list(reader.records()) == records


# -- damage at the start and at the end ------------------------------------------


@pytest.mark.parametrize(
    ("where", "match"),
    [
        (0, r"not an \.apx file: it starts with b'\\x00APXDF' at offset 0"),
        (len(APX_MAGIC) + 3, r"header length at offset 6 says \d+ bytes, but the file ends"),
        (len(APX_MAGIC) + 4, r"header at offset 10 is not valid"),  # first JSON byte
        (len(APX_MAGIC) + 4 + 3, r"header at offset 10 "),  # inside "readout_uid"
    ],
)
@pytest.mark.parametrize("recover", [False, True])
def test_damage_in_the_file_header_raises_on_opening(tmp_path, where, match, recover):
    from mcast_trio.testing import open_fd_count

    records = _sim_records(5)
    content = bytearray(_apx_bytes(records))
    content[where] = 0x00 if where != len(APX_MAGIC) + 3 else 0x7F
    path = tmp_path / "header.apx"
    path.write_bytes(bytes(content))
    before = open_fd_count()
    with pytest.raises(MalformedReadout, match=match):
        open_apx(path, recover=recover)
    assert open_fd_count() == before  # the file was closed


def test_damage_in_the_first_record(tmp_path):
    records = _sim_records(8)
    clean = _apx_bytes(records)
    data_offset = len(clean) - sum(map(len, records))
    content = bytearray(clean)
    content[data_offset] = 0xEE
    for style in STYLES:
        with ApxReader(io.BytesIO(bytes(content))) as reader:
            got, exc = _read(reader, style)
        assert got == [] and f"bad record header ee dc ba at offset {data_offset} (record 0)" in str(exc)
    with ApxReader(io.BytesIO(bytes(content)), recover=True) as reader:
        assert list(reader.records()) == records[1:]
        assert reader.statistics().damaged == (
            DamagedRegion(data_offset, len(records[0]), 0, f"bad record header ee dc ba at offset {data_offset} "
                          "(record 0), expected fe dc ba"),
        )


@pytest.mark.parametrize(
    ("field", "change"),
    [("length", -30), ("length", -8), ("length", -1), ("header", 0)],
)
def test_damage_in_the_last_record(field, change):
    records = [AstroPix4Readout(b"\xbc" + bytes(range(0xE0, 0xE8)) * 5, i, i).to_bytes() for i in range(6)]
    clean = _apx_bytes(records)
    offsets = _offsets(len(clean) - sum(map(len, records)), records)
    last = offsets[-1]
    content = bytearray(clean)
    if field == "length":
        struct.pack_into("<I", content, last + 15, len(records[-1]) - 19 + change)
    else:
        content[last + 2] = 0xBB
    content = bytes(content)
    for style in STYLES:
        with ApxReader(io.BytesIO(content)) as reader:
            got, exc = _read(reader, style)
        assert got == records[:5], style
        assert f"offset {last}" in str(exc)
    with ApxReader(io.BytesIO(content), recover=True) as reader:
        yielded = list(reader.records_with_offsets())
        assert [rec for _, rec in yielded] == records[:5]
        assert reader.statistics().bytes_skipped == len(records[-1])
        _tiles(reader, yielded, len(content))


def test_length_past_the_end_in_the_last_record_is_a_truncation():
    records = _sim_records(6)
    clean = _apx_bytes(records)
    last = len(clean) - len(records[-1])
    content = bytearray(clean)
    content[last + 17] ^= 0x01  # the last record now announces 64 KiB more
    expected = len(records[-1]) + 0x10000
    for recover in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with ApxReader(io.BytesIO(bytes(content)), recover=recover) as reader:
                assert list(reader.records()) == records[:5]
                stats = reader.statistics()
        assert stats.truncated == TruncatedRecord(last, len(records[-1]), expected, 5)
        assert stats.damaged == () and stats.finished
        assert [w.category for w in caught] == [TruncatedRecordWarning]
    # strict raises after the complete records, in every style.
    for style in STYLES:
        with ApxReader(io.BytesIO(bytes(content)), strict=True) as reader:
            got, exc = _read(reader, style)
        assert got == records[:5] and f"record 5 at offset {last} is truncated" in str(exc)


def test_garbage_after_the_last_record_with_recover():
    records = _sim_records(4)
    clean = _apx_bytes(records)
    for junk in (b"\x00", b"\x00" * 18, b"\x00" * 20, b"\x00" * 500):
        content = clean + junk
        with ApxReader(io.BytesIO(content), recover=True) as reader:
            yielded = list(reader.records_with_offsets())
            _tiles(reader, yielded, len(content))
            # The last record's end is not confirmed: it goes with the garbage.
            assert [rec for _, rec in yielded] == records[:3]
            assert reader.statistics().bytes_skipped == len(records[-1]) + len(junk)
    # Garbage that starts with a record header, or that reads as a record
    # with a damaged header (here: 19 bytes, an empty record ending exactly at
    # the end of the file), confirms the end of the last record; only the
    # garbage is skipped.
    for junk in (b"\xfe\xdc\xba" + b"\x00" * 40, b"\x00" * 19):
        with ApxReader(io.BytesIO(clean + junk), recover=True) as reader:
            yielded = list(reader.records_with_offsets())
            _tiles(reader, yielded, len(clean + junk))
            assert [rec for _, rec in yielded] == records
            assert reader.statistics().bytes_skipped == len(junk)


# -- streaming ---------------------------------------------------------------------


def test_recover_is_the_same_through_a_pipe_and_any_chunk_size(tmp_path):
    """A non-seekable file (a real pipe) and every chunk size give the same
    records and the same report."""
    records = _sim_records(300, seed=12, split_fraction=0.3)
    clean = _apx_bytes(records)
    offsets = _offsets(len(clean) - sum(map(len, records)), records)
    content = bytearray(clean)
    content[offsets[10] + 18] ^= 0x40  # length past the end: found by scanning ahead
    content[offsets[200] + 15] ^= 0x08
    path = tmp_path / "p.apx"
    path.write_bytes(bytes(content))
    with open_apx(path, recover=True) as apx:
        expected = list(apx.records_with_offsets())
        report = apx.statistics()
    assert len(expected) == 298 and report.bytes_skipped == len(records[10]) + len(records[200])
    for chunk in (1, 2, 19, 100, 4096):
        with ApxReader(path, recover=True, chunk_size=chunk) as reader:
            assert list(reader.records_with_offsets()) == expected
            assert reader.statistics() == report
    with subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE) as cat:
        try:
            reader = ApxReader(cat.stdout, recover=True, chunk_size=64)
            assert not cat.stdout.seekable()
            assert list(reader.records_with_offsets()) == expected
            assert reader.statistics() == report
        finally:
            cat.stdout.close()
            cat.wait()


def test_recover_streams_in_bounded_memory(tmp_path):
    """Resyncing after a length field that points far ahead reads the file in
    chunks: the memory used stays far below the file size."""
    record = _sim_records(1, mean_hits=2.0)[0]
    n = (3 << 20) // len(record)  # about 3 MiB of records
    records = [record] * n
    path = tmp_path / "big.apx"
    with open_apx(path, "wb", flush="none") as out:
        out.write_many(records)
        data_offset = out.bytes_written - len(record) * n
    with open(path, "r+b") as f:
        f.seek(data_offset + 10 * len(record) + 18)
        f.write(b"\x01")  # record 10 now announces ~16 MiB: past the end of the file
        f.seek(data_offset + (n // 2) * len(record) + 15)
        f.write(b"\x00")  # and record n/2 no data: not followed by a header
    size = path.stat().st_size
    assert size > 3_000_000
    tracemalloc.start()
    try:
        count = 0
        with ApxReader(path, recover=True, chunk_size=1 << 16) as apx:
            for _ in apx.records():
                count += 1
            stats = apx.statistics()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n - 2
    assert stats.bytes_skipped == 2 * len(record)
    assert peak < 1 << 20, f"peak {peak} bytes while reading a {size}-byte file"


# -- arguments -----------------------------------------------------------------------


def test_recover_arguments(tmp_path):
    path = tmp_path / "a.apx"
    path.write_bytes(_apx_bytes([]))
    with pytest.raises(TypeError, match=r"recover='yes' must be a bool"):
        ApxReader(path, recover="yes")
    with pytest.raises(ValueError, match=r"recover=True only applies to mode='rb', not mode='wb'"):
        open_apx(tmp_path / "b.apx", "wb", recover=True)
    assert not (tmp_path / "b.apx").exists()
    with open_apx(path, recover=True) as apx:
        assert apx.recover is True
        assert list(apx) == []
        assert apx.statistics() == ApxStatistics(finished=True)
    assert mcast_trio.ApxStatistics is ApxStatistics and mcast_trio.DamagedRegion is DamagedRegion


# -- random damage -----------------------------------------------------------------------

_RECORDS = _sim_records(25, seed=21, split_fraction=0.4, padding_fraction=0.2)
_CLEAN = _apx_bytes(_RECORDS, {"readout_uid": 4000, "run": 3})
_DATA_OFFSET = len(_CLEAN) - sum(map(len, _RECORDS))
_OFFSETS = _offsets(_DATA_OFFSET, _RECORDS)


def _read_everything(content: bytes, recover: bool, chunk: int):
    """(records with offsets, statistics, error) of one full read; only the
    documented exception and warning types may come out."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            reader = ApxReader(io.BytesIO(content), recover=recover, chunk_size=chunk)
        except MalformedReadout as exc:
            return None, None, exc
        error = None
        yielded = []
        try:
            for item in reader.records_with_offsets():
                yielded.append(item)
        except MalformedReadout as exc:
            error = exc
    assert all(issubclass(w.category, TruncatedRecordWarning) for w in caught)
    return (reader, yielded), reader.statistics(), error


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(st.tuples(st.integers(0, len(_CLEAN) - 1), st.integers(0, 255)), max_size=4),
    insert=st.one_of(st.none(), st.tuples(st.integers(_DATA_OFFSET, len(_CLEAN)), st.binary(min_size=1, max_size=30))),
    cut=st.one_of(st.none(), st.integers(_DATA_OFFSET, len(_CLEAN))),
    chunk=st.sampled_from([1, 7, 64, 1 << 20]),
)
def test_random_damage_recover_yields_only_records_of_the_file(flips, insert, cut, chunk):
    content = bytearray(_CLEAN)
    touched = set()
    for at, value in flips:
        if content[at] != value:
            content[at] = value
            touched.add(at)
    if cut is not None:
        del content[cut:]
    shift_at, shift = len(_CLEAN) + 1, 0
    if insert is not None:
        at, junk = insert
        if at <= len(content):
            content[at:at] = junk
            shift_at, shift = at, len(junk)
            touched = {t if t < at else t + shift for t in touched} | set(range(at, at + shift))
    content = bytes(content)

    def moved(offset):  # where an original offset is in the damaged file
        return offset if offset < shift_at else offset + shift

    result, stats, error = _read_everything(content, True, chunk)
    if result is None:  # the file header is damaged
        assert any(t < _DATA_OFFSET for t in touched) or cut is not None and cut < _DATA_OFFSET
        return
    reader, yielded = result
    assert error is None  # recover never raises after opening (strict is off)
    _tiles(reader, yielded, len(content))
    originals = {moved(off): rec for off, rec in zip(_OFFSETS, _RECORDS)}
    spans_of_touched_records = []
    for offset, record in yielded:
        assert content[offset:offset + len(record)] == record
        assert parse_fixed(record)[0] == 0
        if not touched.intersection(range(offset, offset + len(record))):
            # An untouched record is a record of the original file, where it was.
            assert originals.get(offset) == record, offset
        else:
            spans_of_touched_records.append((offset, offset + len(record)))
    # Every original record that survived intact, with the header after it
    # intact, is recovered, unless a damaged record that swallowed it was.
    got = {offset for offset, _ in yielded}
    end_of_file = len(content)
    for offset, record in originals.items():
        end = offset + len(record)
        if end > end_of_file or touched.intersection(range(offset, min(end + 3, end_of_file))):
            continue
        if offset in got:
            continue
        assert any(a <= offset < b for a, b in spans_of_touched_records), (offset, stats)
    # Without recover: the same records up to the first damage, then
    # MalformedReadout there (or the same truncation).
    result2, stats2, error2 = _read_everything(content, False, chunk)
    plain = result2[1]
    assert yielded[: len(plain)] == plain
    if stats.damaged:
        first = stats.damaged[0]
        assert error2 is not None and stats2.damaged[0].offset == first.offset
        assert str(error2) == first.reason
        assert plain == [item for item in yielded if item[0] < first.offset]
    else:
        assert error2 is None and plain == yielded and stats2.truncated == stats.truncated


def test_random_damage_helpers_see_a_clean_file():
    """The property test's baseline: the clean file reads back exactly."""
    result, stats, error = _read_everything(_CLEAN, True, 64)
    assert error is None and [rec for _, rec in result[1]] == _RECORDS
    assert stats == ApxStatistics(records=25, record_bytes=sum(map(len, _RECORDS)), finished=True)
    assert json.loads(_CLEAN[10:_DATA_OFFSET]) == {"readout_uid": 4000, "run": 3}
