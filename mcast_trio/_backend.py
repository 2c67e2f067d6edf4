"""The decoder backend, chosen and bound once at import: compiled (default)
or the Python reference.

The compiled decoder (``mcast_trio._decode``) is what ships. The pure-Python
reference (``mcast_trio._reference``) is selected only explicitly, with the
environment variable ``MCAST_TRIO_DECODER=python`` set before import; it is
never used silently after a failed import: if the extension is missing,
importing mcast_trio fails with a message saying how to fix it.

As msgpack binds its implementation, this module binds the chosen backend's
functions to module names at import, with one call signature whichever it
is; callers call :func:`decode_batch` and :func:`decode_one` and never ask
which backend is active:

* ``decode_batch(buf, offsets, lengths, extra_bytes, carry, last_id)`` ->
  ``(hits, readouts, extra_out, last_id)``: the serialized readouts
  ``buf[offsets[k]:offsets[k] + lengths[k]]`` (int64 arrays, inside
  ``buf``), ``carry`` one of ``_format.CARRY_*``; ``hits`` a ``HIT_DTYPE``
  array, ``readouts`` a ``READOUT_DTYPE`` array (one row per datagram).
* ``decode_chains(buf, offsets, lengths, chain, extras, extra_lens, last_ids,
  carry)`` -> ``(hits, readouts)``: the same for readouts of several carry
  chains (senders) in arrival order, row ``k`` of chain ``chain[k]`` (int64);
  each chain's state, ``extras`` (uint8, 8 bytes per chain), ``extra_lens``
  (int8, -1: none) and ``last_ids`` (int64, -1: unknown), is read and
  overwritten in place with its final state.
* ``decode_one(data, extra_bytes, readout_id, timestamp)`` ->
  ``(hits, flags, extra_start, dropped)``: the data of one readout (trailing
  padding stripped); ``hits`` a ``HIT_DTYPE`` array.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from . import _format
from ._format import HIT_DTYPE, READOUT_DTYPE

ENV_VAR = "MCAST_TRIO_DECODER"
_CHOICES = ("compiled", "python")

_choice = os.environ.get(ENV_VAR, "compiled").strip().lower() or "compiled"
if _choice not in _CHOICES:
    raise ImportError(
        f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is not a decoder backend; "
        f"allowed: 'compiled' (the default) or 'python' (the slow pure-Python reference)"
    )

def _missing_extension_message(exc: BaseException) -> str:
    """Say why the compiled decoder is missing and what to do about it.

    The usual cause is not a missing compiler but importing the package from
    its source tree (the repository root is the current directory, or on
    ``sys.path``), where the extension was never built: the installed copy is
    shadowed. That case is recognised by the ``.pyx`` source lying beside the
    package's modules with no built extension next to it.
    """
    package = pathlib.Path(__file__).resolve().parent
    built = any(package.glob("_decode.*.so")) or any(package.glob("_decode.*.pyd"))
    if (package / "_decode.pyx").is_file() and not built:
        return (
            "the compiled decoder mcast_trio._decode cannot be loaded: mcast_trio was "
            f"imported from its source tree ({package}), where the extension is not built. "
            "If mcast_trio is installed (`pip install .`), the source tree shadows it: run from "
            "another directory (or drop the repository from sys.path / PYTHONPATH); or build the "
            "extensions in place with `python setup.py build_ext --inplace`. "
            f"{ENV_VAR}=python selects the slow pure-Python reference decoder on purpose."
        )
    return (
        "the compiled decoder mcast_trio._decode is not built or cannot be "
        f"loaded ({exc}). Reinstall mcast_trio with a C compiler available "
        f"(`pip install .`), or set {ENV_VAR}=python to use the slow "
        "pure-Python reference decoder on purpose."
    )


if _choice == "compiled":
    try:
        from . import _decode
    except ImportError as exc:  # pragma: no cover - exercised by packaging checks
        raise ImportError(_missing_extension_message(exc)) from exc

    def _check_layout() -> None:
        layout = _decode._layout()
        problems = []
        if layout["hit_size"] != HIT_DTYPE.itemsize:
            problems.append(f"hit record is {layout['hit_size']} bytes, HIT_DTYPE {HIT_DTYPE.itemsize}")
        if layout["readout_size"] != READOUT_DTYPE.itemsize:
            problems.append(
                f"readout record is {layout['readout_size']} bytes, READOUT_DTYPE {READOUT_DTYPE.itemsize}"
            )
        for kind, dtype in (("hit", HIT_DTYPE), ("readout", READOUT_DTYPE)):
            for name, offset in layout[kind].items():
                if dtype.fields[name][1] != offset:
                    problems.append(f"{kind}.{name} at {offset}, dtype says {dtype.fields[name][1]}")
        header = layout["readout_header"]
        expected = {
            "magic": _format.HEADER,
            "size": _format.HEADER_SIZE,
            "length_offset": _format.LENGTH_OFFSET,
            "errors": {e.name: int(e) for e in _format.ReadoutError},
        }
        for name, value in expected.items():
            if header[name] != value:
                problems.append(f"readout header {name} is {header[name]!r}, _format says {value!r}")
        for name, value in layout["carry"].items():
            if getattr(_format, name) != value:
                problems.append(f"{name} is {value}, _format says {getattr(_format, name)}")
        if problems:  # pragma: no cover - a build bug
            raise ImportError("compiled decoder layout disagrees with _format: " + "; ".join(problems))

    _check_layout()


def decoder_backend() -> str:
    """Return ``"compiled"`` or ``"python"``: the hit decoder in use."""
    return _choice


if _choice == "compiled":
    #: The module the decoder functions come from.
    implementation = _decode

    def decode_batch(buf, offsets, lengths, extra_bytes, carry, last_id):
        count = len(lengths)
        bound = int(lengths.sum()) // 8 + count  # >= sum(lengths // 8) + count
        hits = np.empty(bound, dtype=HIT_DTYPE)
        readouts = np.zeros(count, dtype=READOUT_DTYPE)
        n_hits, extra_out, last = _decode.decode_batch(
            buf if len(buf) else b"\0",  # a typed memoryview needs one element
            offsets, lengths, extra_bytes, carry, last_id,
            hits.view(np.uint8) if bound else np.zeros(1, np.uint8),
            readouts.view(np.uint8) if count else np.zeros(1, np.uint8),
        )
        return hits[:n_hits], readouts, extra_out, last

    def decode_chains(buf, offsets, lengths, chain, extras, extra_lens, last_ids, carry):
        count = len(lengths)
        bound = int(lengths.sum()) // 8 + count  # >= sum(lengths // 8) + count
        hits = np.empty(bound, dtype=HIT_DTYPE)
        readouts = np.zeros(count, dtype=READOUT_DTYPE)
        n_hits = _decode.decode_chains(
            buf if len(buf) else b"\0",  # a typed memoryview needs one element
            offsets, lengths, chain, extras if len(extras) else np.zeros(1, np.uint8), extra_lens,
            last_ids, carry,
            hits.view(np.uint8) if bound else np.zeros(1, np.uint8),
            readouts.view(np.uint8) if count else np.zeros(1, np.uint8),
        )
        return hits[:n_hits], readouts

    def decode_one(data, extra_bytes, readout_id, timestamp):
        hits = np.empty(len(data) // 8 + 1, dtype=HIT_DTYPE)
        n, flags, extra_start, dropped = _decode.decode_one(
            data, extra_bytes, readout_id, timestamp, hits.view(np.uint8))
        return hits[:n], flags, extra_start, dropped

else:
    from . import _reference

    implementation = _reference

    def _check_rows(buf, offsets, lengths):
        # The compiled _check_rows' guard, without adding offset and length
        # (Python ints would not wrap, but slicing would silently truncate).
        size = len(buf)
        if len(offsets) != len(lengths):
            raise ValueError(f"offsets has {len(offsets)} entries but lengths has {len(lengths)}")
        for k, (o, n) in enumerate(zip(offsets.tolist(), lengths.tolist())):
            if n < 0 or o < 0 or n > size or o > size - n:
                raise ValueError(f"datagram {k} (offset {o}, length {n}) "
                                 f"does not fit in the {size}-byte buffer")

    def decode_batch(buf, offsets, lengths, extra_bytes, carry, last_id):
        _check_rows(buf, offsets, lengths)
        parts = [buf[o:o + n] for o, n in zip(offsets.tolist(), lengths.tolist())]
        return _reference.decode_batch(parts, extra_bytes, carry, last_id)

    def decode_chains(buf, offsets, lengths, chain, extras, extra_lens, last_ids, carry):
        _check_rows(buf, offsets, lengths)
        parts = [buf[o:o + n] for o, n in zip(offsets.tolist(), lengths.tolist())]
        state = [(None if n < 0 else bytes(extras[8 * g:8 * g + n]), int(last))
                 for g, (n, last) in enumerate(zip(extra_lens.tolist(), last_ids.tolist()))]
        hits, readouts, state = _reference.decode_chains(parts, chain.tolist(), state, carry)
        for g, (extra, last) in enumerate(state):
            extra_lens[g] = -1 if extra is None else len(extra)
            if extra:
                extras[8 * g:8 * g + len(extra)] = np.frombuffer(extra, np.uint8)
            last_ids[g] = last
        return hits, readouts

    decode_one = _reference.decode_data
