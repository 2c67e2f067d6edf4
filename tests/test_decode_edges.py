"""Table of edge cases for every rule and flag of spec section 5, and for each
of the four points where mcast_trio must do better than the reference decoder.

Each row gives the readout data (and the extra bytes passed in), the hit words
expected in decoding order, the flags, the extra bytes kept and the number of
dropped bytes. Every row is checked with the compiled decoder, the reference
decoder, the readout class and the batch decoder.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcast_trio import AstroPix4Readout, DecodingStatus, decode_readouts
from mcast_trio import _decode, _reference
from mcast_trio._format import HIT_DTYPE

F = DecodingStatus
A = "e0 11 22 33 44 55 66 77"
B = "e1 12 23 34 45 56 67 78"
C = "e2 00 01 02 03 04 05 06"
D = "e0 11 e5 33 44 55 66 77"  # a start byte (e5) at position 2, by chance


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# name, data, extra (None: not passed), hit words, flags, extra kept, dropped
CASES = [
    # -- do better #1: empty / all IDLE / PADDING -> nothing, no error --------
    ("empty", "", None, [], 0, None, 0),
    ("all idle", "bc bc bc bc", None, [], 0, None, 0),
    ("idle and padding", "bc ff bc ff bc", None, [], 0, None, 0),
    ("empty with extra passed", "", "e1 12", [], 0, None, 0),
    # -- plain hits -------------------------------------------------------------
    ("one hit", A, None, [A], 0, None, 0),
    ("hits between idles", f"bc bc {A} bc {B} bc bc", None, [A, B], 0, None, 0),
    ("hits back to back", f"{A} {B} {C}", None, [A, B, C], 0, None, 0),
    ("padding between hits", f"{A} ff ff bc {B}", None, [A, B], 0, None, 0),
    # -- do better #4: a complete word ending exactly at the end is a hit ----------
    ("exactly 8 bytes left", f"bc bc {A}", None, [A], 0, None, 0),
    ("exactly 8 after a hit", f"{A} bc {B}", None, [A, B], 0, None, 0),
    # -- 3b: EXTRA bytes at the end -----------------------------------------------
    ("valid extra", f"{A} e1 12 23 34 45", None, [A], F.VALID_EXTRA_BYTES, "e1 12 23 34 45", 0),
    ("valid extra after idle", f"{A} bc bc e1 12", None, [A], F.VALID_EXTRA_BYTES, "e1 12", 0),
    ("valid extra of 7", f"{A} e1 12 23 34 45 56 67", None, [A], F.VALID_EXTRA_BYTES, "e1 12 23 34 45 56 67", 0),
    ("valid extra with idle inside", "e1 12 bc 34", None, [], F.VALID_EXTRA_BYTES, "e1 12 bc 34", 0),
    # 3c reached with fewer than 8 bytes left is 3b (invalid extra).
    ("invalid extra", f"{A} 12 34", None, [A], F.INVALID_EXTRA_BYTES, None, 2),
    # -- 3b: exactly 8 bytes left (issue 7). The reference's test is "8 or fewer
    # bytes remain"; do better #4 makes an exception only for a complete word
    # that begins with a start byte. 8 bytes that do not are INVALID extra
    # bytes, all dropped, even when a later one is a start byte (no walk as 3c,
    # nothing kept for the next readout).
    ("8 left, no start byte", f"{A} 01 02 03 04 05 06 07 08", None, [A], F.INVALID_EXTRA_BYTES, None, 8),
    ("8 left, only a later one a start byte", f"{A} 01 02 e1 33 44 55 66 77", None, [A],
     F.INVALID_EXTRA_BYTES, None, 8),
    ("8 left, the last one a start byte", f"{A} 01 02 03 04 05 06 07 e1", None, [A],
     F.INVALID_EXTRA_BYTES, None, 8),
    ("8 left after idle and padding", f"{A} bc ff bc 01 02 e1 33 44 55 66 77", None, [A],
     F.INVALID_EXTRA_BYTES, None, 8),
    ("8 left, trailing idle among them", f"{A} 01 e1 33 44 55 66 bc bc", None, [A],
     F.INVALID_EXTRA_BYTES, None, 8),
    ("8 left, trailing padding and idle among them", f"{A} 01 02 e1 33 44 55 ff bc", None, [A],
     F.INVALID_EXTRA_BYTES, None, 8),
    # Neighbours: 8 bytes that begin with a start byte are a hit (do better #4),
    # trailing IDLE/PADDING inside the word or not ...
    ("8 left with a start byte", f"{A} bc ff {B}", None, [A, B], 0, None, 0),
    ("8 left with a start byte, idle at its end", f"{A} e1 12 23 34 45 56 bc bc", None,
     [A, "e1 12 23 34 45 56 bc bc"], 0, None, 0),
    ("8 left with a start byte, padding and idle at its end", f"{A} e1 12 23 34 45 56 ff bc", None,
     [A, "e1 12 23 34 45 56 ff bc"], 0, None, 0),
    ("8 left with a start byte, then trailing idle", f"{A} {B} bc bc", None, [A, B], 0, None, 0),
    # ... and 9 or more bytes left are walked as 3c: up to the next start byte,
    # then 3b (fewer than 8: EXTRA; exactly 8 from a start byte: a hit).
    ("9 left, a later start byte, trailing idle", f"{A} 01 02 e1 33 44 55 66 77 bc", None, [A],
     F.VALID_EXTRA_BYTES, "e1 33 44 55 66 77 bc", 2),
    ("9 left, start byte at 1, 8 from it", f"{A} 01 e1 33 44 55 66 77 88 99", None,
     [A, "e1 33 44 55 66 77 88 99"], 0, None, 1),
    ("9 left, start byte at 1, trailing idle", f"{A} 01 e1 33 44 55 66 77 bc bc", None,
     [A, "e1 33 44 55 66 77 bc bc"], 0, None, 1),
    ("9 left, no start byte, trailing idle", f"{A} 01 02 03 04 05 06 07 08 bc", None, [A], 0, None, 9),
    # -- 2: ORPHAN bytes at the start ---------------------------------------------
    ("orphans, no extra passed", f"67 78 bc {A}", None, [A], F.ORPHAN_BYTES_NOT_USED, None, 2),
    ("orphans after leading idles", f"bc bc 67 78 bc bc {A}", None, [A], F.ORPHAN_BYTES_NOT_USED, None, 2),
    ("orphans with padding inside", f"01 ff 02 bc {A}", None, [A], F.ORPHAN_BYTES_NOT_USED, None, 3),
    ("orphans matched", f"67 78 bc bc {A}", "e1 12 23 34 45 56", [B, A], F.ORPHAN_BYTES_MATCHED, None, 0),
    ("orphans not matching", f"67 78 {A}", "e1 12 23", [A], F.ORPHAN_BYTES_DROPPED, None, 2),
    ("empty extra passed, 8 orphans", f"01 02 03 04 05 06 07 08 {A}", "",
     ["01 02 03 04 05 06 07 08", A], F.ORPHAN_BYTES_MATCHED, None, 0),
    ("extra passed, data starts with a hit", f"{A}", "e1 12 23", [A], 0, None, 0),
    # -- do better #2: no valid start byte at all (all orphans) ----------------------
    ("all orphans, no extra", "01 02 03 bc", None, [], F.ORPHAN_BYTES_NOT_USED, None, 3),
    ("all orphans, extra not matching", "01 02 03", "e1 12", [], F.ORPHAN_BYTES_DROPPED, None, 3),
    ("all orphans completing the extra", "56 67 78 bc", "e1 12 23 34 45", [B], F.ORPHAN_BYTES_MATCHED, None, 0),
    ("orphans then extra", "01 02 bc e1 12 23", None, [],
     F.ORPHAN_BYTES_NOT_USED | F.VALID_EXTRA_BYTES, "e1 12 23", 2),
    # -- 3c: stray bytes between hits ----------------------------------------------
    ("stray bytes between hits", f"{A} 01 02 03 {B}", None, [A, B], 0, None, 3),
    ("stray bytes then short extra", f"{A} 01 02 03 04 05 06 07 08 e1 12 23", None, [A],
     F.VALID_EXTRA_BYTES, "e1 12 23", 8),
    ("stray bytes to the end", f"{A} 01 02 03 04 05 06 07 08 09", None, [A], 0, None, 9),
    ("stray bytes then exactly 8", f"{A} 01 02 03 04 05 06 07 08 {B}", None, [A, B], 0, None, 8),
    # -- 3d: start byte inside a word ------------------------------------------------
    ("truncated hit followed by a hit", f"e0 11 22 {B} bc {C}", None, [B, C], F.INCOMPLETE_HIT_DROPPED, None, 3),
    ("coincidence: a start byte follows", f"{D} {A}", None, [D, A], 0, None, 0),
    ("coincidence: idle then a start byte", f"{D} bc bc {A}", None, [D, A], 0, None, 0),
    ("coincidence: nothing follows", D, None, [D], 0, None, 0),
    ("coincidence: only idle follows", f"{D} bc bc", None, [D], 0, None, 0),
    # Padding is not skipped in the look-ahead: the word moves, and the scan
    # goes on at p + 1 of the new word (it does not restart at 1), finding e0.
    ("scan continues at p+1 after a move", f"{D} ff {A}", None, [A], F.INCOMPLETE_HIT_DROPPED, None, 9),
    # -- do better #3: never read past the end (moved word runs out) ---------------
    ("moved word would run past the end", "e0 11 22 e1 12 23 34 45 56", None, [],
     F.INCOMPLETE_HIT_DROPPED | F.VALID_EXTRA_BYTES, "e1 12 23 34 45 56", 3),
]

IDS = [c[0] for c in CASES]


def _expected_hits(words, readout_id=7, timestamp=123456789):
    out = np.zeros(len(words), dtype=HIT_DTYPE)
    for i, word in enumerate(words):
        for name, value in _reference.decode_word(h(word)).items():
            out[name][i] = value
        out["readout_id"][i] = readout_id
        out["timestamp"][i] = timestamp
        out["decoding_order"][i] = i
    return out


@pytest.mark.parametrize("name, data, extra, words, flags, kept, dropped", CASES, ids=IDS)
def test_reference_walk(name, data, extra, words, flags, kept, dropped):
    got_words, got_flags, extra_start, got_dropped = _reference.walk(h(data), None if extra is None else h(extra))
    assert [w.hex(" ") for w in got_words] == words
    assert DecodingStatus(got_flags) == flags
    assert (h(data)[extra_start:] if extra_start >= 0 else None) == (None if kept is None else h(kept))
    assert got_dropped == dropped


@pytest.mark.parametrize("name, data, extra, words, flags, kept, dropped", CASES, ids=IDS)
def test_compiled_decode_one(name, data, extra, words, flags, kept, dropped):
    raw = h(data)
    out = np.zeros(len(raw) // 8 + 1, dtype=HIT_DTYPE)
    n, got_flags, extra_start, got_dropped = _decode.decode_one(
        raw, None if extra is None else h(extra), 7, 123456789, out.view(np.uint8))
    assert (out[:n] == _expected_hits(words)).all()
    assert DecodingStatus(got_flags) == flags
    assert (raw[extra_start:] if extra_start >= 0 else None) == (None if kept is None else h(kept))
    assert got_dropped == dropped


@pytest.mark.parametrize("name, data, extra, words, flags, kept, dropped", CASES, ids=IDS)
def test_readout_class(name, data, extra, words, flags, kept, dropped):
    readout = AstroPix4Readout(h(data), 7, 123456789)
    if data.endswith("ff"):
        pytest.fail("table rows must not end with padding: the constructor strips it")
    hits = readout.decode(None if extra is None else h(extra))
    assert (hits.view(np.ndarray) == _expected_hits(words)).all()
    assert readout.decoding_status() == flags
    assert readout.extra_bytes() == (None if kept is None else h(kept))
    assert readout.dropped_bytes() == dropped


@pytest.mark.parametrize("name, data, extra, words, flags, kept, dropped", CASES, ids=IDS)
def test_batch_decoder(name, data, extra, words, flags, kept, dropped):
    datagram = AstroPix4Readout(h(data), 7, 123456789).to_bytes()
    batch = decode_readouts([datagram], extra_bytes=None if extra is None else h(extra))
    assert (batch.hits.view(np.ndarray) == _expected_hits(words)).all()
    row = batch.readouts[0]
    assert DecodingStatus(int(row.status)) == flags
    assert batch.extra_bytes == (None if kept is None else h(kept))
    assert row.n_extra == (0 if kept is None else len(h(kept)))
    assert row.dropped_bytes == dropped
    assert not row.malformed


def test_a_hit_split_across_two_readouts_is_reassembled_in_a_batch():
    first = AstroPix4Readout(h(f"bc {A} e1 12 23"), 1, 10).to_bytes()
    second = AstroPix4Readout(h(f"34 45 56 67 78 bc {C}"), 2, 20).to_bytes()
    batch = decode_readouts([first, second])
    assert batch.readouts.n_hits.tolist() == [1, 2]
    assert DecodingStatus(int(batch.readouts.status[0])) == F.VALID_EXTRA_BYTES
    assert DecodingStatus(int(batch.readouts.status[1])) == F.ORPHAN_BYTES_MATCHED
    split = batch.hits[1]
    # The reassembled hit belongs to the readout that completes it, first.
    assert (split.readout_id, split.timestamp, split.decoding_order) == (2, 20, 0)
    assert split.ts_coarse1 == _reference.decode_word(h(B))["ts_coarse1"]


def test_carry_modes():
    first = AstroPix4Readout(h(f"{A} e1 12 23"), 1, 10).to_bytes()
    after_gap = AstroPix4Readout(h(f"34 45 56 67 78 {C}"), 3, 30).to_bytes()
    assert decode_readouts([first, after_gap]).readouts.n_hits.tolist() == [1, 2]
    consecutive = decode_readouts([first, after_gap], carry="consecutive")
    assert consecutive.readouts.n_hits.tolist() == [1, 1]
    assert DecodingStatus(int(consecutive.readouts.status[1])) == F.ORPHAN_BYTES_NOT_USED
    never = decode_readouts([first, AstroPix4Readout(h(f"34 45 56 67 78 {C}"), 2, 20).to_bytes()], carry="never")
    assert never.readouts.n_hits.tolist() == [1, 1]
    # Across batches: extra bytes and last id of one batch feed the next.
    one = decode_readouts([first], carry="consecutive")
    two = decode_readouts([AstroPix4Readout(h("34 45 56 67 78"), 2, 20).to_bytes()],
                          extra_bytes=one.extra_bytes, last_id=one.last_id, carry="consecutive")
    assert len(two.hits) == 1 and two.readouts.status[0] == F.ORPHAN_BYTES_MATCHED


def test_padding_is_stripped_before_decoding():
    readout = AstroPix4Readout(h(f"{A} e1 12 ff ff ff"), 0, 0)
    assert readout.data() == h(f"{A} e1 12")
    readout.decode()
    assert readout.extra_bytes() == h("e1 12")
    # A datagram carrying padding that a non-conforming sender left in: the
    # batch decoder strips it the same way.
    import struct
    raw = h(f"{A} e1 12 ff ff ff")
    datagram = b"\xfe\xdc\xba" + struct.pack("<IQI", 0, 0, len(raw)) + raw
    batch = decode_readouts([datagram])
    assert batch.extra_bytes == h("e1 12") and batch.readouts.length[0] == 10


def test_eight_invalid_bytes_at_the_end_leave_nothing_for_the_next_readout():
    # Issue 7: the walk used to keep "e1 33 44 55 66 77" (after dropping
    # "01 02") as VALID_EXTRA, which the next readout's 2 orphans then turned
    # into a hit the reference decoder never produces.
    first = AstroPix4Readout(h(f"{A} 01 02 e1 33 44 55 66 77"), 1, 10).to_bytes()
    second = AstroPix4Readout(h(f"88 99 bc {C}"), 2, 20).to_bytes()
    batch = decode_readouts([first, second])
    assert batch.readouts.n_hits.tolist() == [1, 1]
    assert DecodingStatus(int(batch.readouts.status[0])) == F.INVALID_EXTRA_BYTES
    assert batch.readouts.n_extra.tolist() == [0, 0]
    assert batch.readouts.dropped_bytes.tolist() == [8, 2]
    assert DecodingStatus(int(batch.readouts.status[1])) == F.ORPHAN_BYTES_NOT_USED
    assert batch.hits.readout_id.tolist() == [1, 2]
    # The readout class, step by step, agrees.
    readout = AstroPix4Readout.from_bytes(first)
    readout.decode()
    assert readout.extra_bytes() is None
    nxt = AstroPix4Readout.from_bytes(second)
    assert len(nxt.decode(readout.extra_bytes())) == 1


def test_eight_bytes_before_trailing_padding_are_invalid_extra_bytes():
    # Trailing PADDING is stripped before the walk (by the readout class and
    # by the batch decoder alike), so 8 bytes before it are the last 8 bytes.
    import struct
    raw = h(f"{A} 01 02 e1 33 44 55 66 77 ff ff ff")
    readout = AstroPix4Readout(raw, 0, 0)
    assert len(readout.decode()) == 1
    assert readout.decoding_status() == F.INVALID_EXTRA_BYTES
    assert readout.extra_bytes() is None and readout.dropped_bytes() == 8
    # A non-conforming sender that left the padding in the datagram.
    datagram = b"\xfe\xdc\xba" + struct.pack("<IQI", 0, 0, len(raw)) + raw
    batch = decode_readouts([datagram])
    assert len(batch.hits) == 1 and batch.extra_bytes is None
    assert DecodingStatus(int(batch.readouts.status[0])) == F.INVALID_EXTRA_BYTES
    assert batch.readouts.length[0] == 16 and batch.readouts.dropped_bytes[0] == 8


_FILLER = st.lists(st.sampled_from([0xBC, 0xFF]), max_size=3).map(bytes)
# 8 bytes whose first is not IDLE/PADDING (step 3a would skip it).
_TAIL = st.tuples(st.integers(0, 255).filter(lambda b: b not in (0xBC, 0xFF)),
                  st.lists(st.integers(0, 255), min_size=7, max_size=7)).map(lambda t: bytes([t[0], *t[1]]))


@settings(max_examples=300, deadline=None)
@given(_FILLER, _TAIL)
def test_any_eight_bytes_after_the_last_hit(filler, tail):
    # Whatever 8 bytes follow the last hit (and IDLE/PADDING after it), spec
    # 3b applies to all 8 at once: a start byte first makes them a hit (do
    # better #4), anything else drops all 8 as INVALID extra bytes.
    data = h(A) + filler + tail
    if _reference._valid(tail[0]):
        expected = ([h(A), tail], 0, -1, 0)
    else:
        expected = ([h(A)], int(F.INVALID_EXTRA_BYTES), -1, 8)
    assert _reference.walk(data, None) == expected
    out = np.zeros(len(data) // 8 + 1, dtype=HIT_DTYPE)
    n, flags, extra_start, dropped = _decode.decode_one(data, None, 7, 123456789, out.view(np.uint8))
    assert (flags, extra_start, dropped) == expected[1:]
    assert (out[:n] == _expected_hits([w.hex(" ") for w in expected[0]])).all()


# -- offsets/lengths near 2**63 (issue 13, attack 2) ---------------------------

#: Where the mcast_trio under test comes from (installed, or a source tree
#: on PYTHONPATH): the child processes import the same one.
_ROOT = __import__("os").path.dirname(__import__("os").path.dirname(
    __import__("os").path.abspath(__import__("mcast_trio").__file__)))


def _run_child(code: str, decoder: str = "compiled"):
    import os
    import subprocess
    import sys
    import textwrap
    env = dict(os.environ, PYTHONPATH=_ROOT, MCAST_TRIO_DECODER=decoder)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("offset", [2**63 - 32, 2**63 - 16, 2**63 - 1])
def test_decode_readouts_huge_offset_is_a_value_error_not_a_segfault(offset):
    """offsets + lengths overflows int64 (numpy and the compiled check both
    add them in int64): the datagram is accepted as inside a 64-byte buffer
    and the compiled decoder reads ~2**63 bytes past it (SIGSEGV). The
    documented answer to a datagram outside the buffer is ValueError."""
    proc = _run_child(f"""
        import mcast_trio
        try:
            mcast_trio.decode_readouts(bytes(64), lengths=[32], offsets=[{offset}])
        except ValueError as exc:
            print("ValueError", exc)
        else:
            print("accepted")
    """)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])
    assert proc.stdout.startswith("ValueError"), proc.stdout


def test_decode_readouts_a_huge_length_gets_the_library_message():
    with pytest.raises(ValueError, match="outside the 64-byte buffer"):
        decode_readouts(bytes(64), lengths=[16, 2**63 - 1])


@pytest.mark.parametrize("decoder", ["compiled", "python"])
@pytest.mark.parametrize("offset, length", [(2**63 - 16, 32), (2**63 - 1, 1), (16, 2**63 - 1)])
def test_the_backend_row_check_does_not_wrap(decoder, offset, length):
    """Defence in depth: the backend's own row check (used by the trusted
    paths that skip the wrapper) must refuse rows whose end wraps in int64."""
    proc = _run_child(f"""
        import numpy as np
        from mcast_trio import _batch
        for call in (lambda: _batch.decode_trusted(memoryview(bytes(64)), np.array([{offset}]),
                                                   np.array([{length}]), None, -1, 1),
                     lambda: _batch.decode_chains(memoryview(bytes(64)), np.array([{offset}]),
                                                  np.array([{length}]), np.array([0]),
                                                  np.zeros(8, np.uint8), np.full(1, -1, np.int8),
                                                  np.full(1, -1, np.int64), 1)):
            try:
                call()
            except ValueError as exc:
                print("ValueError", exc)
            else:
                print("accepted")
    """, decoder)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(x.startswith("ValueError") for x in lines), proc.stdout
    if length < 64:  # a huge length is refused earlier, when the output is sized
        assert all("does not fit in the 64-byte buffer" in x for x in lines), proc.stdout
