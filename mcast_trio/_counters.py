"""Counters kept by one owner and read as frozen records.

A receiver, a sender and a reassembler each keep a handful of integers that
one task updates and anybody may read as a consistent snapshot (trio runs one
task at a time, so a snapshot taken between two checkpoints is consistent).
The *record* is a frozen dataclass, the public type that ``statistics()``
returns; :func:`counters_for` derives from it the mutable counterpart the
owner increments (same field names, ``__slots__``, no validation: plain
attribute arithmetic is the fast path), with one ``snapshot()`` instead of a
hand-written copy of every field::

    @dataclass(frozen=True)
    class SenderStatistics:
        datagrams: int = 0
        errors: int = 0

    _SenderCounters = counters_for(SenderStatistics)
    c = _SenderCounters()
    c.datagrams += 3
    c.snapshot()              # SenderStatistics(datagrams=3, errors=0)
    c.snapshot(errors=-1)     # fields computed by the owner override

Fields without a default start at 0; a field whose default is a factory
(e.g. ``dict``) starts with a fresh value. ``reset()`` starts over.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["counters_for"]

R = TypeVar("R")


def counters_for(record: type[R], *, name: str | None = None) -> type:
    """Return a mutable counters class for the frozen dataclass ``record``."""
    if not (dataclasses.is_dataclass(record) and record.__dataclass_params__.frozen):
        raise TypeError(f"record={record!r} is not a frozen dataclass")
    fields = dataclasses.fields(record)
    names = tuple(f.name for f in fields)
    initial: list[tuple[str, Any, Any]] = []
    for f in fields:
        if f.default is not dataclasses.MISSING:
            initial.append((f.name, f.default, None))
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            initial.append((f.name, None, f.default_factory))  # type: ignore[misc]
        else:
            initial.append((f.name, 0, None))

    def reset(self) -> None:
        for field_name, value, factory in initial:
            setattr(self, field_name, factory() if factory is not None else value)

    def snapshot(self, **overrides: Any) -> R:
        values = {n: getattr(self, n) for n in names}
        values.update(overrides)
        return record(**values)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
        return f"<{type(self).__name__} {inner}>"

    namespace = {
        "__slots__": names,
        "__init__": reset,
        "reset": reset,
        "snapshot": snapshot,
        "__repr__": __repr__,
        "record": record,
        "__doc__": f"Mutable counters of :class:`{record.__name__}`; ``snapshot()`` freezes them.",
        "__module__": record.__module__,
    }
    return type(name or f"_{record.__name__}Counters", (), namespace)
