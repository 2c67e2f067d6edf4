"""Messages, and what every framing accepts as a payload and as a topic.

A decoder of any framing returns a :class:`Message`; an encoder of any
framing takes its payload through :func:`as_payload` (bytes-like, never
copied) and a topic through :func:`as_topic` (str, encoded as UTF-8, or
bytes).
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["MAX_UDP_PAYLOAD", "MAX_TOPIC", "Message", "as_payload", "as_topic"]

#: Largest UDP payload over IPv4 (65535 - 8 - 20).
MAX_UDP_PAYLOAD = 65507
#: Longest topic a native header carries (its length is one byte).
MAX_TOPIC = 255


def as_topic(name: str, topic: object, max_len: int | None = MAX_TOPIC) -> bytes:
    """Return the topic ``name``=``topic`` as bytes (a str is encoded as UTF-8).

    Raises:
        TypeError: ``topic`` is neither str nor bytes-like.
        ValueError: It is longer than ``max_len`` bytes (None: no limit).
    """
    if isinstance(topic, str):
        topic = topic.encode("utf-8")
    elif isinstance(topic, (bytes, bytearray, memoryview)):
        topic = bytes(topic)
    else:
        raise TypeError(f"{name}={topic!r} must be str or bytes")
    if max_len is not None and len(topic) > max_len:
        raise ValueError(
            f"{name}={topic!r} is {len(topic)} bytes long; allowed: at most {max_len} bytes"
        )
    return topic


def as_payload(payload: object) -> bytes | memoryview:
    """Return ``payload`` as bytes or as a flat byte memoryview (no copy)."""
    if type(payload) is bytes:
        return payload
    if isinstance(payload, str):
        raise TypeError("payload must be bytes-like, not str")
    try:
        view = memoryview(payload)  # type: ignore[arg-type]
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except TypeError:
        raise TypeError(
            f"payload must be a contiguous bytes-like object, not {type(payload).__name__}"
        ) from None



class Message(NamedTuple):
    """A complete message as decoded from one or more datagrams.

    Attributes:
        topic: The topic (bytes), or None for raw framing and MCL messages
            sent without a topic.
        payload: The message bytes; in MCL framing, the unpacked msgpack
            object (bytes for a byte string, else a dict, list, int, ...).
        address: The sender's address as given to the decoder.
        sender_id: Native framing: the sender's random 64-bit id; else None.
        sequence: Native framing: the message's sequence number; else None.
    """

    topic: bytes | None
    payload: Any
    address: Any = None
    sender_id: int | None = None
    sequence: int | None = None
