"""Batch decoding of serialized readouts: :func:`decode_readouts`.

The wrapper validates its arguments, allocates the output arrays once per batch
(an upper bound of the hit count, then a view of the filled part), and hands the
bytes to the backend bound in ``_backend`` (the compiled decoder unless the
reference was selected explicitly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _backend
from ._format import CARRY_ALWAYS, CARRY_CONSECUTIVE, CARRY_NEVER, readout_error_message
from ._validate import check_choice, check_int

__all__ = ["DecodedBatch", "decode_readouts", "decode_chains", "CARRY_MODES"]

#: Carry modes accepted by :func:`decode_readouts` (``carry=``).
CARRY_MODES = {
    "always": CARRY_ALWAYS,
    "consecutive": CARRY_CONSECUTIVE,
    "never": CARRY_NEVER,
}

@dataclass(frozen=True)
class DecodedBatch:
    """The result of :func:`decode_readouts`.

    Attributes:
        hits: every hit of every well-formed readout, in order, as a
            ``numpy.recarray`` of :data:`HIT_DTYPE`.
        readouts: one row per input datagram (:data:`READOUT_DTYPE`): readout
            id, timestamp, ``first_hit``/``n_hits`` (its slice of ``hits``),
            decoding ``status`` (:class:`DecodingStatus` bits), ``dropped_bytes``, ``n_extra``, and
            ``malformed``/``error`` for datagrams that were skipped.
        errors: ``(index, message)`` for each malformed datagram.
        extra_bytes: extra bytes the carry chain holds after the last
            datagram, to pass as ``extra_bytes=`` with the next batch (None
            if none).
        last_id: readout id of the chain's last readout (-1: unknown, e.g.
            after a malformed datagram with ``carry="always"``), to pass as
            ``last_id=`` with the next batch.
    """

    hits: np.recarray
    readouts: np.recarray
    errors: tuple[tuple[int, str], ...] = ()
    extra_bytes: bytes | None = None
    last_id: int = -1
    backend: str = field(default="compiled", compare=False)

    @property
    def n_malformed(self) -> int:
        """Number of malformed (skipped) datagrams."""
        return len(self.errors)

    def __len__(self) -> int:
        return len(self.readouts)

    def hits_of(self, index: int) -> np.recarray:
        """The hits of datagram ``index`` (a view of :attr:`hits`)."""
        row = self.readouts[index]
        start = int(row["first_hit"])
        return self.hits[start:start + int(row["n_hits"])]


def _as_contiguous(datagrams, lengths, offsets):
    """Normalise the two input forms to (buffer, offsets, lengths)."""
    if lengths is None:
        if offsets is not None:
            raise TypeError("offsets= is only meaningful together with lengths=")
        if isinstance(datagrams, (bytes, bytearray, memoryview, str)):
            raise TypeError(
                "datagrams must be a sequence of bytes-like objects, or one buffer "
                f"together with lengths=; got a single {type(datagrams).__name__}"
            )
        parts = [memoryview(d).cast("B") if not isinstance(d, bytes) else d for d in datagrams]
        lens = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        buf = b"".join(parts)
        offs = np.zeros(len(lens), dtype=np.int64)
        if len(lens) > 1:
            np.cumsum(lens[:-1], out=offs[1:])
        return buf, offs, lens
    try:
        view = memoryview(datagrams)
    except TypeError:
        raise TypeError(
            f"with lengths=, datagrams must be one bytes-like buffer; got {type(datagrams).__name__}"
        ) from None
    if not view.contiguous:
        raise ValueError("datagrams buffer must be C-contiguous")
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    lens = np.ascontiguousarray(lengths, dtype=np.int64)
    if lens.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {lens.shape}")
    if offsets is None:
        offs = np.zeros(len(lens), dtype=np.int64)
        if len(lens) > 1:
            np.cumsum(lens[:-1], out=offs[1:])
    else:
        offs = np.ascontiguousarray(offsets, dtype=np.int64)
        if offs.shape != lens.shape:
            raise ValueError(f"offsets has shape {offs.shape} but lengths has shape {lens.shape}")
    # Compared without adding offsets and lengths: that sum can wrap in int64
    # (an offset near 2**63 would pass as inside the buffer).
    size = len(view)
    if len(lens) and (lens.min() < 0 or offs.min() < 0 or int(lens.max()) > size
                      or bool((offs > size - lens).any())):
        raise ValueError(
            f"lengths/offsets describe datagrams outside the {len(view)}-byte buffer"
        )
    return view, offs, lens


def _errors(buf, offs: np.ndarray, lens: np.ndarray, readouts: np.ndarray) -> tuple[tuple[int, str], ...]:
    if len(lens) and readouts["malformed"].any():
        return tuple(
            (int(k), readout_error_message(buf[int(offs[k]):int(offs[k] + lens[k])], int(readouts["error"][k])))
            for k in np.flatnonzero(readouts["malformed"])
        )
    return ()


def _decode(buf, offs: np.ndarray, lens: np.ndarray, extra_bytes: bytes | None, last_id: int,
            mode: int) -> DecodedBatch:
    """Decode validated input with the backend bound in ``_backend``."""
    hits, readouts, extra_out, last = _backend.decode_batch(buf, offs, lens, extra_bytes, mode, last_id)
    errors = _errors(buf, offs, lens, readouts)
    return DecodedBatch(
        hits=hits.view(np.recarray),
        readouts=readouts.view(np.recarray),
        errors=errors,
        extra_bytes=extra_out,
        last_id=int(last),
        backend=_backend.decoder_backend(),
    )


def decode_trusted(buf, offsets: np.ndarray, lengths: np.ndarray, extra_bytes: bytes | None,
                   last_id: int, carry: int) -> DecodedBatch:
    """:func:`decode_readouts` for callers inside the package that hand over
    arrays they built themselves (int64, contiguous, inside ``buf``) and a
    carry mode number: the receive loop. Skips the argument checks; the
    compiled decoder still checks every offset and length against the
    buffer."""
    return _decode(buf, offsets, lengths, extra_bytes, last_id, carry)


def decode_chains(buf, offsets: np.ndarray, lengths: np.ndarray, chain: np.ndarray,
                  extras: np.ndarray, extra_lens: np.ndarray, last_ids: np.ndarray,
                  carry: int) -> DecodedBatch:
    """Decode readouts of several senders mixed in arrival order in one
    compiled call, each sender on its own carry chain (for callers inside
    the package that built the arrays themselves: the receive pipeline).

    Row ``k`` (``buf[offsets[k]:offsets[k] + lengths[k]]``) belongs to chain
    ``chain[k]`` (int64, ``0 <= chain[k] < len(last_ids)``). Chain ``g``'s
    state is ``extras[8 * g:8 * g + extra_lens[g]]`` (uint8; ``extra_lens``
    int8, -1: no extra bytes) and ``last_ids[g]`` (int64, -1: unknown); it
    is read before the first row and overwritten in place after the last.
    The rows of the result stay in arrival order; its ``extra_bytes`` /
    ``last_id`` are None / -1 (the state is in the arrays). The compiled
    decoder checks every offset, length and chain index.
    """
    hits, readouts = _backend.decode_chains(buf, offsets, lengths, chain, extras, extra_lens,
                                            last_ids, carry)
    return DecodedBatch(
        hits=hits.view(np.recarray),
        readouts=readouts.view(np.recarray),
        errors=_errors(buf, offsets, lengths, readouts),
        backend=_backend.decoder_backend(),
    )


def decode_readouts(
    datagrams,
    lengths=None,
    *,
    offsets=None,
    extra_bytes: bytes | None = None,
    last_id: int = -1,
    carry: str = "always",
) -> DecodedBatch:
    """Decode many serialized readouts in one call.

    Accepts either a sequence of bytes-like datagrams, or one contiguous
    buffer plus ``lengths`` (and optionally ``offsets``; by default the
    datagrams are back to back), which is what a batched socket receive yields.
    Extra bytes left at the end of each readout are carried into the next one
    (spec section 5). A malformed datagram is reported in ``errors`` and its
    row, skipped; the others still decode. It is not a readout, so with
    ``carry="consecutive"`` it leaves the chain as it was (the readout id
    check decides what carries); with ``"always"`` it breaks the chain.

    Args:
        datagrams: the serialized readouts, or one buffer holding them.
        lengths: per-datagram sizes when ``datagrams`` is one buffer.
        offsets: per-datagram start offsets in that buffer.
        extra_bytes: extra bytes left by the readout before the first one
            (``DecodedBatch.extra_bytes`` of the previous batch).
        last_id: readout id of that readout (``DecodedBatch.last_id``).
        carry: ``"always"`` carries extra bytes into the next datagram
            whatever its id; ``"consecutive"`` only when its readout id follows
            the previous one (what a receiver that may lose datagrams wants, so
            that a hit is never assembled from two non-adjacent readouts);
            ``"never"`` disables reassembly across readouts.

    Returns:
        A :class:`DecodedBatch`.

    Raises:
        TypeError, ValueError: for arguments of the wrong kind (not for bad
            datagram contents, which are reported in the batch).
    """
    check_choice("carry", carry, CARRY_MODES, what="a carry mode")
    last_id = check_int("last_id", last_id, -1, 0xFFFFFFFF, allowed="-1 (unknown) or 0..2**32-1")
    if extra_bytes is not None:
        extra_bytes = bytes(extra_bytes)
    buf, offs, lens = _as_contiguous(datagrams, lengths, offsets)
    return _decode(buf, offs, lens, extra_bytes, last_id, CARRY_MODES[carry])
