"""Constants, dtypes and flags of the AstroPix 4 readout format, and the one
owner of the 19-byte readout header.

The byte values of the stream, the layout of a serialized readout (one
datagram, one ``.apx`` record), the public numpy dtypes of decoded hits and
per-readout rows, the decoding status flags, and the pure functions that read
and write the fixed header of a serialized readout (``fe dc ba``, u32 readout
id, u64 timestamp, u32 data length, little-endian):
:func:`parse_readout_header`, :func:`readout_id_of`, :func:`check_readout`
(with the one :func:`readout_error_message`) and :func:`pack_readout_header`.
Compiled code reads and writes the header with the inline C functions of
``_readout_header.pxd``, whose constants the compiled decoder reports and
``_backend`` checks against these at import. The pure-Python reference decoder
(``_reference.py``, the test oracle) keeps its own independent parse.
"""

from __future__ import annotations

import enum
import struct

import numpy as np

from ._errors import MalformedReadout

__all__ = [
    "check_readouts",
    "readout_ids_and_timestamps",
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
    "READOUT_HEADER_DTYPE",
    "LENGTH_OFFSET",
    "LENGTH_FIELD",
    "CARRY_ALWAYS",
    "CARRY_CONSECUTIVE",
    "CARRY_NEVER",
    "is_valid_start_byte",
    "parse_readout_header",
    "readout_id_of",
    "readout_error_message",
    "check_readout",
    "pack_readout_header",
]

#: The three bytes every serialized readout starts with.
HEADER = b"\xfe\xdc\xba"
#: Size of the fixed part of a serialized readout: header, readout id (u32),
#: timestamp (u64), data length (u32); all little-endian.
HEADER_SIZE = 19
#: Offset of the u32 data length field in the fixed part.
LENGTH_OFFSET = 15
#: The data length field (``LENGTH_FIELD.unpack_from(buf, offset + LENGTH_OFFSET)``).
LENGTH_FIELD = struct.Struct("<I")
#: numpy dtype of the fixed part, for building many headers at once.
READOUT_HEADER_DTYPE = np.dtype(
    [("header", "S3"), ("readout_id", "<u4"), ("timestamp", "<u8"), ("length", "<u4")]
)
_FIXED = struct.Struct("<3sIQI")
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


#: Carry modes of the batch decoders (both backends): extra bytes go into the
#: next readout always, only into the next consecutive readout id, or never.
CARRY_ALWAYS = 0
CARRY_CONSECUTIVE = 1
CARRY_NEVER = 2

_OK = ReadoutError.OK
_TOO_SHORT = (ReadoutError.TOO_SHORT, 0, 0, 0)
_BAD_HEADER = (ReadoutError.BAD_HEADER, 0, 0, 0)
_LENGTH_MISMATCH = (ReadoutError.LENGTH_MISMATCH, 0, 0, 0)


def parse_readout_header(datagram) -> tuple[ReadoutError, int, int, int]:
    """Parse the fixed header of a serialized readout.

    Args:
        datagram: the whole serialized readout (bytes or a flat byte view).

    Returns:
        ``(error, readout_id, timestamp, data_length)``: ``error`` is a
        :class:`ReadoutError` code; the other values are 0 unless the
        datagram is well formed.
    """
    size = len(datagram)
    if size < HEADER_SIZE:
        return _TOO_SHORT
    header, readout_id, timestamp, length = _FIXED.unpack_from(datagram, 0)
    if header != HEADER:
        return _BAD_HEADER
    if length != size - HEADER_SIZE:
        return _LENGTH_MISMATCH
    return _OK, readout_id, timestamp, length


def readout_id_of(datagram) -> int | None:
    """The readout id of a well-formed serialized readout, else None."""
    error, readout_id, _timestamp, _length = parse_readout_header(datagram)
    return None if error else readout_id


