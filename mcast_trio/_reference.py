"""Pure-Python reference implementation of the AstroPix 4 decoder.

This module is the test oracle for the compiled decoder (``_decode.pyx``) and
an explicit opt-in fallback (``MCAST_TRIO_DECODER=python``); it is never
selected silently. It follows ``astropix4-format.md`` line by line, written for
clarity rather than speed: every read is bounds-checked by construction
(slicing and explicit ``cur < n`` tests), so no input can make it index past
the end of the data.

The walk of section 5 is :func:`walk`; the field extraction of section 4 is
:func:`decode_word`; :func:`decode_batch` is the batch decoder with the same
contract as the compiled ``decode_batch``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from ._format import (
    CARRY_ALWAYS,
    CARRY_CONSECUTIVE,
    CARRY_NEVER,
    CLOCK_CYCLES_PER_US,
    CLOCK_ROLLOVER,
    HEADER,
    HEADER_SIZE,
    HIT_BIT_FIELDS,
    HIT_DTYPE,
    HIT_SIZE,
    IDLE_BYTE,
    PADDING_BYTE,
    READOUT_DTYPE,
    DecodingStatus,
    ReadoutError,
)

_REVERSE = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))
_FIXED = struct.Struct("<3sIQI")

_MATCHED = int(DecodingStatus.ORPHAN_BYTES_MATCHED)
_ORPHAN_DROPPED = int(DecodingStatus.ORPHAN_BYTES_DROPPED)
_NOT_USED = int(DecodingStatus.ORPHAN_BYTES_NOT_USED)
_VALID_EXTRA = int(DecodingStatus.VALID_EXTRA_BYTES)
_INVALID_EXTRA = int(DecodingStatus.INVALID_EXTRA_BYTES)
_INCOMPLETE = int(DecodingStatus.INCOMPLETE_HIT_DROPPED)

def _valid(byte: int) -> bool:
    return (byte >> 5) == 7 and byte != PADDING_BYTE


def _skippable(byte: int) -> bool:
    return byte == IDLE_BYTE or byte == PADDING_BYTE


def walk(data: bytes, extra: bytes | None):
    """Walk one readout's data (spec section 5).

    Args:
        data: the readout data, trailing padding already stripped.
        extra: the extra bytes carried from the previous readout, or None.

    Returns:
        ``(words, flags, extra_start, dropped)``: the 8-byte hit words in
        decoding order, the ``DecodingStatus`` bits, the offset in ``data``
        where the extra bytes kept for the next readout start (-1 if none:
        they are always a suffix of ``data``), and the number of data bytes
        dropped (orphans not matched, invalid extra bytes, stray bytes,
        truncated hits).
    """
    n = len(data)
    words: list[bytes] = []
    flags = 0
    dropped = 0
    extra_start = -1
    cur = 0
    # 1. Skip leading IDLE and PADDING bytes. Do better #1: nothing left is no
    #    hit and no error.
    while cur < n and _skippable(data[cur]):
        cur += 1
    if cur == n:
        return words, flags, extra_start, dropped
    # 2. Orphan bytes up to the next valid start byte (or the end: do better
    #    #2), trailing IDLE bytes excluded.
    if not _valid(data[cur]):
        end = cur + 1
        while end < n and not _valid(data[end]):
            end += 1
        orphan = data[cur:end].rstrip(b"\xbc")
        if extra is not None:
            if len(extra) + len(orphan) == HIT_SIZE:
                words.append(bytes(extra) + orphan)
                flags |= _MATCHED
            else:
                flags |= _ORPHAN_DROPPED
                dropped += len(orphan)
        else:
            flags |= _NOT_USED
            dropped += len(orphan)
        cur = end
    # 3. The main loop.
    while cur < n:
        # a. skip IDLE and PADDING bytes; stop at the end.
        while cur < n and _skippable(data[cur]):
            cur += 1
        if cur == n:
            break
        # b. 8 bytes or fewer left: EXTRA. Not beginning with a start byte:
        #    all of them are dropped, even exactly 8 (they are not walked as
        #    in c). Beginning with one: fewer than 8 are kept; exactly 8 are a
        #    complete word, a hit (do better #4): go on to d.
        if n - cur <= HIT_SIZE:
            if not _valid(data[cur]):
                flags |= _INVALID_EXTRA
                dropped += n - cur
                break
            if n - cur < HIT_SIZE:
                extra_start = cur
                flags |= _VALID_EXTRA
                break
        # c. not a start byte (more than 8 bytes left): drop bytes up to the
        #    next one, then go back to a/b (which stops at the end, keeps
        #    fewer than 8 as EXTRA or goes on with exactly 8 as a word).
        if not _valid(data[cur]):
            nxt = cur + 1
            while nxt < n and not _valid(data[nxt]):
                nxt += 1
            dropped += nxt - cur
            cur = nxt
            continue
        # d. scan positions 1..7 of the current word for a start byte.
        p = 1
        while p < HIT_SIZE:
            if _valid(data[cur + p]):
                fwd = cur + HIT_SIZE
                while fwd < n and data[fwd] == IDLE_BYTE:
                    fwd += 1
                if fwd < n and not _valid(data[fwd]):
                    flags |= _INCOMPLETE
                    dropped += p
                    cur += p
                    if n - cur < HIT_SIZE:
                        # Do better #3: the new word would run past the end of
                        # the data; it starts with a valid start byte, so it is
                        # kept as EXTRA, exactly as in b.
                        extra_start = cur
                        flags |= _VALID_EXTRA
                        return words, flags, extra_start, dropped
            p += 1
        # e. emit the current word, advance, skip IDLE bytes.
        words.append(data[cur:cur + HIT_SIZE])
        cur += HIT_SIZE
        while cur < n and data[cur] == IDLE_BYTE:
            cur += 1
    return words, flags, extra_start, dropped


def gray_to_binary(gray: int) -> int:
    """Convert a Gray-coded non-negative integer to binary."""
    value = gray
    mask = gray >> 1
    while mask:
        value ^= mask
        mask >>= 1
    return value


def decode_word(word: bytes) -> dict[str, int | float]:
    """Decode the 8 raw bytes of one hit into its fields (spec section 4)."""
    if len(word) != HIT_SIZE:
        raise ValueError(f"a hit word has {HIT_SIZE} bytes, got {len(word)}")
    value = int.from_bytes(word.translate(_REVERSE), "big")
    fields: dict[str, int | float] = {}
    for name, (start, stop) in HIT_BIT_FIELDS.items():
        fields[name] = (value >> (64 - stop)) & ((1 << (stop - start)) - 1)
    ts_dec1 = gray_to_binary((fields["ts_coarse1"] << 3) + fields["ts_fine1"])
    ts_dec2 = gray_to_binary((fields["ts_coarse2"] << 3) + fields["ts_fine2"])
    if ts_dec2 < ts_dec1:
        ts_dec2 += CLOCK_ROLLOVER
    fields["ts_dec1"] = ts_dec1
    fields["ts_dec2"] = ts_dec2
    fields["tot_us"] = (ts_dec2 - ts_dec1) / CLOCK_CYCLES_PER_US
    return fields


def encode_word(**fields: int) -> bytes:
    """Build the 8 raw bytes of a hit from its bit fields (inverse of decode).

    Every field of ``HIT_BIT_FIELDS`` may be given; missing ones are 0. Values
    must fit their width. Used by the simulator and the tests.
    """
    value = 0
    for name, (start, stop) in HIT_BIT_FIELDS.items():
        v = int(fields.pop(name, 0))
        width = stop - start
        if not 0 <= v < (1 << width):
            raise ValueError(f"{name}={v} does not fit in {width} bits (0..{(1 << width) - 1})")
        value |= v << (64 - stop)
    if fields:
        raise TypeError(f"unknown hit fields: {sorted(fields)}")
    return value.to_bytes(8, "big").translate(_REVERSE)


def _fill(records: np.ndarray, i: int, word: bytes, readout_id: int, timestamp: int, order: int):
    rec = records[i]
    for name, value in decode_word(word).items():
        rec[name] = value
    rec["readout_id"] = readout_id
    rec["timestamp"] = timestamp
    rec["decoding_order"] = order


def decode_data(data: bytes, extra: bytes | None, readout_id: int, timestamp: int):
    """Decode one readout's data; returns ``(hits, flags, extra_start, dropped)``.

    ``hits`` is a ``HIT_DTYPE`` array (not yet a recarray view).
    """
    words, flags, extra_start, dropped = walk(bytes(data), extra)
    hits = np.zeros(len(words), dtype=HIT_DTYPE)
    for i, word in enumerate(words):
        _fill(hits, i, word, readout_id, timestamp, i)
    return hits, flags, extra_start, dropped


def parse_fixed(datagram) -> tuple[int, int, int, int]:
    """Validate the fixed part of a serialized readout: the oracle's own
    parse, independent of ``_format.parse_readout_header`` (the tests compare
    the two).

    Returns ``(error, readout_id, timestamp, length)`` where ``error`` is a
    ``ReadoutError`` code; the other values are 0 unless the datagram is
    well formed.
    """
    size = len(datagram)
    if size < HEADER_SIZE:
        return ReadoutError.TOO_SHORT, 0, 0, 0
    header, readout_id, timestamp, length = _FIXED.unpack_from(datagram, 0)
    if header != HEADER:
        return ReadoutError.BAD_HEADER, 0, 0, 0
    if length != size - HEADER_SIZE:
        return ReadoutError.LENGTH_MISMATCH, 0, 0, 0
    return ReadoutError.OK, readout_id, timestamp, length


def decode_batch(datagrams: Sequence, extra: bytes | None = None,
                 carry: int = CARRY_ALWAYS, last_id: int = -1):
    """Reference batch decoder: same contract as ``_decode.decode_batch``.

    ``extra`` and ``last_id`` are the extra bytes and the readout id of the
    readout before the first datagram (from a previous batch), or None / -1.
    In ``CARRY_CONSECUTIVE`` mode extra bytes are carried only into the readout
    whose id follows (mod 2**32) the one that left them, when that is known.

    Returns ``(hits, readouts, extra_out, last_id)`` where ``extra_out`` is the
    extra bytes the chain carries on (None if none) and ``last_id`` the
    readout id of its last readout (-1: unknown). A malformed datagram leaves
    the chain as it was in ``CARRY_CONSECUTIVE`` mode (it is not the next
    readout; the id check decides) and breaks it in the other modes.
    """
    hits, readouts, state = decode_chains(datagrams, [0] * len(datagrams), [(extra, last_id)], carry)
    return hits, readouts, state[0][0], state[0][1]


def decode_chains(datagrams: Sequence, chain: Sequence[int], state: Sequence[tuple[bytes | None, int]],
                  carry: int = CARRY_ALWAYS):
    """Reference multi-chain decoder: same contract as
    ``_decode.decode_chains``. Datagram ``k`` belongs to carry chain
    ``chain[k]``; ``state[g]`` is chain ``g``'s ``(extra, last_id)`` before
    the first datagram. Rows stay in arrival order.

    Returns ``(hits, readouts, state_out)``: ``state_out[g]`` is chain
    ``g``'s ``(extra, last_id)`` after the last datagram.
    """
    state = list(state)
    readouts = np.zeros(len(datagrams), dtype=READOUT_DTYPE)
    all_words: list[tuple[bytes, int, int, int]] = []
    for k, datagram in enumerate(datagrams):
        g = chain[k]
        extra, last_id = state[g]
        datagram = bytes(datagram)
        row = readouts[k]
        error, readout_id, timestamp, _length = parse_fixed(datagram)
        row["first_hit"] = len(all_words)
        if error:
            row["malformed"] = True
            row["error"] = error
            if carry != CARRY_CONSECUTIVE:
                state[g] = (None, -1)
            continue
        data = datagram[HEADER_SIZE:].rstrip(b"\xff")
        if carry == CARRY_NEVER or (
            carry == CARRY_CONSECUTIVE and last_id >= 0 and (last_id + 1) & 0xFFFFFFFF != readout_id
        ):
            extra = None
        words, flags, extra_start, dropped = walk(data, extra)
        for order, word in enumerate(words):
            all_words.append((word, readout_id, timestamp, order))
        row["readout_id"] = readout_id
        row["timestamp"] = timestamp
        row["length"] = len(data)
        row["n_hits"] = len(words)
        row["status"] = flags
        row["dropped_bytes"] = dropped
        if extra_start >= 0:
            extra = data[extra_start:]
            row["n_extra"] = len(extra)
        else:
            extra = None
        state[g] = (extra, readout_id)
    hits = np.zeros(len(all_words), dtype=HIT_DTYPE)
    for i, (word, readout_id, timestamp, order) in enumerate(all_words):
        _fill(hits, i, word, readout_id, timestamp, order)
    return hits, readouts, state
