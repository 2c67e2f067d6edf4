# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled AstroPix 4 decoder: the hot path of mcast_trio.

Two entry points, both thin: they validate their arguments with the GIL held,
then run a ``nogil`` C loop that writes records straight into numpy arrays the
caller allocated once (see ``_batch.py``):

* :func:`decode_one` decodes the data of one readout (used by
  ``AstroPix4Readout.decode``);
* :func:`decode_batch` decodes many serialized readouts held in one contiguous
  buffer (``offsets``/``lengths`` per datagram), carrying extra bytes from each
  readout to the next, skipping (and reporting) malformed datagrams;
* :func:`decode_chains` does the same for readouts of several senders mixed
  in arrival order, each sender carrying on its own chain.

Every byte read is preceded by an explicit bounds test against the datagram's
own length: the input is untrusted network data. The walk mirrors
``_reference.walk`` line by line; the property tests compare the two. The
readout header is parsed by ``_readout_header.pxd``, its one C owner.
"""

from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove

from mcast_trio._readout_header cimport (
    READOUT_BAD_HEADER, READOUT_HEADER_SIZE, READOUT_LENGTH_MISMATCH, READOUT_LENGTH_OFFSET,
    READOUT_MAGIC_0, READOUT_MAGIC_1, READOUT_MAGIC_2, READOUT_OK, READOUT_TOO_SHORT,
    parse_readout_header)

import numpy as np


cdef packed struct HitRec:
    uint64_t timestamp
    double tot_us
    uint32_t readout_id
    uint32_t decoding_order
    uint32_t ts_dec1
    uint32_t ts_dec2
    uint16_t ts_coarse1
    uint16_t ts_coarse2
    uint8_t chip_id
    uint8_t payload
    uint8_t row
    uint8_t column
    uint8_t ts_neg1
    uint8_t ts_fine1
    uint8_t ts_tdc1
    uint8_t ts_neg2
    uint8_t ts_fine2
    uint8_t ts_tdc2
    uint8_t _pad0
    uint8_t _pad1


cdef packed struct ReadoutRec:
    uint64_t timestamp
    uint64_t first_hit
    uint32_t readout_id
    uint32_t n_hits
    uint32_t length
    uint32_t dropped_bytes
    uint8_t n_extra
    uint8_t status
    uint8_t malformed
    uint8_t error
    uint8_t _pad[4]


# DecodingStatus bits (see _format.DecodingStatus).
DEF F_MATCHED = 1
DEF F_ORPHAN_DROPPED = 2
DEF F_NOT_USED = 4
DEF F_VALID_EXTRA = 8
DEF F_INVALID_EXTRA = 16
DEF F_INCOMPLETE = 32

DEF IDLE = 0xBC
DEF PAD = 0xFF

# Carry modes (see _format.CARRY_*).
DEF CARRY_ALWAYS = 0
DEF CARRY_CONSECUTIVE = 1
DEF CARRY_NEVER = 2


cdef inline bint _valid(uint8_t b) noexcept nogil:
    return b >= 0xE0 and b != PAD


cdef inline bint _skippable(uint8_t b) noexcept nogil:
    return b == IDLE or b == PAD


cdef inline uint32_t _gray(uint32_t g) noexcept nogil:
    g ^= g >> 16
    g ^= g >> 8
    g ^= g >> 4
    g ^= g >> 2
    g ^= g >> 1
    return g


cdef inline uint64_t _load_le64(const uint8_t* w) noexcept nogil:
    # Compilers turn this into one unaligned load on little-endian machines.
    return ((<uint64_t>w[0]) | (<uint64_t>w[1] << 8) | (<uint64_t>w[2] << 16)
            | (<uint64_t>w[3] << 24) | (<uint64_t>w[4] << 32) | (<uint64_t>w[5] << 40)
            | (<uint64_t>w[6] << 48) | (<uint64_t>w[7] << 56))


cdef inline bint _maybe_start_inside(uint64_t x) noexcept nogil:
    # True if any of bytes 1..7 of the word is >= 0xE0 (a superset of the
    # valid start bytes: 0xFF is included; the exact test follows).
    cdef uint64_t y = ((x & 0xE0E0E0E0E0E0E0E0ULL) ^ 0xE0E0E0E0E0E0E0E0ULL) | 0xFFULL
    return ((y - 0x0101010101010101ULL) & ~y & 0x8080808080808080ULL) != 0


cdef inline void _fill(HitRec* h, const uint8_t* w, uint32_t readout_id,
                       uint64_t timestamp, uint32_t order) noexcept nogil:
    _fill_word(h, _load_le64(w), readout_id, timestamp, order)


cdef inline void _fill_word(HitRec* h, uint64_t x, uint32_t readout_id,
                            uint64_t timestamp, uint32_t order) noexcept nogil:
    # Reverse the bits of every byte and read big-endian: that is a full
    # 64-bit bit reversal of the little-endian word.
    x = ((x >> 1) & 0x5555555555555555ULL) | ((x & 0x5555555555555555ULL) << 1)
    x = ((x >> 2) & 0x3333333333333333ULL) | ((x & 0x3333333333333333ULL) << 2)
    x = ((x >> 4) & 0x0F0F0F0F0F0F0F0FULL) | ((x & 0x0F0F0F0F0F0F0F0FULL) << 4)
    x = ((x >> 8) & 0x00FF00FF00FF00FFULL) | ((x & 0x00FF00FF00FF00FFULL) << 8)
    x = ((x >> 16) & 0x0000FFFF0000FFFFULL) | ((x & 0x0000FFFF0000FFFFULL) << 16)
    x = (x >> 32) | (x << 32)
    # Field [start, stop) of the spec is (W >> (64 - stop)) & mask.
    cdef uint32_t coarse1 = <uint32_t>((x >> 31) & 0x3FFF)
    cdef uint32_t fine1 = <uint32_t>((x >> 28) & 0x7)
    cdef uint32_t coarse2 = <uint32_t>((x >> 8) & 0x3FFF)
    cdef uint32_t fine2 = <uint32_t>((x >> 5) & 0x7)
    cdef uint32_t dec1 = _gray((coarse1 << 3) + fine1)
    cdef uint32_t dec2 = _gray((coarse2 << 3) + fine2)
    if dec2 < dec1:
        dec2 += 131072
    h.timestamp = timestamp
    h.tot_us = (<double>(dec2 - dec1)) / 20.0
    h.readout_id = readout_id
    h.decoding_order = order
    h.ts_dec1 = dec1
    h.ts_dec2 = dec2
    h.ts_coarse1 = <uint16_t>coarse1
    h.ts_coarse2 = <uint16_t>coarse2
    h.chip_id = <uint8_t>((x >> 59) & 0x1F)
    h.payload = <uint8_t>((x >> 56) & 0x7)
    h.row = <uint8_t>((x >> 51) & 0x1F)
    h.column = <uint8_t>((x >> 46) & 0x1F)
    h.ts_neg1 = <uint8_t>((x >> 45) & 0x1)
    h.ts_fine1 = <uint8_t>fine1
    h.ts_tdc1 = <uint8_t>((x >> 23) & 0x1F)
    h.ts_neg2 = <uint8_t>((x >> 22) & 0x1)
    h.ts_fine2 = <uint8_t>fine2
    h.ts_tdc2 = <uint8_t>(x & 0x1F)
    h._pad0 = 0
    h._pad1 = 0


cdef Py_ssize_t _walk(const uint8_t* d, Py_ssize_t n,
                      const uint8_t* extra, Py_ssize_t extra_len, bint has_extra,
                      uint32_t readout_id, uint64_t timestamp, HitRec* out,
                      uint8_t* flags_out, Py_ssize_t* extra_start_out,
                      Py_ssize_t* dropped_out) noexcept nogil:
    """Spec section 5 on ``d[0:n]``; returns the number of hits written."""
    cdef Py_ssize_t cur = 0
    cdef Py_ssize_t end, nxt, fwd, p, olen
    cdef uint64_t x
    cdef Py_ssize_t nh = 0
    cdef Py_ssize_t dropped = 0
    cdef Py_ssize_t extra_start = -1
    cdef uint8_t flags = 0
    cdef uint8_t word[8]
    # 1. leading IDLE/PADDING; nothing left: no hit, no flag (do better #1).
    while cur < n and _skippable(d[cur]):
        cur += 1
    if cur < n and not _valid(d[cur]):
        # 2. orphan bytes, up to the next start byte or the end (do better #2),
        #    trailing IDLE bytes excluded. d[cur] is neither IDLE nor PADDING,
        #    so olen >= 1.
        end = cur + 1
        while end < n and not _valid(d[end]):
            end += 1
        olen = end - cur
        while olen > 0 and d[cur + olen - 1] == IDLE:
            olen -= 1
        if has_extra:
            if extra_len + olen == 8:
                if extra_len > 0:  # extra may be NULL when empty: memcpy(NULL) is UB
                    memcpy(word, extra, extra_len)
                memcpy(word + extra_len, d + cur, olen)
                _fill(&out[nh], word, readout_id, timestamp, <uint32_t>nh)
                nh += 1
                flags |= F_MATCHED
            else:
                flags |= F_ORPHAN_DROPPED
                dropped += olen
        else:
            flags |= F_NOT_USED
            dropped += olen
        cur = end
    # 3. main loop.
    while cur < n:
        # a.
        while cur < n and _skippable(d[cur]):
            cur += 1
        if cur == n:
            break
        # b. 8 bytes or fewer left: EXTRA. No start byte first: all dropped,
        #    even exactly 8. A start byte first: fewer than 8 are kept; exactly
        #    8 are a complete word, a hit (do better #4): go on to d.
        if n - cur <= 8:
            if not _valid(d[cur]):
                flags |= F_INVALID_EXTRA
                dropped += n - cur
                break
            if n - cur < 8:
                extra_start = cur
                flags |= F_VALID_EXTRA
                break
        # c. stray bytes (more than 8 left) up to the next start byte.
        if not _valid(d[cur]):
            nxt = cur + 1
            while nxt < n and not _valid(d[nxt]):
                nxt += 1
            dropped += nxt - cur
            cur = nxt
            continue
        # d. a start byte inside the word followed by a non-start byte means
        #    the word was a truncated hit: drop its first p bytes. What follows
        #    the word is the same for every p until the word moves, so look
        #    once; the exact scan runs only when both tests say it may move.
        x = _load_le64(d + cur)
        fwd = cur + 8
        while fwd < n and d[fwd] == IDLE:
            fwd += 1
        if not (fwd < n and not _valid(d[fwd]) and _maybe_start_inside(x)):
            # e. (fast path) emit, advance by 8, skip IDLE bytes.
            _fill_word(&out[nh], x, readout_id, timestamp, <uint32_t>nh)
            nh += 1
            cur = fwd
            continue
        p = 1
        while p < 8:
            if _valid(d[cur + p]):
                fwd = cur + 8
                while fwd < n and d[fwd] == IDLE:
                    fwd += 1
                if fwd < n and not _valid(d[fwd]):
                    flags |= F_INCOMPLETE
                    dropped += p
                    cur += p
                    if n - cur < 8:
                        # do better #3: never read past the end; keep as EXTRA.
                        extra_start = cur
                        flags |= F_VALID_EXTRA
                        flags_out[0] = flags
                        extra_start_out[0] = extra_start
                        dropped_out[0] = dropped
                        return nh
            p += 1
        # e.
        _fill(&out[nh], d + cur, readout_id, timestamp, <uint32_t>nh)
        nh += 1
        cur += 8
        while cur < n and d[cur] == IDLE:
            cur += 1
    flags_out[0] = flags
    extra_start_out[0] = extra_start
    dropped_out[0] = dropped
    return nh


cdef HitRec _probe_hit
cdef ReadoutRec _probe_readout


def _layout():
    """Byte offsets of the C records, and the readout header constants and
    carry modes compiled in: ``_backend`` checks them against ``_format``."""
    cdef char* h = <char*>&_probe_hit
    cdef char* r = <char*>&_probe_readout
    return {
        "hit_size": sizeof(HitRec),
        "readout_size": sizeof(ReadoutRec),
        "hit": {
            "timestamp": <char*>&_probe_hit.timestamp - h,
            "tot_us": <char*>&_probe_hit.tot_us - h,
            "readout_id": <char*>&_probe_hit.readout_id - h,
            "decoding_order": <char*>&_probe_hit.decoding_order - h,
            "ts_dec1": <char*>&_probe_hit.ts_dec1 - h,
            "ts_dec2": <char*>&_probe_hit.ts_dec2 - h,
            "ts_coarse1": <char*>&_probe_hit.ts_coarse1 - h,
            "ts_coarse2": <char*>&_probe_hit.ts_coarse2 - h,
            "chip_id": <char*>&_probe_hit.chip_id - h,
            "payload": <char*>&_probe_hit.payload - h,
            "row": <char*>&_probe_hit.row - h,
            "column": <char*>&_probe_hit.column - h,
            "ts_neg1": <char*>&_probe_hit.ts_neg1 - h,
            "ts_fine1": <char*>&_probe_hit.ts_fine1 - h,
            "ts_tdc1": <char*>&_probe_hit.ts_tdc1 - h,
            "ts_neg2": <char*>&_probe_hit.ts_neg2 - h,
            "ts_fine2": <char*>&_probe_hit.ts_fine2 - h,
            "ts_tdc2": <char*>&_probe_hit.ts_tdc2 - h,
        },
        "readout": {
            "timestamp": <char*>&_probe_readout.timestamp - r,
            "first_hit": <char*>&_probe_readout.first_hit - r,
            "readout_id": <char*>&_probe_readout.readout_id - r,
            "n_hits": <char*>&_probe_readout.n_hits - r,
            "length": <char*>&_probe_readout.length - r,
            "dropped_bytes": <char*>&_probe_readout.dropped_bytes - r,
            "n_extra": <char*>&_probe_readout.n_extra - r,
            "status": <char*>&_probe_readout.status - r,
            "malformed": <char*>&_probe_readout.malformed - r,
            "error": <char*>&_probe_readout.error - r,
        },
        "readout_header": {
            "magic": bytes([READOUT_MAGIC_0, READOUT_MAGIC_1, READOUT_MAGIC_2]),
            "size": READOUT_HEADER_SIZE,
            "length_offset": READOUT_LENGTH_OFFSET,
            "errors": {
                "OK": READOUT_OK,
                "TOO_SHORT": READOUT_TOO_SHORT,
                "BAD_HEADER": READOUT_BAD_HEADER,
                "LENGTH_MISMATCH": READOUT_LENGTH_MISMATCH,
            },
        },
        "carry": {"CARRY_ALWAYS": CARRY_ALWAYS, "CARRY_CONSECUTIVE": CARRY_CONSECUTIVE,
                  "CARRY_NEVER": CARRY_NEVER},
    }


def decode_one(const uint8_t[::1] data, extra, uint32_t readout_id,
               uint64_t timestamp, uint8_t[::1] hits_out):
    """Decode the data of one readout into ``hits_out``.

    Args:
        data: the readout data (trailing padding already stripped).
        extra: extra bytes from the previous readout (bytes-like), or None.
        readout_id, timestamp: copied into every hit.
        hits_out: raw bytes of a ``HIT_DTYPE`` array with room for at least
            ``len(data) // 8 + 1`` records.

    Returns:
        ``(n_hits, flags, extra_start, dropped)``; ``extra_start`` is -1 when
        no extra bytes are kept, else the offset in ``data`` where they start.
    """
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t capacity = hits_out.shape[0] // sizeof(HitRec)
    if capacity < n // 8 + 1:
        raise ValueError(f"hits_out has room for {capacity} hits, need {n // 8 + 1}")
    cdef const uint8_t[::1] extra_view
    cdef const uint8_t* extra_ptr = NULL
    cdef Py_ssize_t extra_len = 0
    cdef bint has_extra = extra is not None
    if has_extra:
        extra_view = extra
        extra_len = extra_view.shape[0]
        if extra_len > 0:
            extra_ptr = &extra_view[0]
    cdef const uint8_t* dptr = &data[0] if n > 0 else NULL
    cdef HitRec* out = <HitRec*>&hits_out[0]
    cdef uint8_t flags = 0
    cdef Py_ssize_t extra_start = -1
    cdef Py_ssize_t dropped = 0
    cdef Py_ssize_t nh
    with nogil:
        nh = _walk(dptr, n, extra_ptr, extra_len, has_extra, readout_id, timestamp,
                   out, &flags, &extra_start, &dropped)
    return nh, flags, extra_start, dropped


cdef Py_ssize_t _decode_rows(const uint8_t* base, const int64_t* offsets,
                             const int64_t* lengths, Py_ssize_t count, const int64_t* chain,
                             const uint8_t** carry_ptr, Py_ssize_t* carry_len,
                             uint8_t* has_carry, int64_t* last_id, int carry,
                             HitRec* out, ReadoutRec* rows) noexcept nogil:
    """Decode ``count`` datagrams in arrival order; row ``k`` belongs to the
    carry chain ``chain[k]`` (``chain`` NULL: every row to chain 0), whose
    state (extra bytes, readout id of its last readout) is kept in the
    per-chain arrays. A malformed row leaves its chain as it was in
    ``CARRY_CONSECUTIVE`` mode (it is not the next readout: the id check
    decides what carries) and breaks it otherwise. Returns the hit count."""
    cdef Py_ssize_t k, g = 0
    cdef Py_ssize_t nh = 0
    cdef Py_ssize_t got, dn, extra_start, dropped
    cdef const uint8_t* dg
    cdef int64_t dglen
    cdef uint32_t rid = 0
    cdef uint64_t ts = 0
    cdef int error
    cdef uint8_t flags
    cdef ReadoutRec* row
    for k in range(count):
        if chain != NULL:
            g = chain[k]
        row = &rows[k]
        row.first_hit = <uint64_t>nh
        dg = base + offsets[k]
        dglen = lengths[k]
        error = parse_readout_header(dg, <Py_ssize_t>dglen, &rid, &ts)
        if error != READOUT_OK:
            row.malformed = 1
            row.error = <uint8_t>error
            if carry != CARRY_CONSECUTIVE:
                # Adjacency is all "always" goes by: unknown past a datagram
                # we could not read.
                has_carry[g] = 0
                carry_len[g] = 0
                last_id[g] = -1
            continue
        dn = dglen - READOUT_HEADER_SIZE
        while dn > 0 and dg[READOUT_HEADER_SIZE + dn - 1] == PAD:
            dn -= 1
        if carry == CARRY_NEVER or (
                carry == CARRY_CONSECUTIVE and last_id[g] >= 0
                and <uint32_t>(last_id[g] + 1) != rid):
            has_carry[g] = 0
            carry_len[g] = 0
        got = _walk(dg + READOUT_HEADER_SIZE, dn, carry_ptr[g], carry_len[g], has_carry[g],
                    rid, ts, out + nh, &flags, &extra_start, &dropped)
        row.readout_id = rid
        row.timestamp = ts
        row.length = <uint32_t>dn
        row.n_hits = <uint32_t>got
        row.status = flags
        row.dropped_bytes = <uint32_t>dropped
        nh += got
        if extra_start >= 0:
            has_carry[g] = 1
            carry_ptr[g] = dg + READOUT_HEADER_SIZE + extra_start
            carry_len[g] = dn - extra_start
            row.n_extra = <uint8_t>carry_len[g]
        else:
            has_carry[g] = 0
            carry_len[g] = 0
        last_id[g] = rid
    return nh


cdef int64_t _check_rows(Py_ssize_t size, const int64_t[::1] offsets, const int64_t[::1] lengths,
                         uint8_t[::1] hits_out, uint8_t[::1] readouts_out) except -1:
    """Check every datagram against the buffer and the output room."""
    cdef Py_ssize_t count = lengths.shape[0]
    cdef Py_ssize_t k
    cdef int64_t bound = count
    if offsets.shape[0] != count:
        raise ValueError(f"offsets has {offsets.shape[0]} entries but lengths has {count}")
    for k in range(count):
        # offset + length could wrap in int64: compare without adding them.
        if lengths[k] < 0 or offsets[k] < 0 or lengths[k] > size or offsets[k] > size - lengths[k]:
            raise ValueError(
                f"datagram {k} (offset {offsets[k]}, length {lengths[k]}) "
                f"does not fit in the {size}-byte buffer")
        bound += lengths[k] // 8
    if <int64_t>(hits_out.shape[0] // sizeof(HitRec)) < bound:
        raise ValueError(f"hits_out has room for {hits_out.shape[0] // sizeof(HitRec)} hits, need {bound}")
    if <Py_ssize_t>(readouts_out.shape[0] // sizeof(ReadoutRec)) < count:
        raise ValueError(f"readouts_out has room for {readouts_out.shape[0] // sizeof(ReadoutRec)} rows, need {count}")
    return 0


def decode_batch(const uint8_t[::1] buf, const int64_t[::1] offsets,
                 const int64_t[::1] lengths, extra, int carry, int64_t last_id,
                 uint8_t[::1] hits_out, uint8_t[::1] readouts_out):
    """Decode serialized readouts ``buf[offsets[k]:offsets[k] + lengths[k]]``
    as one carry chain.

    Args:
        buf: one contiguous buffer holding all datagrams.
        offsets, lengths: per-datagram position and size in ``buf``.
        extra: extra bytes left by the readout before the first datagram, or
            None.
        carry: carry mode (0 always, 1 only into the next consecutive
            readout id, 2 never).
        last_id: readout id of the readout that left ``extra`` (-1: unknown).
        hits_out: raw bytes of a ``HIT_DTYPE`` array with room for at least
            ``sum(lengths // 8) + len(lengths)`` records.
        readouts_out: raw bytes of a ``READOUT_DTYPE`` array of
            ``len(lengths)`` zeroed records.

    Returns:
        ``(n_hits, extra_out, last_id)``: the number of hits written, the
        extra bytes the chain carries on (bytes or None) and the readout id
        of its last readout (-1: unknown). A malformed datagram leaves the
        chain as it was in consecutive mode and breaks it in the others.
    """
    cdef Py_ssize_t count = lengths.shape[0]
    cdef Py_ssize_t size = buf.shape[0]
    _check_rows(size, offsets, lengths, hits_out, readouts_out)
    if carry < CARRY_ALWAYS or carry > CARRY_NEVER:
        raise ValueError(f"carry={carry} is not a carry mode (0, 1 or 2)")

    cdef bytes extra_in = bytes(extra) if extra is not None else None
    cdef const uint8_t* carry_ptr = NULL
    cdef Py_ssize_t carry_len = 0
    cdef uint8_t has_carry = extra_in is not None
    if has_carry:
        carry_len = len(extra_in)
        carry_ptr = <const uint8_t*><char*>extra_in
    cdef const uint8_t* base = &buf[0] if size > 0 else NULL
    cdef HitRec* out = <HitRec*>&hits_out[0] if hits_out.shape[0] > 0 else NULL
    cdef ReadoutRec* rows = <ReadoutRec*>&readouts_out[0] if count > 0 else NULL
    cdef Py_ssize_t nh
    with nogil:
        nh = _decode_rows(base, &offsets[0] if count > 0 else NULL,
                          &lengths[0] if count > 0 else NULL, count, NULL,
                          &carry_ptr, &carry_len, &has_carry, &last_id, carry, out, rows)
    cdef object extra_out = None
    if has_carry:
        extra_out = bytes((<const char*>carry_ptr)[:carry_len]) if carry_len > 0 else b""
    return nh, extra_out, last_id


def decode_chains(const uint8_t[::1] buf, const int64_t[::1] offsets,
                  const int64_t[::1] lengths, const int64_t[::1] chain,
                  uint8_t[::1] extras, int8_t[::1] extra_lens, int64_t[::1] last_ids,
                  int carry, uint8_t[::1] hits_out, uint8_t[::1] readouts_out):
    """Decode serialized readouts of several carry chains (senders) in one
    pass, rows in arrival order: row ``k`` belongs to chain ``chain[k]``.

    Args:
        buf, offsets, lengths, carry, hits_out, readouts_out: as
            :func:`decode_batch`.
        chain: per row, its chain ``0 <= g < len(last_ids)``.
        extras: ``8 * len(last_ids)`` bytes, chain ``g``'s extra bytes at
            ``extras[8 * g:8 * g + extra_lens[g]]``.
        extra_lens: per chain, the number of its extra bytes (0..8), -1 for
            none.
        last_ids: per chain, the readout id of its last readout (-1:
            unknown).

    ``extras``, ``extra_lens`` and ``last_ids`` are read as the chains'
    initial state and overwritten with their final state.

    Returns:
        The number of hits written.
    """
    cdef Py_ssize_t count = lengths.shape[0]
    cdef Py_ssize_t size = buf.shape[0]
    cdef Py_ssize_t chains = last_ids.shape[0]
    cdef Py_ssize_t k, g
    _check_rows(size, offsets, lengths, hits_out, readouts_out)
    if carry < CARRY_ALWAYS or carry > CARRY_NEVER:
        raise ValueError(f"carry={carry} is not a carry mode (0, 1 or 2)")
    if chain.shape[0] != count:
        raise ValueError(f"chain has {chain.shape[0]} entries but lengths has {count}")
    if extra_lens.shape[0] != chains or extras.shape[0] != 8 * chains:
        raise ValueError(f"extras/extra_lens do not describe {chains} chains")
    for k in range(count):
        if chain[k] < 0 or chain[k] >= chains:
            raise ValueError(f"chain[{k}]={chain[k]} is not one of the {chains} chains")
    for g in range(chains):
        if extra_lens[g] < -1 or extra_lens[g] > 8:
            raise ValueError(f"extra_lens[{g}]={extra_lens[g]}; allowed: -1..8")
    if chains == 0:
        return 0
    carry_ptr_a = np.empty(chains, dtype=np.uintp)
    carry_len_a = np.empty(chains, dtype=np.intp)
    has_carry_a = np.empty(chains, dtype=np.uint8)
    cdef size_t[::1] ptr_view = carry_ptr_a
    cdef Py_ssize_t[::1] len_view = carry_len_a
    cdef uint8_t[::1] has_view = has_carry_a
    cdef const uint8_t** carry_ptr = <const uint8_t**>&ptr_view[0]
    cdef Py_ssize_t* carry_len = &len_view[0]
    cdef uint8_t* has_carry = &has_view[0]
    cdef uint8_t* slots = &extras[0]
    for g in range(chains):
        has_carry[g] = extra_lens[g] >= 0
        carry_len[g] = extra_lens[g] if extra_lens[g] > 0 else 0
        carry_ptr[g] = slots + 8 * g
    cdef const uint8_t* base = &buf[0] if size > 0 else NULL
    cdef HitRec* out = <HitRec*>&hits_out[0] if hits_out.shape[0] > 0 else NULL
    cdef ReadoutRec* rows = <ReadoutRec*>&readouts_out[0] if count > 0 else NULL
    cdef Py_ssize_t nh
    with nogil:
        nh = _decode_rows(base, &offsets[0] if count > 0 else NULL,
                          &lengths[0] if count > 0 else NULL, count, &chain[0] if count > 0 else NULL,
                          carry_ptr, carry_len, has_carry, &last_ids[0], carry, out, rows)
        for g in range(chains):
            if has_carry[g]:
                # Extra bytes are at most 7 (a walk keeps fewer than 8) or
                # the 8 given: they fit the chain's slot.
                if carry_len[g] > 0 and carry_ptr[g] != slots + 8 * g:
                    memmove(slots + 8 * g, carry_ptr[g], carry_len[g])
                extra_lens[g] = <int8_t>carry_len[g]
            else:
                extra_lens[g] = -1
    return nh
