"""The AstroPix 4 readout: one datagram, one ``.apx`` record.

Compatible with astropix-analysis' ``AstroPix4Readout`` (same constructor,
``from_bytes``/``to_bytes`` byte for byte, ``decode(extra_bytes)``,
``extra_bytes()``, ``decoding_status()``, ``__str__``), with hits returned as a
numpy record array instead of a list of objects.
"""

from __future__ import annotations

import time
from typing import BinaryIO

import numpy as np

from . import _backend
from ._format import HEADER_SIZE, HIT_DTYPE, READOUT_UID, DecodingStatus, check_readout, pack_readout_header
from ._validate import check_int

__all__ = ["AstroPix4Readout"]

_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF
_NOT_DECODED = object()


class AstroPix4Readout:
    """One AstroPix 4 readout: the raw board data plus host-side id and time.

    Args:
        data: the readout data from the board (bytes-like). Trailing padding
            bytes (``ff``) are stripped, as the spec says.
        readout_id: sequential id assigned by the DAQ host, 0..2**32-1.
        timestamp: ns since the epoch, 0..2**64-1; ``None`` latches
            ``time.time_ns()`` now.

    Raises:
        TypeError, ValueError: naming the argument, the value and what is
            allowed.
    """

    __slots__ = ("_data", "readout_id", "timestamp", "_hits", "_status", "_extra", "_dropped", "_decoded_with")

    #: The dtype of the hits :meth:`decode` returns.
    HIT_DTYPE = HIT_DTYPE
    _UID = READOUT_UID
    PADDING_BYTE = b"\xff"
    IDLE_BYTE = b"\xbc"

    def __init__(self, data, readout_id: int, timestamp: int | None = None) -> None:
        # Latch the time first, as close as possible to the readout.
        if timestamp is None:
            timestamp = time.time_ns()
        try:
            raw = data if type(data) is bytes else memoryview(data).tobytes()
        except TypeError:
            raise TypeError(f"data={data!r:.60} must be bytes-like (bytes, bytearray, memoryview)") from None
        self._data = raw.rstrip(b"\xff")
        self.readout_id = check_int("readout_id", readout_id, 0, _U32_MAX)
        self.timestamp = check_int("timestamp", timestamp, 0, _U64_MAX)
        self._hits = None
        self._status = DecodingStatus(0)
        self._extra = None
        self._dropped = 0
        self._decoded_with = _NOT_DECODED

    # -- construction and serialization ------------------------------------

    @classmethod
    def uid(cls) -> int:
        """The readout class id of ``.apx`` headers (4000)."""
        return cls._UID

    @classmethod
    def from_bytes(cls, datagram) -> AstroPix4Readout:
        """Parse one serialized readout (spec section 1).

        Raises:
            MalformedReadout: too short, wrong header, or a length field that
                disagrees with the bytes carried; the message says which and
                where.
        """
        try:
            view = memoryview(datagram).cast("B")
        except TypeError:
            raise TypeError(f"datagram must be bytes-like, got {type(datagram).__name__}") from None
        readout_id, timestamp, _length = check_readout(view)
        return cls(view[HEADER_SIZE:], readout_id, timestamp)

    def to_bytes(self) -> bytes:
        """Serialize (spec section 1): header, id, timestamp, length, data."""
        return pack_readout_header(self.readout_id, self.timestamp, len(self._data)) + self._data

    def write(self, output_file: BinaryIO) -> None:
        """Write the serialized readout to a binary file in one ``write``."""
        output_file.write(self.to_bytes())

    def data(self) -> bytes:
        """The readout data (trailing padding stripped)."""
        return self._data

    def hex(self) -> str:
        """The data as hexadecimal, two digits per byte."""
        return self._data.hex()

    # -- decoding -----------------------------------------------------------

    def decode(self, extra_bytes: bytes | None = None) -> np.recarray:
        """Decode the hits of this readout (spec sections 4 and 5).

        Args:
            extra_bytes: the extra bytes the previous readout left
                (its :meth:`extra_bytes`), to reassemble a hit split across the
                two; None if there is no previous readout.

        Returns:
            A ``numpy.recarray`` of :data:`HIT_DTYPE`, in decoding order. The
            result is cached: calling again with the same ``extra_bytes``
            returns the same array.
        """
        if extra_bytes is not None:
            try:
                extra_bytes = bytes(extra_bytes)
            except TypeError:
                raise TypeError(f"extra_bytes={extra_bytes!r:.60} must be bytes-like or None") from None
        if self._hits is not None and self._decoded_with == extra_bytes:
            return self._hits
        data = self._data
        hits, flags, extra_start, dropped = _backend.decode_one(data, extra_bytes, self.readout_id, self.timestamp)
        self._hits = hits.view(np.recarray)
        self._status = DecodingStatus(flags)
        self._extra = data[extra_start:] if extra_start >= 0 else None
        self._dropped = dropped
        self._decoded_with = extra_bytes
        return self._hits

    def hits(self) -> np.recarray:
        """The decoded hits (decoding now, without extra bytes, if needed)."""
        if self._hits is None:
            return self.decode()
        return self._hits

    def decoded(self) -> bool:
        """True once :meth:`decode` has run."""
        return self._hits is not None

    def decoding_status(self) -> DecodingStatus:
        """The :class:`DecodingStatus` flags of the last decoding."""
        return self._status

    def extra_bytes(self) -> bytes | None:
        """Bytes at the end kept for the next readout (None if none)."""
        return self._extra

    def dropped_bytes(self) -> int:
        """Number of data bytes the last decoding could not use."""
        return self._dropped

    # -- dunder -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AstroPix4Readout):
            return NotImplemented
        return (self.readout_id, self.timestamp, self._data) == (other.readout_id, other.timestamp, other._data)

    def __hash__(self) -> int:
        return hash((self.readout_id, self.timestamp, self._data))

    def __str__(self) -> str:
        return (
            f"{type(self).__name__}({len(self._data)} bytes, "
            f"readout_id = {self.readout_id}, timestamp = {self.timestamp} ns)"
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(data=bytes.fromhex({self._data.hex()[:48]!r}"
            f"{'...' if len(self._data) > 24 else ''}), readout_id={self.readout_id}, "
            f"timestamp={self.timestamp})"
        )
