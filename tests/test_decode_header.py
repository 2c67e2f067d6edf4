"""The 19-byte readout header has one owner per language, and they agree.

``_format`` owns it in Python (``parse_readout_header``, ``readout_id_of``,
``check_readout``, ``pack_readout_header``); ``_readout_header.pxd`` owns it
in C, inlined into ``_decode`` (the batch decoder), ``_protocol._kernels``
(``raw_datagrams``) and ``_io._mmsg`` (``send_readout``). Every case of one
table goes through all of them and through the independent oracle
``_reference.parse_fixed``.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

from mcast_trio import _decode, _format, _reference
from mcast_trio._errors import MalformedReadout
from mcast_trio._format import HIT_DTYPE, READOUT_DTYPE, ReadoutError
from mcast_trio._io import _mmsg
from mcast_trio._protocol import _kernels

RID = 0x89ABCDEF
TS = 0x0123456789ABCDEF
DATA = bytes(range(0xE0, 0xE0 + 13))
GOOD = _format.pack_readout_header(RID, TS, len(DATA)) + DATA


def _with(datagram: bytes, offset: int, value: bytes) -> bytes:
    return datagram[:offset] + value + datagram[offset + len(value):]


CASES = {
    # every prefix of a valid readout, byte by byte: too short, then a
    # length mismatch, then the readout itself
    **{f"prefix-{n}": GOOD[:n] for n in range(len(GOOD))},
    "ok": GOOD,
    "ok-empty": _format.pack_readout_header(0, 0, 0),
    "ok-max-ids": _format.pack_readout_header(2**32 - 1, 2**64 - 1, 1) + b"\xff",
    "bad-magic-0": _with(GOOD, 0, b"\xff"),
    "bad-magic-1": _with(GOOD, 1, b"\xdd"),
    "bad-magic-2": _with(GOOD, 2, b"\x00"),
    "bad-magic-short-length": b"\x00\xdc\xba" + bytes(16),
    "length-plus-one": _with(GOOD, 15, (len(DATA) + 1).to_bytes(4, "little")),
    "length-minus-one": _with(GOOD, 15, (len(DATA) - 1).to_bytes(4, "little")),
    "length-max": _with(GOOD, 15, b"\xff\xff\xff\xff"),
    "trailing-byte": GOOD + b"\x00",
    "too-short-zeros": bytes(18),
}


def _compiled_rows(datagrams: list[bytes]) -> np.ndarray:
    """Decode with the compiled decoder directly (whatever backend the run
    selected): one READOUT_DTYPE row per datagram."""
    lengths = np.array([len(d) for d in datagrams], dtype=np.int64)
    offsets = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    buf = b"".join(datagrams) or b"\0"
    hits = np.empty(int(lengths.sum()) // 8 + len(lengths), dtype=HIT_DTYPE)
    rows = np.zeros(len(lengths), dtype=READOUT_DTYPE)
    _decode.decode_batch(buf, offsets, lengths, None, _format.CARRY_NEVER, -1,
                         hits.view(np.uint8), rows.view(np.uint8))
    return rows


@pytest.mark.parametrize("name", list(CASES))
def test_python_owner_agrees_with_the_oracle(name):
    datagram = CASES[name]
    expected = _reference.parse_fixed(datagram)
    assert _format.parse_readout_header(datagram) == expected
    assert _format.parse_readout_header(memoryview(datagram)) == expected
    error, rid, ts, length = expected
    assert _format.readout_id_of(datagram) == (None if error else rid)
    if error:
        with pytest.raises(MalformedReadout) as info:
            _format.check_readout(datagram)
        assert str(info.value) == _format.readout_error_message(datagram, error)
    else:
        assert _format.check_readout(datagram) == (rid, ts, length)


def test_c_owner_agrees_with_python_on_every_case():
    names = list(CASES)
    rows = _compiled_rows([CASES[n] for n in names])
    for name, row in zip(names, rows):
        error, rid, ts, _length = _format.parse_readout_header(CASES[name])
        assert (int(row["error"]), bool(row["malformed"])) == (int(error), bool(error)), name
        if not error:
            assert (int(row["readout_id"]), int(row["timestamp"])) == (rid, ts), name
        assert _kernels.raw_datagrams([CASES[name]], True) is (error == ReadoutError.OK), name


def test_every_outcome_is_in_the_table():
    outcomes = {_format.parse_readout_header(d)[0] for d in CASES.values()}
    assert outcomes == set(ReadoutError)


def test_c_constants_are_those_of_format():
    header = _decode._layout()["readout_header"]
    assert header["magic"] == _format.HEADER
    assert header["size"] == _format.HEADER_SIZE == _format.READOUT_HEADER_DTYPE.itemsize
    assert header["length_offset"] == _format.LENGTH_OFFSET
    assert header["errors"] == {e.name: int(e) for e in ReadoutError}


@pytest.mark.parametrize(("rid", "ts", "data"), [(RID, TS, DATA), (0, 0, b""), (2**32 - 1, 2**64 - 1, b"\xff" * 300)])
def test_pack_round_trips_and_matches_the_c_writer(rid, ts, data):
    header = _format.pack_readout_header(rid, ts, len(data))
    assert len(header) == _format.HEADER_SIZE
    assert _reference.parse_fixed(header + data) == (ReadoutError.OK, rid, ts, len(data))
    fixed = np.zeros(1, dtype=_format.READOUT_HEADER_DTYPE)
    fixed[0] = (_format.HEADER, rid, ts, len(data))
    assert fixed.tobytes() == header
    if not _mmsg.HAVE_MMSG:
        pytest.skip("send_readout needs Linux")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        assert _mmsg.send_readout(a.fileno(), data, rid, ts) == len(header) + len(data)
        assert b.recv(70000) == header + data


@pytest.mark.parametrize("name", list(CASES))
def test_the_vectorized_check_agrees_with_the_owner(name):
    # check_readouts / readout_ids_and_timestamps read every header of a
    # list at once; placed among good readouts, each case must be judged as
    # parse_readout_header judges it, and reported as the first bad one.
    datagram = CASES[name]
    error, rid, ts, _length = _format.parse_readout_header(datagram)
    records = [GOOD, datagram, CASES["too-short-zeros"] if error else GOOD]
    lengths = [len(r) for r in records]
    if error:
        with pytest.raises(MalformedReadout, match=r"^readout 1 at offset 32: "):
            _format.check_readouts(b"".join(records), lengths)
        with pytest.raises(MalformedReadout, match=r"^readout 1 "):
            _format.readout_ids_and_timestamps(records)
    else:
        assert list(_format.check_readouts(b"".join(records), lengths)) == [0, 32, 32 + len(datagram)]
        ids, timestamps = _format.readout_ids_and_timestamps(records)
        assert (ids.dtype, timestamps.dtype) == (np.uint32, np.uint64)
        assert ids.tolist() == [RID, rid, RID] and timestamps.tolist() == [TS, ts, TS]