def readout_error_message(datagram, error: int) -> str:
    """Human-readable reason why ``datagram`` is not a serialized readout
    (``error``: its :class:`ReadoutError` code, not OK)."""
    size = len(datagram)
    if error == ReadoutError.TOO_SHORT:
        return (
            f"{size}-byte datagram is shorter than the {HEADER_SIZE}-byte readout header"
            f" (header, readout_id, timestamp, length)"
        )
    if error == ReadoutError.BAD_HEADER:
        got = bytes(datagram[:3]).hex(" ")
        return f"bad readout header {got} at offset 0, expected {HEADER.hex(' ')}"
    if error == ReadoutError.LENGTH_MISMATCH:
        declared = LENGTH_FIELD.unpack_from(datagram, LENGTH_OFFSET)[0]
        return (
            f"length field at offset {LENGTH_OFFSET} says {declared} data bytes, "
            f"but {size - HEADER_SIZE} bytes follow the {HEADER_SIZE}-byte header"
        )
    raise ValueError(f"error={error} is not a ReadoutError code for a malformed datagram")


def check_readout(datagram) -> tuple[int, int, int]:
    """Check that ``datagram`` is one well-formed serialized readout.

    Returns:
        ``(readout_id, timestamp, data_length)`` of its header.

    Raises:
        MalformedReadout: too short, wrong header, or a length field that
            disagrees with the bytes carried (:func:`readout_error_message`).
    """
    error, readout_id, timestamp, length = parse_readout_header(datagram)
    if error:
        raise MalformedReadout(readout_error_message(datagram, error))
    return readout_id, timestamp, length


def _le_field(buf: np.ndarray, offsets: np.ndarray, at: int, size: int) -> np.ndarray:
    """The little-endian unsigned ``size``-byte field at ``offsets + at`` of
    every record, as ``uint64``."""
    value = np.zeros(len(offsets), dtype=np.uint64)
    for k in range(size):
        value |= buf[offsets + (at + k)].astype(np.uint64) << np.uint64(8 * k)
    return value


def check_readouts(data, lengths) -> np.ndarray:
    """Check serialized readouts lying back to back in ``data`` (``lengths[i]``
    bytes each; what a receiver's :class:`~mcast_trio.ReadoutChunk` holds),
    all at once with numpy: the same rules as :func:`parse_readout_header`.

    Returns:
        the ``int64`` start offset of every readout in ``data``.

    Raises:
        MalformedReadout: the first malformed one, with
            :func:`readout_error_message` and its index and offset.
        ValueError: ``lengths`` do not add up to ``len(data)``.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    lengths = np.asarray(lengths, dtype=np.int64)
    if int(lengths.sum()) != len(buf) or (len(lengths) and int(lengths.min()) < 0):
        raise ValueError(f"lengths add up to {int(lengths.sum())} bytes, data has {len(buf)}")
    offsets = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=offsets[1:])
    ok = lengths >= HEADER_SIZE
    if ok.any():
        # Read headers only where a record has one (elsewhere: the first
        # record's, whose result is masked out by ``ok``).
        at = np.where(ok, offsets, int(offsets[np.argmax(ok)]))
        declared = _le_field(buf, at, LENGTH_OFFSET, 4).astype(np.int64)
        ok &= ((buf[at] == HEADER[0]) & (buf[at + 1] == HEADER[1]) & (buf[at + 2] == HEADER[2])
               & (declared == lengths - HEADER_SIZE))
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        start = int(offsets[bad])
        record = memoryview(buf)[start:start + int(lengths[bad])]
        error = parse_readout_header(record)[0]
        raise MalformedReadout(f"readout {bad} at offset {start}: {readout_error_message(record, error)}")
    return offsets


def readout_ids_and_timestamps(records) -> tuple[np.ndarray, np.ndarray]:
    """The readout ids (``uint32``) and timestamps (``uint64``) of a list of
    serialized readouts, read from their headers all at once (checked as
    :func:`check_readouts` checks them), without decoding any hit.

    Raises:
        MalformedReadout: one of them is malformed.
    """
    data = b"".join(records)
    offsets = check_readouts(data, np.fromiter(map(len, records), dtype=np.int64, count=len(records)))
    buf = np.frombuffer(data, dtype=np.uint8)
    return _le_field(buf, offsets, 3, 4).astype(np.uint32), _le_field(buf, offsets, 7, 8)


def pack_readout_header(readout_id: int, timestamp: int, data_length: int) -> bytes:
    """The 19-byte fixed header of a serialized readout (values not checked
    beyond what ``struct`` refuses: they must fit u32, u64, u32)."""
    return _FIXED.pack(HEADER, readout_id, timestamp, data_length)
