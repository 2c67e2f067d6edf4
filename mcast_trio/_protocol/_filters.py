"""Receive-side filters: topics and payload predicates.

:func:`make_filter` builds the predicate a receiver applies to every
message (topics and/or a payload predicate or regular expression, as in
Lowe's ``multicast``); :func:`normalize_topics` is the one reading of a
``topics=`` argument, shared with the decoders that filter by topic from
the header alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from ._message import as_topic

__all__ = ["make_filter", "normalize_topics"]


def normalize_topics(name: str, topics: object) -> frozenset[bytes] | None:
    """``None`` -> None; a single str/bytes -> {it}; an iterable -> the set."""
    if topics is None:
        return None
    if isinstance(topics, (str, bytes, bytearray, memoryview)):
        return frozenset([as_topic(name, topics, None)])
    if not isinstance(topics, Iterable):
        raise TypeError(
            f"{name}={topics!r} must be None, a str/bytes topic or an iterable of them"
        )
    result = frozenset(as_topic(f"{name} item", t, None) for t in topics)
    if not result:
        raise ValueError(f"{name}={topics!r} is empty; pass None to accept every topic")
    return result



def make_filter(
    topics: Iterable[str | bytes] | str | bytes | None = None,
    filter: Callable[[bytes, Any], bool] | str | bytes | re.Pattern[Any] | None = None,
) -> Callable[[bytes | None, bytes, Any], bool]:
    """Build a predicate ``(topic, payload, address) -> bool`` for receivers.

    Args:
        topics: Accept only messages whose topic is one of these (str,
            encoded as UTF-8, or bytes; exact match). A single str/bytes is
            one topic. Messages without a topic (raw framing, MCL nil) never
            match. None: no topic condition.
        filter: Either a callable ``(payload, address) -> bool``, or a regular
            expression (str, bytes or compiled) searched (``re.search``) in
            the payload; a str pattern is encoded as UTF-8, and never matches
            a payload that is not bytes (an MCL dict, list, number...). None:
            no payload condition.

    Returns:
        A predicate that is True when every given condition holds.

    Raises:
        TypeError: ``topics`` or ``filter`` has an unsupported type.
        ValueError: ``topics`` is empty or ``filter`` is not a valid regular
            expression.
    """
    topic_set = normalize_topics("topics", topics)
    search: Callable[[bytes, Any], bool] | None
    if filter is None:
        search = None
    elif isinstance(filter, (str, bytes, re.Pattern)):
        if isinstance(filter, re.Pattern):
            pattern, flags = filter.pattern, filter.flags
        else:
            pattern, flags = filter, 0
        if isinstance(pattern, str):
            pattern = pattern.encode("utf-8")
            flags &= ~re.UNICODE
        try:
            regex = re.compile(pattern, flags)
        except re.error as exc:
            raise ValueError(f"filter={filter!r} is not a valid regular expression: {exc}") from None
        regex_search = regex.search

        def search(payload: Any, address: Any) -> bool:
            # MCL payloads may be any object: a pattern matches byte strings only.
            return type(payload) is bytes and regex_search(payload) is not None

    elif callable(filter):
        search = filter
    else:
        raise TypeError(
            f"filter={filter!r} must be None, a callable (payload, address) -> bool, "
            f"or a regular expression (str, bytes or re.Pattern)"
        )

    if topic_set is None and search is None:
        return lambda topic, payload, address: True
    if search is None:
        return lambda topic, payload, address: topic in topic_set
    if topic_set is None:
        return lambda topic, payload, address: bool(search(payload, address))
    return lambda topic, payload, address: topic in topic_set and bool(search(payload, address))

