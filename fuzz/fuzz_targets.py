"""Fuzz targets: one per parser of untrusted bytes, plus their seed corpora.

Every target is a function ``run(data: bytes) -> frozenset`` that turns one
fuzz input into calls of a parser, checks the result against an oracle, and
returns a small set of *outcome features* (decoding flags, error codes, ...)
that the coverage-less mutational engine uses as a cheap substitute for
coverage. A target lets through only what is a bug:

* an exception type the parser does not document for bad bytes;
* an ``AssertionError`` from a violated oracle (compiled decoder != the
  pure-Python reference, two ways of reading the same bytes that disagree, a
  broken invariant).

The documented outcome of bad bytes (``MalformedReadout``, ``MalformedFrame``,
``TruncatedRecordWarning``, a malformed row in a batch) is a normal result.

Inputs are plain bytes so that any engine (atheris/libFuzzer, the mutational
loop of ``fuzz_engine``, hypothesis) can drive the same targets. Structured
inputs (options, several datagrams) are carved out of the bytes the same
way every time; see each target's docstring for the layout. Several datagrams
in one input are separated by :data:`SEP`.

The seed corpora are generated at run time: datagrams from
:class:`mcast_trio.sim.DaqSimulator`, the encoders of ``mcast_trio`` and the
golden ``.apx`` file of astropix-analysis, found through
``MCAST_TRIO_TEST_DATA`` (default ``<repo>/../shared/data/astropix4``; the
golden-file seeds are left out, saying so, where it is absent).
"""

from __future__ import annotations

import io
import os
import pathlib
import struct
import warnings

import numpy as np

import mcast_trio
from mcast_trio import (
    ApxReader,
    AstroPix4Readout,
    MalformedFrame,
    MalformedReadout,
    MclDecoder,
    MclEncoder,
    NativeDecoder,
    NativeEncoder,
    TruncatedRecordWarning,
    decode_readouts,
    open_apx,
)
from mcast_trio import _reference
from mcast_trio._protocol._native import parse_header

__all__ = ["TARGETS", "SEP", "DICTIONARY", "seeds", "golden_apx_path", "split_datagrams"]

#: Separates the datagrams of one multi-datagram input.
SEP = b"\xc1\x5e\xc1\x5e"
#: At most this many datagrams are taken from one input.
MAX_DATAGRAMS = 64
#: Fuzz inputs are cut to this size (seeds are generated below it).
MAX_LEN = 4096
#: The largest input per target: enough for the seeds, small enough to keep
#: the slow reference decoder (batch) fast.
TARGET_MAX_LEN = {"readout": 1024, "batch": 1024, "native": 2048, "mcl": 2048, "apx": 2048}

REPO = pathlib.Path(__file__).resolve().parent.parent
GOLDEN_APX = "20250723_092534_data.apx"

_FIXED = struct.Struct("<3sIQI")
_NATIVE = struct.Struct("<4sBBBxQIIHHH")
_CARRY = ("always", "consecutive", "never", "always")
_CARRY_MODE = {"always": _reference.CARRY_ALWAYS, "consecutive": _reference.CARRY_CONSECUTIVE,
               "never": _reference.CARRY_NEVER}
_APX_CHUNKS = (1, 2, 3, 7, 8, 19, 64, 1 << 20)

#: Tokens the mutational engine splices in (also written as a libFuzzer
#: dictionary for atheris).
DICTIONARY = (
    b"\xfe\xdc\xba",  # readout header
    b"MCTR\x01",  # native magic + version
    b"%APXDF",  # .apx magic
    b'{"readout_uid": 4000}',
    b"readout_uid",
    SEP,
    b"\x92", b"\x94", b"\xdc\x00\x04", b"\xdd\x00\x00\x00\x04",  # msgpack arrays
    b"\xc0", b"\xc4\x08", b"\xd9\x08", b"\xda\x00\x08", b"\xdb\x00\x00\x00\x08",  # nil, bin8, str8/16/32
    b"\xbc\xbc", b"\xff\xff", b"\xe0", b"\xfe",
    b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x00\x00\x00", b"\x08\x00\x00\x00",
)


class Failure(AssertionError):
    """An oracle of a target was violated."""


def _check(condition: bool, message) -> None:
    if not condition:
        raise Failure(message() if callable(message) else message)


