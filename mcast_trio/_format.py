"""Constants, dtypes and flags of the AstroPix 4 readout format.

Everything here is pure data: the byte values of the stream, the layout of a
serialized readout (one datagram, one ``.apx`` record), the public numpy dtypes
of decoded hits and per-readout rows, and the decoding status flags. Both
decoder backends (the compiled one in ``_decode.pyx`` and the pure-Python
reference in ``_reference.py``) take their layout from here, and the compiled
one checks at import time that it agrees.
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "IDLE_BYTE",
    "PADDING_BYTE",
    "HIT_SIZE",
    "READOUT_UID",
    "HIT_DTYPE",
    "READOUT_DTYPE",
    "DecodingStatus",
    "ReadoutError",
    "is_valid_start_byte",
]

#: The three bytes every serialized readout starts with.
HEADER = b"\xfe\xdc\xba"
#: Size of the fixed part of a serialized readout: header, readout id (u32),
#: timestamp (u64), data length (u32); all little-endian.
HEADER_SIZE = 19
#: Byte the chip emits between hits.
IDLE_BYTE = 0xBC
#: Byte the board pads a readout with (also seen interleaved with idle bytes).
PADDING_BYTE = 0xFF
#: Size of one hit in the readout data.
HIT_SIZE = 8
#: The ``readout_uid`` of AstroPix 4 in ``.apx`` file headers.
READOUT_UID = 4000
#: Rollover of the 17-bit decoded timestamp counters.
CLOCK_ROLLOVER = 2**17
#: Clock cycles per microsecond of the timestamp counters.
CLOCK_CYCLES_PER_US = 20.0


def is_valid_start_byte(byte: int) -> bool:
    """Return True if ``byte`` (an int) is a valid hit start byte.

    A start byte has the form ``111xxxxx`` (the low five bits are the chip id),
    except ``0xff``, which is the padding byte.
    """
    return (byte >> 5) == 7 and byte != PADDING_BYTE


# The hit dtype. The field *order* (``HIT_DTYPE.names``) is the column order of
# the reference decoder's CSV files; the *offsets* are chosen so that every
# field is naturally aligned, which makes column access fast. The compiled
# decoder writes records with exactly this layout (it checks at import).
_HIT_FIELDS = [
    # name, format, offset
    ("chip_id", "u1", 36),
    ("payload", "u1", 37),
    ("readout_id", "<u4", 16),
    ("timestamp", "<u8", 0),
    ("decoding_order", "<u4", 20),
    ("row", "u1", 38),
    ("column", "u1", 39),
    ("ts_neg1", "u1", 40),
    ("ts_coarse1", "<u2", 32),
    ("ts_fine1", "u1", 41),
    ("ts_tdc1", "u1", 42),
    ("ts_neg2", "u1", 43),
    ("ts_coarse2", "<u2", 34),
    ("ts_fine2", "u1", 44),
    ("ts_tdc2", "u1", 45),
    ("ts_dec1", "<u4", 24),
    ("ts_dec2", "<u4", 28),
    ("tot_us", "<f8", 8),
]

#: numpy dtype of one decoded hit: every field of the spec's hit table plus
#: ``readout_id``, ``timestamp``, ``decoding_order``, ``ts_dec1``, ``ts_dec2``
#: and ``tot_us``. Arrays of hits are returned as ``numpy.recarray`` so that
#: ``hits.tot_us``, ``hits['row']`` and ``hit.column`` all work.
HIT_DTYPE = np.dtype(
    {
        "names": [f[0] for f in _HIT_FIELDS],
        "formats": [f[1] for f in _HIT_FIELDS],
        "offsets": [f[2] for f in _HIT_FIELDS],
        "itemsize": 48,
    }
)

#: Bit fields of the 64-bit hit word, numbered from the most significant bit
#: after the bit order of every byte is reversed: name -> (start, stop).
HIT_BIT_FIELDS = {
    "chip_id": (0, 5),
    "payload": (5, 8),
    "row": (8, 13),
    "column": (13, 18),
    "ts_neg1": (18, 19),
    "ts_coarse1": (19, 33),
    "ts_fine1": (33, 36),
    "ts_tdc1": (36, 41),
    "ts_neg2": (41, 42),
    "ts_coarse2": (42, 56),
    "ts_fine2": (56, 59),
    "ts_tdc2": (59, 64),
}


class DecodingStatus(enum.IntFlag):
    """What happened while walking a readout (spec section 5), one bit each.

    The bit positions are those of the reference decoder, so the integer value
    of a status is interchangeable with it. A status is falsy when nothing
    noteworthy happened; test a flag with ``DecodingStatus.VALID_EXTRA_BYTES in
    status``.
    """

    #: Orphan bytes at the start were completed by the previous readout's
    #: extra bytes into a hit (the first hit of this readout).
    ORPHAN_BYTES_MATCHED = 1 << 0
    #: Orphan bytes at the start could not be matched with the extra bytes
    #: passed in (the sizes do not add up to 8) and were dropped.
    ORPHAN_BYTES_DROPPED = 1 << 1
    #: Orphan bytes at the start, but no extra bytes were passed in.
    ORPHAN_BYTES_NOT_USED = 1 << 2
    #: The readout ends with fewer than 8 bytes beginning with a valid start
    #: byte: they are kept as ``extra_bytes`` for the next readout (exactly 8
    #: beginning with a start byte are a hit).
    VALID_EXTRA_BYTES = 1 << 3
    #: The readout ends with 8 bytes or fewer that do not begin with a valid
    #: start byte: all of them are dropped.
    INVALID_EXTRA_BYTES = 1 << 4
    #: A truncated hit followed by a new one was found inside the data and the
    #: truncated part was dropped.
    INCOMPLETE_HIT_DROPPED = 1 << 5


class ReadoutError(enum.IntEnum):
    """Why a datagram is not a well-formed serialized readout (0: it is)."""

    OK = 0
    #: Fewer than the 19 bytes of the fixed header.
    TOO_SHORT = 1
    #: The first three bytes are not ``fe dc ba``.
    BAD_HEADER = 2
    #: The length field disagrees with the number of data bytes carried.
    LENGTH_MISMATCH = 3


#: numpy dtype of the per-datagram rows of a decoded batch
#: (:attr:`mcast_trio.DecodedBatch.readouts`).
READOUT_DTYPE = np.dtype(
    [
        ("timestamp", "<u8"),  # ns since the epoch (0 when malformed)
        ("first_hit", "<u8"),  # index of this readout's first hit in .hits
        ("readout_id", "<u4"),  # 0 when malformed
        ("n_hits", "<u4"),  # hits decoded from this readout
        ("length", "<u4"),  # data bytes after stripping trailing padding
        ("dropped_bytes", "<u4"),  # bytes skipped that belong to no hit
        ("n_extra", "u1"),  # extra bytes carried to the next readout
        ("status", "u1"),  # DecodingStatus bits
        ("malformed", "?"),  # True: the datagram was skipped
        ("error", "u1"),  # ReadoutError code
    ],
    align=True,
)
