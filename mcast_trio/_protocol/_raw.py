"""Raw framing: the datagram *is* the payload.

One serialized AstroPix readout per datagram (astropix-analysis, Lowe's
``multicast``). No topic, no fragmentation: :func:`encode_raw`,
:func:`decode_raw`, and :class:`RawEncoder`/:class:`RawDecoder` with the
encoder/decoder interface of the other framings.
"""

from __future__ import annotations

from typing import Any

from ._message import MAX_UDP_PAYLOAD, Message, as_payload

__all__ = ["encode_raw", "decode_raw", "RawEncoder", "RawDecoder"]


def encode_raw(payload: bytes | bytearray | memoryview) -> list[bytes]:
    """Return ``[payload]``: in raw framing the payload is the datagram.

    Raises:
        TypeError: ``payload`` is not bytes-like.
        ValueError: ``payload`` is larger than 65507 bytes (no fragmentation
            in raw framing).
    """
    payload = as_payload(payload)
    if len(payload) > MAX_UDP_PAYLOAD:
        raise ValueError(
            f"payload is {len(payload)} bytes; raw framing allows at most "
            f"{MAX_UDP_PAYLOAD} (use native or MCL framing to fragment)"
        )
    return [bytes(payload)]


def decode_raw(datagram: bytes | bytearray | memoryview) -> bytes:
    """Return the payload of a raw datagram (the datagram itself, as bytes)."""
    return bytes(datagram)


class RawEncoder:
    """Raw framing with the encoder interface of the other framings."""

    __slots__ = ()

    def encode(self, payload: bytes | bytearray | memoryview, topic: object = None) -> list[bytes]:
        """Return ``[payload]``.

        Raises:
            ValueError: A ``topic`` was given (raw datagrams carry none), or
                the payload exceeds 65507 bytes.
        """
        if topic is not None:
            raise ValueError(f"topic={topic!r}: raw framing carries no topic; allowed: None")
        return encode_raw(payload)


class RawDecoder:
    """Raw framing with the decoder interface of the other framings."""

    __slots__ = ()

    def feed(self, datagram: bytes | bytearray | memoryview, address: Any, now: float) -> Message:
        """Return ``Message(None, bytes(datagram), address)``; never None."""
        return Message(None, bytes(datagram), address)

    def expire(self, now: float) -> int:
        return 0