def split_datagrams(payload: bytes) -> list[bytes]:
    """The datagrams of a multi-datagram input (at most MAX_DATAGRAMS)."""
    return payload.split(SEP, MAX_DATAGRAMS - 1)


def _as_buffer(raw: bytes, kind: int):
    """``raw`` as bytes, bytearray, memoryview or a view into a larger buffer."""
    if kind == 0:
        return raw
    if kind == 1:
        return bytearray(raw)
    if kind == 2:
        return memoryview(raw)
    return memoryview(b"\xfe\xdc\xba" + raw + b"\xfe\xdc\xba")[3:3 + len(raw)]


def _same_array(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got = np.ascontiguousarray(got.view(np.ndarray))
    if got.dtype == want.dtype and len(got) == len(want) and got.tobytes() == want.tobytes():
        return
    if len(got) != len(want):
        raise Failure(f"{what}: {len(got)} records, reference {len(want)}")
    for i in range(len(got)):
        if got[i].tobytes() != want[i].tobytes():
            fields = [name for name in want.dtype.names if got[i][name] != want[i][name]]
            raise Failure(f"{what}: record {i} differs in {fields or 'padding bytes'}: "
                          f"{got[i]!r} != reference {want[i]!r}")
    raise Failure(f"{what}: dtype {got.dtype} != reference {want.dtype}")


# -- (a) the readout parser ----------------------------------------------------


def run_readout(data: bytes) -> frozenset:
    """``AstroPix4Readout.from_bytes`` then ``.decode(extra)``.

    Layout: ``opt`` byte (bits 0-3: number of extra bytes, bit 4: no extra
    bytes (None), bits 5-6: buffer type), the extra bytes, the datagram.

    Documented: ``MalformedReadout`` only. Oracles: the header fields and
    the data are what the bytes say; the hits, flags, extra bytes and dropped
    count equal ``_reference.decode_data``; a batch of this one datagram is
    malformed exactly when ``from_bytes`` raises, with the same message;
    ``to_bytes`` round-trips.
    """
    opt = data[0] if data else 0x10
    pos = 1
    if opt & 0x10:
        extra = None
    else:
        extra = data[pos:pos + (opt & 0x0F)]
        pos += opt & 0x0F
    raw = data[pos:]
    batch = decode_readouts([raw])
    try:
        readout = AstroPix4Readout.from_bytes(_as_buffer(raw, (opt >> 5) & 3))
    except MalformedReadout as exc:
        error = int(_reference.parse_fixed(raw)[0])
        said = str(exc)
        _check(error != 0, lambda: f"from_bytes raised MalformedReadout({said!r}) on a well-formed datagram")
        _check(batch.errors == ((0, said),), lambda: f"batch errors {batch.errors} != from_bytes message {said!r}")
        return frozenset({("malformed", error)})
    _check(not batch.errors, lambda: f"from_bytes accepted a datagram the batch rejects: {batch.errors}")
    _, rid, ts, length = _FIXED.unpack_from(raw)
    _check(_reference.parse_fixed(raw)[0] == 0 and length == len(raw) - 19, "from_bytes accepted a bad datagram")
    _check((readout.readout_id, readout.timestamp) == (rid, ts), "header fields differ from the bytes")
    body = raw[19:].rstrip(b"\xff")
    _check(readout.data() == body, "data() is not the datagram body without trailing padding")
    hits = readout.decode(extra)
    ref_hits, flags, start, dropped = _reference.decode_data(body, extra, rid, ts)
    _same_array(hits, ref_hits, "AstroPix4Readout.decode")
    _check(int(readout.decoding_status()) == flags,
           lambda: f"status {int(readout.decoding_status())} != reference {flags}")
    want_extra = body[start:] if start >= 0 else None
    _check(readout.extra_bytes() == want_extra,
           lambda: f"extra_bytes {readout.extra_bytes()!r} != reference {want_extra!r}")
    _check(readout.dropped_bytes() == dropped, lambda: f"dropped {readout.dropped_bytes()} != reference {dropped}")
    _check(readout.decode(extra) is hits, "decode() with the same extra bytes did not return the cached hits")
    again = AstroPix4Readout.from_bytes(readout.to_bytes())
    _check(again == readout, "to_bytes/from_bytes does not round-trip")
    return frozenset({("flags", flags), ("hits", min(len(hits), 3)), ("extra", len(want_extra or b"")),
                      ("dropped", min(dropped, 9)), ("given_extra", -1 if extra is None else len(extra))})


# -- (b) the batch decoder ----------------------------------------------------


def _batch_args(data: bytes):
    """Layout: ``opt`` byte (bits 0-1: carry mode, bit 2: extra bytes None,
    bit 3: a last_id follows, bits 4-5: input form, bits 6-7: junk between
    datagrams in the offsets form), ``n`` byte (bits 0-3: number of extra
    bytes; the whole byte also picks where the batch is split in two), the
    extra bytes, optionally a u32 last_id, then the datagrams separated by
    SEP."""
    opt = data[0] if len(data) > 0 else 0
    nb = data[1] if len(data) > 1 else 0
    pos = 2
    extra = None
    if not opt & 0x04:
        extra = data[pos:pos + (nb & 0x0F)]
        pos += nb & 0x0F
    last_id = -1
    if opt & 0x08:
        chunk = data[pos:pos + 4].ljust(4, b"\0")
        last_id = struct.unpack("<I", chunk)[0]
        pos += 4
    parts = split_datagrams(data[pos:]) if pos < len(data) else []
    return opt, nb, extra, last_id, _CARRY[opt & 3], parts


def _decode_in_form(parts, form: int, junk: bytes, **kwargs):
    if form == 0:
        return decode_readouts(parts, **kwargs)
    lengths = [len(p) for p in parts]
    if form == 1:
        return decode_readouts(b"".join(parts), lengths, **kwargs)
    if form == 2:
        # One buffer with gaps: readout headers (and junk) between datagrams,
        # so that reading past one datagram would change the result.
        pieces, offsets, at = [], [], 0
        for p in parts:
            pieces.append(junk)
            at += len(junk)
            offsets.append(at)
            pieces.append(p)
            at += len(p)
        pieces.append(junk)
        return decode_readouts(bytearray(b"".join(pieces)), np.array(lengths), offsets=offsets, **kwargs)
    kinds = [bytes, bytearray, memoryview]
    return decode_readouts([kinds[i % 3](p) for i, p in enumerate(parts)], **kwargs)


def _cat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # np.concatenate would repack the dtypes (dropping their offsets/padding).
    out = np.zeros(len(a) + len(b), dtype=a.dtype)
    out[:len(a)] = a
    out[len(a):] = b
    return out


def run_batch(data: bytes) -> frozenset:
    """``decode_readouts`` on a list of datagrams or on one buffer with lengths.

    Documented: never raises on datagram contents (a malformed datagram is a
    row with ``malformed`` set and an entry in ``errors``). Oracles: every
    output equals ``_reference.decode_batch`` (hits, rows, extra bytes,
    last id), byte for byte; each error message is the ``MalformedReadout``
    message of ``from_bytes``; decoding the batch in two parts, handing over
    ``extra_bytes``/``last_id``, gives the same hits and rows.
    """
    opt, nb, extra, last_id, carry, parts = _batch_args(data)
    form = (opt >> 4) & 3
    junk = (b"\xfe\xdc\xba", b"\xe0\xe1\xe2\xe3\xe4\xe5\xe6", b"", b"\xff\xbc")[opt >> 6]
    kwargs = dict(extra_bytes=extra, last_id=last_id, carry=carry)
    batch = _decode_in_form(parts, form, junk, **kwargs)
    ref_hits, ref_rows, ref_extra, ref_last = _reference.decode_batch(parts, extra, _CARRY_MODE[carry], last_id)
    _same_array(batch.hits, ref_hits, f"decode_readouts hits (form {form}, carry {carry})")
    _same_array(batch.readouts, ref_rows, f"decode_readouts rows (form {form}, carry {carry})")
    _check((batch.extra_bytes, batch.last_id) == (ref_extra, ref_last),
           lambda: f"extra/last_id {(batch.extra_bytes, batch.last_id)} != reference {(ref_extra, ref_last)}")
    malformed = [int(k) for k in np.flatnonzero(ref_rows["malformed"])]
    _check([k for k, _ in batch.errors] == malformed, lambda: f"errors {batch.errors} != malformed rows {malformed}")
    for k, message in batch.errors:
        try:
            AstroPix4Readout.from_bytes(parts[k])
        except MalformedReadout as exc:
            said = str(exc)
            _check(said == message, lambda: f"error {k}: {message!r} != from_bytes {said!r}")
        else:
            raise Failure(f"datagram {k} is reported malformed but from_bytes accepts it")
    # Two batches, chained, decode like one.
    cut = nb % (len(parts) + 1)
    first = decode_readouts(parts[:cut], **kwargs)
    second = decode_readouts(parts[cut:], extra_bytes=first.extra_bytes, last_id=first.last_id, carry=carry)
    _same_array(_cat(first.hits, second.hits), ref_hits, f"hits of the batch cut at {cut}")
    rows = _cat(first.readouts, second.readouts)
    rows["first_hit"][cut:] += len(first.hits)
    _same_array(rows, ref_rows, f"rows of the batch cut at {cut}")
    _check((second.extra_bytes, second.last_id) == (ref_extra, ref_last), f"extra/last_id of the batch cut at {cut}")
    features = {("n", min(len(parts), 4)), ("carry", carry), ("form", form)}
    for row in ref_rows.tolist():
        # dropped, n_extra, status, malformed, error
        features.add(("row", min(row[5], 9)) + tuple(row[6:]))
    return frozenset(features)


# -- (c) the framing parsers --------------------------------------------------


def _check_store(stats, max_messages: int, max_bytes: int) -> None:
    _check(0 <= stats.bytes_buffered <= max_bytes and 0 <= stats.pending <= max_messages,
           lambda: f"reassembly bounds broken: {stats}")


def run_native(data: bytes) -> frozenset:
    """``parse_header`` and ``NativeDecoder.feed`` on a sequence of datagrams.

    Layout: ``opt`` byte (bit 0: filter on topic ``t``, bits 1-2: clock step,
    bit 3: memoryview input), then datagrams separated by SEP, fed in order
    to one fresh decoder with small reassembly bounds (4 messages, 4 KiB).

    Documented: ``MalformedFrame`` only. Oracles: ``feed`` raises exactly
    when ``parse_header`` does; a parsed header is self-consistent with the
    datagram; a returned message has ``total_size`` bytes (and is the
    fragment itself for single-fragment messages); the reassembly bounds
    hold after every datagram.
    """
    opt = data[0] if data else 0
    decoder = NativeDecoder(topics=[b"t"] if opt & 1 else None, max_messages=4, max_bytes=4096, timeout=1.0)
    step = (0.0, 0.01, 0.3, 2.0)[(opt >> 1) & 3]
    features = set()
    for i, dg in enumerate(split_datagrams(data[1:])):
        if opt & 8:
            dg = memoryview(dg)
        try:
            header = parse_header(dg)
        except MalformedFrame as exc:
            features.add(("bad", str(exc)[:9]))
            try:
                decoder.feed(dg, ("127.0.0.1", 1), i * step)
            except MalformedFrame as again:
                _check(str(again) == str(exc), "feed and parse_header disagree on the message")
            else:
                raise Failure(f"parse_header raised {exc!r} but feed accepted the datagram")
            continue
        _check(header.payload_offset == 30 + len(header.topic) and 0 <= header.index < header.count
               and len(dg) - header.payload_offset == header.fragment_size,
               lambda: f"inconsistent header {header} for a {len(dg)}-byte datagram")
        message = decoder.feed(dg, ("127.0.0.1", 1), i * step)
        if message is not None:
            _check(type(message.payload) is bytes and len(message.payload) == header.total_size,
                   lambda: f"message of {len(message.payload)} bytes, header says {header.total_size}")
            if header.count == 1:
                _check(message.payload == bytes(dg[header.payload_offset:]), "single fragment payload differs")
            _check(message.topic == header.topic, "message topic differs from the header")
        _check_store(decoder.stats, 4, 4096)
        features.add(("ok", header.count > 1, message is not None))
    stats = decoder.stats
    features.update(("stat", name) for name in ("expired", "evicted", "duplicate_fragments", "inconsistent",
                                                 "oversized", "completed") if getattr(stats, name))
    return frozenset(features)


def run_mcl(data: bytes) -> frozenset:
    """``MclDecoder.feed`` on a sequence of datagrams.

    Layout: ``opt`` byte (bit 0: filter on topic ``t``, bits 1-2: clock step,
    bit 3: alternate between two sender addresses), then datagrams separated
    by SEP, fed in order to one fresh decoder (4 messages, 4 KiB).

    Documented: ``MalformedFrame`` only. Oracles: a returned message has a
    bytes-or-None topic (its payload is any msgpack object, as MCL's); the
    reassembly bounds hold.
    """
    opt = data[0] if data else 0
    decoder = MclDecoder(topics=[b"t"] if opt & 1 else None, max_messages=4, max_bytes=4096, timeout=1.0)
    step = (0.0, 0.01, 0.3, 2.0)[(opt >> 1) & 3]
    features = set()
    for i, dg in enumerate(split_datagrams(data[1:])):
        address = ("127.0.0.1", 1 + (i & 1 if opt & 8 else 0))
        try:
            message = decoder.feed(dg, address, i * step)
        except MalformedFrame as exc:
            features.add(("bad", str(exc)[:12]))
            continue
        if message is not None:
            _check(message.topic is None or type(message.topic) is bytes,
                   lambda: f"bad message {message!r:.200}")
            _check(message.address == address, "message address differs")
        _check_store(decoder.stats, 4, 4096)
        features.add(("ok", message is not None))
    stats = decoder.stats
    features.update(("stat", name) for name in ("expired", "evicted", "superseded", "duplicate_fragments",
                                                 "inconsistent", "oversized", "completed") if getattr(stats, name))
    return frozenset(features)


# -- (d) the .apx reader ------------------------------------------------------


def _read_apx(content: bytes, strict: bool, chunk_size: int | None, recover: bool = False):
    """Read everything; return (outcome, records, truncated, warnings); with
    ``recover``, the outcome also holds the damaged regions."""
    f = io.BytesIO(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if chunk_size is None:
                reader = open_apx(f, strict=strict, recover=recover)
            else:
                reader = ApxReader(f, strict=strict, chunk_size=chunk_size, recover=recover)
            with reader:
                records = list(reader.records_with_offsets())
                outcome = ("ok", reader.data_offset, reader.header, reader.statistics().damaged)
                truncated = reader.truncated
                # A second iteration starts again at the first record.
                again = [r for r in reader]
                _check(again == [AstroPix4Readout.from_bytes(rec) for _, rec in records],
                       "a second iteration yields different readouts")
                _check(reader.truncated == truncated, "a second iteration sees a different truncation")
        except MalformedReadout as exc:
            return ("malformed", str(exc)), None, None, caught
    return outcome, records, truncated, caught


def run_apx(data: bytes) -> frozenset:
    """``open_apx(io.BytesIO(...))`` / ``ApxReader``: header, records, rewind.

    Layout: ``opt`` byte (bits 0-2: chunk size, bit 3: strict, bit 4: use
    ``open_apx`` with its default chunk size, bit 5: ``recover=True``), then
    the file content.

    Documented: ``MalformedReadout`` and ``TruncatedRecordWarning`` only.
    Oracles: the result (records, damaged regions, truncation, error
    message) does not depend on the chunk size; records, damaged regions
    and a truncated tail tile the file from ``data_offset`` (without
    ``recover`` there are no regions: records are contiguous), each record
    a well-formed readout; a truncated tail is reported where the last
    record or region ends, and with ``strict`` raises instead of warning;
    with ``recover`` nothing is raised after the file header unless
    ``strict``.
    """
    opt = data[0] if data else 0
    content = data[1:]
    strict = bool(opt & 8)
    recover = bool(opt & 0x20)
    chunk = None if opt & 0x10 else _APX_CHUNKS[opt & 7]
    outcome, records, truncated, caught = _read_apx(content, strict, chunk, recover)
    for w in caught:
        _check(issubclass(w.category, TruncatedRecordWarning), lambda: f"undocumented warning {w.category.__name__}: {w.message}")
    # Chunk-size independence: the default reader says exactly the same.
    other = _read_apx(content, strict, 1 << 20 if chunk != 1 << 20 else 5, recover)
    _check(other[:3] == (outcome, records, truncated),
           lambda: f"chunk size {chunk} and the default disagree: {outcome!r:.200} / {other[0]!r:.200}")
    if outcome[0] == "malformed":
        _check(not recover or strict or not outcome[1].startswith(("record", "bad record header")),
               lambda: f"recover=True raised on damage: {outcome[1]:.200}")
        return frozenset({("malformed", outcome[1][:14]), ("strict", strict), ("recover", recover)})
    _, offset, _header, damaged = outcome
    _check(recover or not damaged, "damaged regions without recover and without an error")
    spans = sorted([(at, len(record), record) for at, record in records]
                   + [(region.offset, region.size, None) for region in damaged])
    for at, size, record in spans:
        _check(at == offset, lambda: f"record or region at {at} is not where expected ({offset})")
        if record is not None:
            _check(record[:3] == b"\xfe\xdc\xba" and content[at:at + size] == record,
                   lambda: f"record at {at} is not the file's bytes")
            AstroPix4Readout.from_bytes(record)  # must not raise: the reader checked it
        offset += size
    n_warn = len(caught)
    if truncated is None:
        _check(offset == len(content) and n_warn == 0, "records do not cover the file, and no truncation was reported")
    else:
        _check(not strict, "strict reader reported a truncation instead of raising")
        _check(truncated.offset == offset and truncated.offset + truncated.size == len(content)
               and truncated.index == len(records), lambda: f"truncation {truncated} does not match the records")
        _check(n_warn == 2, lambda: f"{n_warn} warnings for 2 iterations over a truncated file")
    return frozenset({("records", min(len(records), 3)), ("truncated", truncated is not None and truncated.expected is None),
                      ("truncated", truncated is not None), ("chunk", chunk), ("damaged", min(len(damaged), 2))})


#: name -> run function.
TARGETS = {
    "readout": run_readout,
    "batch": run_batch,
    "native": run_native,
    "mcl": run_mcl,
    "apx": run_apx,
}


# -- seed corpora -------------------------------------------------------------


def golden_apx_path() -> pathlib.Path | None:
    """The golden ``.apx`` file of astropix-analysis, or None if absent."""
    base = pathlib.Path(os.environ.get("MCAST_TRIO_TEST_DATA", REPO.parent / "shared" / "data" / "astropix4"))
    path = base / GOLDEN_APX
    return path if path.is_file() else None


def _sim_datagrams(seed: int, n: int, **kwargs) -> list[bytes]:
    sim = mcast_trio.sim.DaqSimulator(seed, start_ns=1_700_000_000_000_000_000, **kwargs)
    return sim.datagrams(n)


def _golden_records(limit: int) -> tuple[bytes, list[bytes]]:
    path = golden_apx_path()
    if path is None:
        return b"", []
    content = path.read_bytes()
    with open_apx(io.BytesIO(content)) as reader:
        start = reader.data_offset
        records = []
        for record in reader.records():
            records.append(record)
            if len(records) >= limit:
                break
    return content[:start], records


def _readout_pool() -> list[bytes]:
    pool = []
    pool += _sim_datagrams(1, 24, split_fraction=0.5, mean_hits=2.0)
    pool += _sim_datagrams(2, 12, padding_fraction=0.5, max_idle_gap=4, chip_id=30, mean_hits=4.0)
    pool += _sim_datagrams(3, 8, split_fraction=1.0, mean_hits=1.0, lead_idles=0, trailing_idles=1)
    pool += _golden_records(24)[1]
    hdr = _FIXED.pack(b"\xfe\xdc\xba", 7, 123, 0)
    edge_bodies = [b"", b"\xbc" * 8, b"\xff" * 9, b"\xe0" * 8, b"\xe0" * 7, b"\xe5\x01\x02\xe6\x03\x04\x05\x06\x07",
                   b"\x01\x02\x03\xbc\xe1\x11\x12\x13\x14\x15\x16\x17\xbc\xe2\x21"]
    for body in edge_bodies:
        pool.append(hdr[:15] + struct.pack("<I", len(body)) + body)
    return [p for p in pool if len(p) < 600]


def seeds(target: str) -> list[bytes]:
    """The seed corpus of ``target`` (deterministic)."""
    if target == "readout":
        out = [b"\x10" + d for d in _readout_pool()]
        out += [bytes([k]) + b"\xe1\x02\x03"[:k] + d for k, d in zip((1, 2, 3, 0), _readout_pool()[1:])]
        return out + [b"", b"\x10", b"\x10\xfe\xdc\xba"]
    if target == "batch":
        pool = _readout_pool()
        out = []
        for i in range(0, len(pool), 4):
            group = pool[i:i + 4]
            for opt in (0x00, 0x05, 0x1A, 0x21, 0x31, 0x62, 0xA0, 0xE4):
                out.append(bytes([opt, i]) + (b"\xe2\x03" if not opt & 4 else b"")
                           + (b"\x05\x00\x00\x00" if opt & 8 else b"") + SEP.join(group))
        out.append(b"\x00\x00")
        return out
    if target == "native":
        out = []
        enc = NativeEncoder(sender_id=0x1122334455667788, topic=b"t", max_datagram=512)
        for size in (0, 5, 60, 481, 1200):
            out.append(b"\x00" + SEP.join(enc.encode(bytes(range(256)) * (size // 256) + bytes(size % 256))))
        other = NativeEncoder(sender_id=9, topic=b"other", max_datagram=512)
        out.append(b"\x01" + SEP.join(other.encode(b"x" * 700) + enc.encode(b"y" * 10)))
        # Hand-built frames with a small chunk size (parse_header allows any).
        small = [_NATIVE.pack(b"MCTR", 1, 0, 1, 42, 7, 20, i, 3, 8) + b"t" + bytes([i]) * (8 if i < 2 else 4)
                 for i in range(3)]
        out.append(b"\x02" + SEP.join(small))
        out.append(b"\x04" + SEP.join([small[2], small[0], small[0], small[1]]))
        out.append(b"\x06" + SEP.join([small[0], small[1]] * 3 + [small[2]]))
        out.append(b"\x00" + _NATIVE.pack(b"MCTR", 1, 0, 0, 1, 1, 3, 0, 1, 3) + b"abc")
        return out + [b"", b"\x00MCTR"]
    if target == "mcl":
        out = []
        for topic, bin_type in ((b"t", False), (None, False), ("astropix", True), (b"t" * 40, False)):
            enc = MclEncoder(topic, chunk_size=64, use_bin_type=bin_type)
            for size in (0, 10, 63, 200):
                out.append(b"\x00" + SEP.join(enc.encode(bytes(range(size % 256)) * (1 + size // 256))))
        enc = MclEncoder(b"t", chunk_size=64)
        chunks = enc.encode(b"z" * 150)
        out.append(b"\x09" + SEP.join([chunks[1], chunks[0], chunks[0], chunks[2], chunks[1]]))
        out.append(b"\x0c" + SEP.join(chunks + chunks))
        return out + [b"", b"\x00\x92", b"\x00\x94\xc0\x01\x01\xc4\x00"]
    if target == "apx":
        out = []
        head, records = _golden_records(12)
        if head:
            for k in (0, 1, 2, 5, 12):
                body = head + b"".join(records[:k])
                out.append(b"\x10" + body)
                out.append(bytes([k & 7]) + body)
            out.append(b"\x03" + head + b"".join(records[:3]) + records[3][:10])
            out.append(b"\x0b" + head + b"".join(records[:2]) + records[2][:-1])
        f = io.BytesIO()
        with open_apx(f, "wb", {"run": 12, "note": "fuzz"}) as writer:
            writer.write_many(_sim_datagrams(4, 6, split_fraction=0.3))
        written = f.getvalue()
        out += [b"\x10" + written, b"\x01" + written, b"\x02" + written[:-5], b"\x0a" + written[:-5]]
        out += [b"\x10%APXDF\x02\x00\x00\x00{}", b"\x10%APXDF", b"\x10" + written[:20], b""]
        # recover=True (bit 5) on the same files, and on one with a record
        # whose length spans the next one.
        out += [bytes([s[0] | 0x20]) + s[1:] for s in out if s]
        spanning = bytearray(written)
        first = len(written) - sum(map(len, _sim_datagrams(4, 6, split_fraction=0.3)))
        spanning[first + 15] += len(_sim_datagrams(4, 6, split_fraction=0.3)[1])
        out += [b"\x21" + bytes(spanning), b"\x01" + bytes(spanning)]
        return [s[:MAX_LEN] for s in out]
    raise ValueError(f"target={target!r} is not a fuzz target; allowed: {', '.join(TARGETS)}")
