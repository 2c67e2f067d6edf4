"""Reading and writing ``.apx`` files (spec section 2).

An ``.apx`` file is the magic ``%APXDF``, a u32 little-endian header length N,
N bytes of UTF-8 JSON (an object with ``"readout_uid": 4000`` and any other
metadata), then serialized readouts back to back until the end of the file.
This is the format of astropix-analysis (``FileHeader`` /
``AstroPixBinaryFile``); files written here are byte-identical to the ones it
writes for the same header and readouts, and the other way round.

:func:`open_apx` returns an :class:`ApxReader` or an :class:`ApxWriter`; both
are context managers. The reader streams (it holds a chunk of the file plus
one record), delivers every complete record before a problem in every
reading style, reports a truncated final record (a writer killed
mid-record) with :attr:`ApxReader.truncated` and a
:class:`TruncatedRecordWarning`, and raises :class:`MalformedReadout`, with the
byte offset, for anything else that is wrong with the bytes: no other
exception type comes out of it for bad file contents. With ``recover=True``
it skips damaged regions instead, resynchronizing on the next plausible
record header, and :meth:`ApxReader.statistics` says what it skipped.

These are synchronous, blocking file operations. From trio, run them in a
worker thread (``trio.to_thread.run_sync``) or use a memory channel feeding a
thread that owns the writer.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from ._errors import MalformedReadout
from ._format import (
    HEADER,
    HEADER_SIZE,
    LENGTH_FIELD,
    LENGTH_OFFSET,
    READOUT_UID,
    ReadoutError,
    check_readouts,
    parse_readout_header,
    readout_error_message,
)
from ._readout import AstroPix4Readout
from ._validate import check_bool, check_choice, check_int

__all__ = [
    "APX_MAGIC",
    "FLUSH_POLICIES",
    "MAX_DAMAGED_REGIONS",
    "ApxReader",
    "ApxStatistics",
    "ApxWriter",
    "DamagedRegion",
    "TruncatedRecord",
    "TruncatedRecordWarning",
    "open_apx",
]

#: The six bytes every ``.apx`` file starts with.
APX_MAGIC = b"%APXDF"
#: Values of ``flush=`` for :class:`ApxWriter` (see there).
FLUSH_POLICIES = ("record", "batch", "none")

_U32 = struct.Struct("<I")
_PREAMBLE = len(APX_MAGIC) + _U32.size  # magic + header length
_DEFAULT_CHUNK = 1 << 20
# Never ask the OS for more than this in one read, whatever a length field says.
_MAX_READ = 64 << 20
# The largest JSON header ApxReader accepts (bytes): a header length
# above it, or past the end of the file, is damage, reported before reading.
_MAX_HEADER = 16 << 20
# Records checked at once by the reader's fast path.
_RUN = 256
# id (u32) and timestamp (u64) of a record, after its 3 header bytes.
_ID_TS = struct.Struct("<IQ")
_ID = struct.Struct("<I")
_TS = struct.Struct("<Q")
_HEAD_ID = struct.Struct("<3sI")  # a record's header bytes and id
#: Damaged regions an ApxReader keeps (``ApxStatistics.damaged``); the rest
#: are counted (``damaged_count``, ``bytes_skipped``), so that memory does
#: not grow with the number of damaged regions of a hostile file.
MAX_DAMAGED_REGIONS = 1000
# How far ahead of the earliest byte it still needs a reader of a file object
# that cannot seek (a pipe) buffers: a record, or a candidate record, that
# claims to end further on cannot be confirmed from a stream.
_STREAM_AHEAD = 4 << 20
# How far past a record's claimed end the reader looks for where the record
# would end if one bit of its length field were flipped (bytes).
_LOOKAHEAD = 1 << 16


class TruncatedRecordWarning(UserWarning):
    """The last record of an ``.apx`` file is incomplete (the writer was
    probably killed while writing it). Every complete record before it was
    read; :attr:`ApxReader.truncated` says where and how much is missing."""


@dataclass(frozen=True)
class TruncatedRecord:
    """Where the incomplete record at the end of an ``.apx`` file is.

    Attributes:
        offset: byte offset in the file where the incomplete record starts.
        size: number of its bytes present in the file (to the end of file).
        expected: its full size according to its length field (19 + length),
            or None if the file ends inside the 19-byte fixed part.
        index: index of the record in the file (the number of complete
            records before it).
    """

    offset: int
    size: int
    expected: int | None
    index: int

    @property
    def missing(self) -> int | None:
        """Number of bytes missing (None if unknown)."""
        return None if self.expected is None else self.expected - self.size

    def __str__(self) -> str:
        if self.expected is None:
            what = f"only {self.size} of the {HEADER_SIZE} bytes of its fixed part"
        else:
            what = f"{self.size} of its {self.expected} bytes"
        return f"record {self.index} at offset {self.offset} is truncated: the file ends after {what}"


def _read_upto(f, size: int) -> bytes:
    """Read ``size`` bytes, fewer only at end of file, in bounded reads."""
    if size <= _MAX_READ:
        data = f.read(size)
        if data is None:
            raise BlockingIOError("the .apx file object is non-blocking and has no data")
        if len(data) == size or not data:
            return data
        parts = [data]
        got = len(data)
    else:
        parts, got = [], 0
    while got < size:
        chunk = f.read(min(size - got, _MAX_READ))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _remaining(f) -> int | None:
    """Bytes from the current position to the end of the file, or None
    when the file object cannot tell (not seekable)."""
    try:
        if not f.seekable():
            return None
        here = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(here)
    except (AttributeError, OSError, ValueError):
        return None
    return max(end - here, 0)


def _parse_header(f) -> tuple[dict, int]:
    """Read and check the magic, header length and JSON header.

    Returns ``(header, offset of the first record)``.
    """
    pre = _read_upto(f, _PREAMBLE)
    magic = pre[: len(APX_MAGIC)]
    if magic != APX_MAGIC:
        raise MalformedReadout(
            f"not an .apx file: it starts with {magic!r} at offset 0, expected the magic {APX_MAGIC!r}"
        )
    if len(pre) < _PREAMBLE:
        raise MalformedReadout(
            f"the .apx file ends at offset {len(pre)}, inside the 4-byte header length at offset {len(APX_MAGIC)}"
        )
    (length,) = _U32.unpack_from(pre, len(APX_MAGIC))
    # Check the length before reading: a crafted one must not make the
    # reader load the whole file.
    remaining = _remaining(f)
    if remaining is not None and length > remaining:
        raise MalformedReadout(
            f"the header length at offset {len(APX_MAGIC)} says {length} bytes, but the file ends "
            f"after {remaining} of them (offset {_PREAMBLE + remaining})"
        )
    if length > _MAX_HEADER:
        raise MalformedReadout(
            f"the header length at offset {len(APX_MAGIC)} says {length} bytes; "
            f"allowed: at most {_MAX_HEADER} (a JSON header)"
        )
    text = _read_upto(f, length)
    if len(text) < length:
        raise MalformedReadout(
            f"the header length at offset {len(APX_MAGIC)} says {length} bytes, but the file ends "
            f"after {len(text)} of them (offset {_PREAMBLE + len(text)})"
        )
    try:
        header = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MalformedReadout(
            f"the header at offset {_PREAMBLE} is not valid UTF-8 (byte {_PREAMBLE + exc.start}: {exc.reason})"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise MalformedReadout(f"the header at offset {_PREAMBLE} is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise MalformedReadout(
            f"the header at offset {_PREAMBLE} is a JSON {type(header).__name__}, expected an object"
        )
    if "readout_uid" not in header:
        raise MalformedReadout(
            f"the header at offset {_PREAMBLE} has no readout_uid; expected \"readout_uid\": {READOUT_UID}"
        )
    uid = header["readout_uid"]
    if type(uid) is not int or uid != READOUT_UID:
        raise MalformedReadout(
            f"readout_uid={uid!r} in the header at offset {_PREAMBLE} is not supported; "
            f"allowed: {READOUT_UID} (AstroPix 4)"
        )
    return header, _PREAMBLE + length


def _is_path(file) -> bool:
    return isinstance(file, (str, bytes, os.PathLike))


@dataclass(frozen=True)
class DamagedRegion:
    """A stretch of an ``.apx`` file where no readable record starts.

    Attributes:
        offset: byte offset where a record should start but none does (a
            record header that is not ``fe dc ba``, a record whose length
            field does not lead to the next record header or the end of the
            file, or one that has a chain of records inside it).
        size: bytes skipped from ``offset`` up to the next plausible record
            (or the end of the file) with ``recover=True``; None without it,
            where the reader stops at the damage.
        index: number of complete records before it (the index the record
            that should start at ``offset`` would have).
        reason: what is wrong there; the message of the
            :exc:`MalformedReadout` raised without ``recover``.
    """

    offset: int
    size: int | None
    index: int
    reason: str

    @property
    def end(self) -> int | None:
        """Offset of the first byte after the region (None if ``size`` is)."""
        return None if self.size is None else self.offset + self.size


@dataclass(frozen=True)
class ApxStatistics:
    """What an iteration over an :class:`ApxReader` found
    (:meth:`ApxReader.statistics`): a snapshot, taken during or after it.

    When an iteration has run to the end of the file, every byte of the file
    is accounted for:
    ``data_offset + record_bytes + bytes_skipped + (truncated.size if
    truncated else 0)`` is the file size.

    Attributes:
        records: complete records yielded.
        record_bytes: their bytes.
        damaged: the first damaged regions met, in file order: at most
            ``MAX_DAMAGED_REGIONS`` (1000) of them, so that memory does
            not grow with the damage of a hostile file (at most one, with
            ``size`` None, without ``recover``).
        damaged_count: how many damaged regions were met (all of them,
            also those beyond the ones kept in ``damaged``).
        bytes_skipped: bytes of the damaged regions skipped (``recover=True``;
            always 0 without it).
        truncated: the incomplete record at the end of the file, or None.
        finished: True once the iteration has reached the end of the file
            (False while it runs, when it was abandoned, or when it stopped
            at damage by raising).
    """

    records: int = 0
    record_bytes: int = 0
    damaged: tuple[DamagedRegion, ...] = ()
    bytes_skipped: int = 0
    damaged_count: int = 0
    truncated: TruncatedRecord | None = None
    finished: bool = False


def _chains(after: bytes) -> bool:
    """Whether ``after``, the 4 bytes read from the last byte of a record on,
    show that the record fits in the file and is followed by a record header,
    a prefix of one cut by the end of the file, or the end of the file."""
    return bool(after) and after[1:] == HEADER[: len(after) - 1]


def _no_evidence(buf: bytes, rel: int, end: int, ident: int) -> bool:
    """Whether the buffered record at ``rel`` (id ``ident``), followed at
    ``end`` by a record header with another id, certainly holds none of
    the evidence :meth:`ApxReader._classify` looks for (the next id inside
    it, or where a flipped length bit would end it, or a record header with
    the id after the next one inside it): then it is a record, decided
    without the slow path. False when unsure."""
    wanted = _ID.pack((ident + 1) & 0xFFFFFFFF)
    if buf.find(wanted, rel + 6, end + 7) >= 0:
        return False
    if buf.find(HEADER + _ID.pack((ident + 2) & 0xFFFFFFFF), rel + 3, end + 7) >= 0:
        return False
    length = end - rel - HEADER_SIZE
    bit = 1
    while bit <= _LOOKAHEAD:
        if not length & bit:
            at = end + bit + 3
            if at + 4 > len(buf):
                return False
            if buf[at:at + 4] == wanted:
                return False
        bit <<= 1
    return True


class _Window:
    """A sliding window over the records part of an ``.apx`` file.

    Offsets are absolute file offsets. The window keeps the bytes from
    ``mark`` (set by the scanner: the earliest byte it may still need) to
    what has been read so far; :meth:`peek` looks far ahead with a seek
    instead of buffering everything in between (seekable files only).
    """

    __slots__ = ("f", "base", "buf", "eof", "mark", "chunk", "seekable")

    def __init__(self, f, start: int, chunk: int) -> None:
        self.f = f
        self.base = start  # file offset of buf[0]
        self.buf = b""
        self.eof = False
        self.mark = start
        self.chunk = chunk
        try:
            self.seekable = bool(f.seekable())
        except (AttributeError, OSError, ValueError):
            self.seekable = False

    @property
    def end(self) -> int:
        """File offset of the first byte not read yet."""
        return self.base + len(self.buf)

    def fill(self, upto: int) -> None:
        """Read until the window covers ``upto`` (or the end of the file)."""
        need = upto - self.end
        if need <= 0 or self.eof:
            return
        want = max(self.chunk, need)
        more = _read_upto(self.f, want)
        if len(more) < want:
            self.eof = True
        cut = min(max(self.mark - self.base, 0), len(self.buf))
        self.buf = self.buf[cut:] + more
        self.base += cut

    def get(self, offset: int, size: int) -> bytes:
        """The bytes at ``offset`` (fewer at the end of the file)."""
        self.fill(offset + size)
        rel = offset - self.base
        return self.buf[rel:rel + size]

    def too_far(self, offset: int) -> bool:
        """Whether a file object that cannot seek would have to buffer more
        than ``_STREAM_AHEAD`` bytes past ``mark`` to read ``offset``."""
        return not self.seekable and offset - self.mark > _STREAM_AHEAD

    def peek(self, offset: int, size: int) -> bytes:
        """Like :meth:`get`, but far ahead in a seekable file, read with a
        seek and not kept (the window stays small)."""
        if offset + size <= self.end or self.eof or not self.seekable or offset - self.end <= self.chunk:
            return self.get(offset, size)
        f = self.f
        f.seek(offset)
        try:
            return _read_upto(f, size)
        finally:
            f.seek(self.end)


class ApxReader:
    """Reads an ``.apx`` file: header, then readouts in file order.

    Iterating yields :class:`AstroPix4Readout` objects; :meth:`records`
    yields the serialized records as ``bytes`` and :meth:`batches` lists of
    them, which is what :func:`mcast_trio.decode_readouts` wants. Each new
    iteration starts again at the first record (when the file is seekable).

    A record is delivered only once its end is confirmed: its header is
    ``fe dc ba``, its length field leads to the next record header (or
    to a damaged one whose own length field leads on), or to the end of the
    file. Between two structurally valid readings the readout ids decide: a
    record followed by the record with the next id is a record, whatever its
    data holds; one followed by another id is damage when the next id (and
    a timestamp not earlier) starts where one flipped bit of its length
    would end it, or a record header with the next id starts inside it (see
    the format page). A record followed by garbage is
    therefore reported as damaged with it: its length field could be what
    is wrong. Every reading style (iteration,
    :meth:`records`, :meth:`records_with_offsets`, :meth:`batches`,
    :meth:`read_all`) delivers every complete record before a problem, then
    reports it the same way:

    * If the file ends inside a record (a writer killed while writing it),
      the reader sets :attr:`truncated` and emits a
      :class:`TruncatedRecordWarning`, or, with ``strict=True``, raises
      :class:`MalformedReadout`.
    * Damage in the middle (a record header that is not ``fe dc ba``, a
      length field that does not lead to the next record header or that
      spans several records) raises
      :class:`MalformedReadout` with the byte offset and the record index,
      also recorded in :meth:`statistics` (``damaged``). :meth:`batches`
      yields the partial batch before raising; :meth:`read_all` attaches the
      readouts read before the damage to the exception as ``readouts``.
    * With ``recover=True`` damage does not raise: the reader skips to the
      next plausible record header and goes on, and :meth:`statistics` says
      what was skipped (offsets, sizes, total bytes). A plausible record
      header is ``fe dc ba`` whose record fits in the file and is followed
      by another record header or the end of the file, so a chance
      ``fe dc ba`` inside the data does not resync wrongly. A damaged record
      is never delivered, but a byte changed inside a record's id, timestamp
      or data cannot be detected (the format has no checksum).

    A length field that runs past the end of the file is a truncated final
    record, unless a plausible record header follows it: then it is damage.
    Damage to the file header (magic, header length, JSON) always raises
    :class:`MalformedReadout` on opening, ``recover`` or not: without it the
    file is not known to hold AstroPix 4 records.

    The reader streams: it holds a chunk of the file plus one record (plus,
    for a file object that is not seekable, what it must read ahead to check
    a record header, at most 4 MiB: a record claiming to end further on is
    read past without being kept, truncated if the stream ends first,
    damage otherwise).

    Args:
        file: a path, or a binary file object opened for reading (not closed
            by the reader).
        strict: raise instead of warning on a truncated final record.
        recover: skip damaged regions instead of raising (see above).
        chunk_size: bytes read from the file at a time.

    Raises:
        MalformedReadout: bad magic, a header length past the end of the
            file or above 16 MiB (checked before the header is read),
            a header that is not a UTF-8 JSON object with ``readout_uid``
            4000; and, while iterating, damage (with its byte offset) unless
            ``recover=True``, or a truncated final record with
            ``strict=True``. No other exception type is raised for bad file
            contents.
        OSError: the file cannot be opened or read.

    Attributes:
        header: the parsed JSON header (a dict, ``readout_uid`` included).
        path: the path, or None for a file object.
        data_offset: byte offset of the first record.
        truncated: None, or a :class:`TruncatedRecord` once an iteration has
            reached an incomplete final record.
        records_read: complete records yielded by the last iteration.
        recover: whether damage is skipped (see above).
    """

    def __init__(
        self, file, *, strict: bool = False, recover: bool = False, chunk_size: int = _DEFAULT_CHUNK
    ) -> None:
        self.strict = check_bool("strict", strict)
        self.recover = check_bool("recover", recover)
        self._chunk_size = check_int("chunk_size", chunk_size, 1, _MAX_READ)
        if _is_path(file):
            self.path = os.fspath(file)
            self._file = open(file, "rb")
            self._owns = True
        else:
            if not hasattr(file, "read"):
                raise TypeError(f"file={file!r:.60} must be a path or a binary file object opened for reading")
            self.path = None
            self._file = file
            self._owns = False
        try:
            self.header, self.data_offset = _parse_header(self._file)
        except BaseException:
            self.close()
            raise
        self.truncated: TruncatedRecord | None = None
        self.records_read = 0
        self._record_bytes = 0
        self._damaged: list[DamagedRegion] = []
        self._damaged_count = 0
        self._skipped = 0
        self._finished = False
        self._started = False
        self._size: int | None = None

    @property
    def metadata(self) -> dict:
        """Return the header without ``readout_uid``, as a new dict: the run
        configuration and whatever else the writer put there."""
        return {key: value for key, value in self.header.items() if key != "readout_uid"}

    @property
    def closed(self) -> bool:
        return self._file is None

    def close(self) -> None:
        """Close the file (if the reader opened it). Idempotent."""
        f, self._file = self._file, None
        if f is not None and self._owns:
            f.close()

    def __enter__(self) -> ApxReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def statistics(self) -> ApxStatistics:
        """Return what the current or last iteration found: records, damaged
        regions, bytes skipped, truncation (see :class:`ApxStatistics`)."""
        return ApxStatistics(
            records=self.records_read,
            record_bytes=self._record_bytes,
            damaged=tuple(self._damaged),
            bytes_skipped=self._skipped,
            damaged_count=self._damaged_count,
            truncated=self.truncated,
            finished=self._finished,
        )

    def __iter__(self) -> Iterator[AstroPix4Readout]:
        from_bytes = AstroPix4Readout.from_bytes
        for record in self.records():
            yield from_bytes(record)

    def records(self) -> Iterator[bytes]:
        """Yield the serialized records (header + data) as ``bytes``."""
        for _offset, record in self._scan():
            yield record

    def records_with_offsets(self) -> Iterator[tuple[int, bytes]]:
        """Yield ``(byte offset in the file, serialized record)`` pairs."""
        return self._scan()

    def batches(self, size: int = 4096) -> Iterator[list[bytes]]:
        """Yield lists of up to ``size`` serialized records, in file order.

        On damage (without ``recover``) or a truncated final record with
        ``strict=True``, the records before it come first, as a last, shorter
        batch; the next step raises :class:`MalformedReadout`.
        """
        check_int("size", size, 1)
        batch: list[bytes] = []
        try:
            for record in self.records():
                batch.append(record)
                if len(batch) >= size:
                    yield batch
                    batch = []
        except MalformedReadout:
            if batch:
                yield batch
            raise
        if batch:
            yield batch

    def read_all(self) -> list[AstroPix4Readout]:
        """All the readouts of the file, as a list.

        Raises:
            MalformedReadout: as iterating does; the readouts read before the
                damage are attached to the exception as its ``readouts``
                attribute (a list).
        """
        readouts: list[AstroPix4Readout] = []
        try:
            readouts.extend(self)
        except MalformedReadout as exc:
            exc.readouts = readouts
            raise
        return readouts

    def _rewind(self) -> None:
        f = self._file
        if f is None:
            raise ValueError("I/O operation on a closed ApxReader")
        if self._started:
            try:
                seekable = f.seekable()
            except AttributeError:
                seekable = False
            if not seekable:
                raise ValueError("this .apx file object is not seekable: its records can be iterated only once")
            f.seek(self.data_offset)
        self._started = True

    def _truncation(self, offset: int, size: int, expected: int | None, index: int) -> None:
        self.truncated = info = TruncatedRecord(offset, size, expected, index)
        if self.strict:
            raise MalformedReadout(str(info))
        warnings.warn(f"{self.path or 'the .apx file'}: {info}", TruncatedRecordWarning, stacklevel=2)

    @staticmethod
    def _plausible(w: _Window, q: int) -> bool:
        """Whether a plausible record header is at ``q``: ``fe dc ba``, its
        record fits in the file and is followed by a record header (or a
        prefix of one cut by the end of the file) or the end of the file."""
        fixed = w.get(q, HEADER_SIZE)
        if len(fixed) < HEADER_SIZE or parse_readout_header(fixed)[0] == ReadoutError.BAD_HEADER:
            return False
        end = q + HEADER_SIZE + LENGTH_FIELD.unpack_from(fixed, LENGTH_OFFSET)[0]
        return not w.too_far(end) and _chains(w.peek(end - 1, 4))

    def _resync(self, w: _Window, start: int) -> int | None:
        """Offset of the first plausible record header at or after ``start``,
        or None (the window then ends at the end of the file)."""
        q = start
        tries = 0
        while True:
            w.mark = q
            if tries >= 8:
                # Many candidates: judge the buffered ones at once first.
                found, q = self._resync_block(w, q)
                if found:
                    return q
                if q is None:
                    return None
                continue
            i = w.buf.find(HEADER, max(q - w.base, 0))
            if i < 0:
                if w.eof:
                    return None
                q = max(q, w.end - (len(HEADER) - 1))
                w.mark = q
                w.fill(w.end + 1)
                continue
            q = w.base + i
            if self._plausible(w, q):
                return q
            tries += 1
            q += 1

    def _resync_block(self, w: _Window, q: int) -> tuple[bool, int | None]:
        """One step of :meth:`_resync` over the buffered bytes from ``q``:
        every record header whose fixed part is buffered is found at once,
        those whose record cannot fit in the file are dropped at once, and
        only the others are judged one by one (:meth:`_plausible`).

        Returns ``(True, offset)`` of a plausible record header,
        ``(False, where to go on)``, or ``(False, None)`` at the end of the
        file."""
        import numpy as np

        rel = max(q - w.base, 0)
        n = len(w.buf) - rel - HEADER_SIZE + 1  # positions with a whole fixed part
        if n <= 0:
            if w.eof:
                return False, None
            w.fill(w.end + max(w.chunk, HEADER_SIZE))
            return False, q
        base = w.base + rel
        a = np.frombuffer(w.buf, np.uint8, count=n + HEADER_SIZE - 1, offset=rel)
        at = np.flatnonzero((a[:n] == HEADER[0]) & (a[1:n + 1] == HEADER[1]) & (a[2:n + 2] == HEADER[2]))
        if len(at) and self._size is not None:
            length = a[at + LENGTH_OFFSET].astype(np.int64)
            for k in range(1, 4):
                length |= a[at + LENGTH_OFFSET + k].astype(np.int64) << (8 * k)
            at = at[base + at + HEADER_SIZE + length <= self._size]
        for i in at.tolist():
            x = base + i
            w.mark = x
            if self._plausible(w, x):
                return True, x
        return False, base + n

    def _sound(self, w: _Window, q: int) -> bool:
        """Whether the record at ``q`` (header bytes not checked) fits in
        the file, ends at a record header or the end of the file, and has
        no record header with the next id inside it (:meth:`_next_inside`)."""
        fixed = w.peek(q, HEADER_SIZE)
        if len(fixed) < HEADER_SIZE:
            return False
        e = q + HEADER_SIZE + LENGTH_FIELD.unpack_from(fixed, LENGTH_OFFSET)[0]
        if w.too_far(e):
            return False
        return _chains(w.peek(e - 1, 4)) and self._next_inside(w, q, e) is None

    @staticmethod
    def _continues(w: _Window, p: int, end: int) -> bool:
        """Whether the record at ``end`` continues the ids of the record at
        ``p`` (its id is the next one)."""
        a = w.peek(p + 3, 4)
        b = w.peek(end + 3, 4)
        return len(a) == 4 and len(b) == 4 and _ID.unpack(b)[0] == (_ID.unpack(a)[0] + 1) & 0xFFFFFFFF

    @staticmethod
    def _flipped_end(w: _Window, p: int, end: int, length: int) -> int | None:
        """Where the record at ``p`` would end if one bit of its length field
        were flipped, when a fixed part that continues the record's id and
        timestamp (the next id, a timestamp not earlier) starts there, with
        its header intact, or damaged but either followed at ``end`` by the
        id after it or not overlapping the fixed part at ``end``: the
        evidence that the length field, not the data, is what is wrong.
        Looks inside the record and up to ``_LOOKAHEAD`` bytes past its
        claimed ``end``; returns that offset, or None."""
        mine = w.peek(p + 3, _ID_TS.size)
        if len(mine) < _ID_TS.size:
            return None
        rid, ts = _ID_TS.unpack(mine)
        want = (rid + 1) & 0xFFFFFFFF
        after = w.peek(end + 3, 4)
        after_id = _ID.unpack(after)[0] if len(after) == 4 else None
        limit = end + _LOOKAHEAD
        # Most candidates are buffered: a look at their id first, cheaply.
        wanted = _ID.pack(want)
        buf, base = w.buf, w.base
        for bit in range(32):
            e = p + HEADER_SIZE + (length ^ (1 << bit))
            if e > limit:
                continue
            r = e + 3 - base
            if 0 <= r and r + 4 <= len(buf) and buf[r:r + 4] != wanted:
                continue
            fixed = w.peek(e, HEADER_SIZE)
            if len(fixed) < HEADER_SIZE:
                continue
            oid, ots = _ID_TS.unpack_from(fixed, 3)
            if oid != want or ots < ts:
                continue
            # A record there: its header intact; or a damaged header, and
            # either the record at the claimed end has the id after it or
            # the two fixed parts do not overlap (one shifted by a byte
            # inserted into the other's is the other, not evidence).
            if fixed[:3] == HEADER or after_id == (want + 1) & 0xFFFFFFFF or abs(e - end) >= HEADER_SIZE:
                return e
        return None

    @staticmethod
    def _next_inside(w: _Window, p: int, end: int, after_id: int | None = None) -> int | None:
        """Offset of the fixed part of the record that should follow the
        record at ``p`` (the next id) inside that record, in its first
        ``_LOOKAHEAD`` bytes, or None: the record's length field then spans
        records. Without ``after_id``: a record header followed by the next
        id. With ``after_id`` (the id of the record at the claimed ``end``):
        also a timestamp not earlier than the record's own, and either an
        intact record header or, inside the data and not overlapping the
        fixed part at ``end``, ``after_id`` being the id after it (a
        damaged header between the two records it sits between); failing
        that, a record header with the id after the next one (the next
        record's header damaged too). Bounded searches of the bytes for the
        ids, whatever the data holds."""
        mine = w.peek(p + 3, _ID_TS.size)
        if len(mine) < _ID_TS.size:
            return None
        rid, ts = _ID_TS.unpack(mine)
        want = (rid + 1) & 0xFFFFFFFF
        start = p + len(HEADER)
        stop = min(end, p + HEADER_SIZE + _LOOKAHEAD)  # a fixed part starts before stop
        if stop <= start:
            return None
        if after_id is None:
            pattern = HEADER + _ID.pack(want)
            piece = w.peek(start, stop - start + len(pattern) - 1)
            i = piece.find(pattern, 0, stop - start + len(pattern) - 1)
            return None if i < 0 else start + i
        piece = w.peek(start, stop - start + HEADER_SIZE)
        ident = _ID.pack(want)
        between = after_id == (want + 1) & 0xFFFFFFFF
        j = piece.find(ident, 3)
        while 0 <= j < stop - start + 3:
            x = start + j - 3
            if j + 12 <= len(piece) and _TS.unpack_from(piece, j + 4)[0] >= ts and (
                piece[j - 3:j] == HEADER
                or (between and x >= p + HEADER_SIZE and end - x >= HEADER_SIZE)
            ):
                return x
            j = piece.find(ident, j + 1)
        # The record after the next one, its header intact (the next one's
        # header damaged as well as this record's length).
        pattern = HEADER + _ID.pack((want + 1) & 0xFFFFFFFF)
        i = piece.find(pattern, 0, stop - start + len(pattern) - 1)
        while i >= 0:
            if i + 15 <= len(piece) and _TS.unpack_from(piece, i + 7)[0] >= ts:
                return start + i
            i = piece.find(pattern, i + 1, stop - start + len(pattern) - 1)
        return None

    @staticmethod
    def _past_the_end(p: int, index: int, length: int, q: int) -> str:
        return (f"record {index} at offset {p} is damaged: its length field (offset {p + LENGTH_OFFSET}) says "
                f"{length} data bytes, past the end of the file, but a record header follows at offset {q}")

    def _classify(self, w: _Window, p: int, index: int):
        """What is at ``p``, where a record should start (the slow path).

        A record is confirmed when its length field leads to a record header
        (or to the end of the file): at once when that record continues its
        ids; otherwise unless one flipped bit of its length would end it
        where the next id starts (:meth:`_flipped_end`) or a record header
        with the next id starts inside it (:meth:`_next_inside`: its length
        field would then span records, as a flipped high bit of a length
        makes it do). A record not followed
        by a record header is confirmed when what follows reads as a record
        with a damaged header that is itself sound (:meth:`_sound`).

        Returns ``("record", size)``, ``("end", 0)``, ``("truncated",
        (size, expected))`` or ``("damage", (reason, resync offset or None
        if not searched yet))``.
        """
        fixed = w.get(p, HEADER_SIZE)
        if not fixed:
            return "end", 0
        head = fixed[:3]
        if head != HEADER[: len(head)]:
            return "damage", (
                f"bad record header {head.hex(' ')} at offset {p} (record {index}), expected {HEADER.hex(' ')}",
                None,
            )
        if len(fixed) < HEADER_SIZE:  # a killed writer left a prefix of the fixed part
            return "truncated", (len(fixed), None)
        length = LENGTH_FIELD.unpack_from(fixed, LENGTH_OFFSET)[0]
        total = HEADER_SIZE + length
        end = p + total
        if w.too_far(end):
            # A stream (no seek) would have to be buffered up to this
            # record's claimed end: read on without keeping it instead. The
            # record is truncated if the stream ends before that end (as
            # in a file), damage if a plausible record header follows.
            q = self._resync(w, p + 1)
            if q is None and w.end < end:
                return "truncated", (w.end - p, total)
            if q is not None:
                w.fill(w.mark + _STREAM_AHEAD)  # does the stream end before the record would?
                if w.eof and w.end < end:
                    return "damage", (self._past_the_end(p, index, length, q), q)
            return "damage", (
                f"record {index} at offset {p} is damaged or cannot be confirmed: its length field (offset "
                f"{p + LENGTH_OFFSET}) says {length} data bytes, more than a reader of a stream that cannot seek "
                f"looks ahead ({_STREAM_AHEAD} bytes), and "
                + (f"a record header follows at offset {q}" if q is not None else "no record header follows it"),
                q,
            )
        after = w.peek(end - 1, 4)
        if not after:
            # The record runs past the end of the file: truncated, unless a
            # plausible record follows (then its length field is damaged).
            q = self._resync(w, p + 1)
            if q is None:
                return "truncated", (w.end - p, total)
            return "damage", (self._past_the_end(p, index, length, q), q)
        if _chains(after):
            if len(after) == 4 and self._continues(w, p, end):
                # The next record continues this one's ids: this reading
                # wins over any other, whatever the data holds.
                return "record", total
            other = self._flipped_end(w, p, end, length)
            if other is not None:
                q = other if other > end and self._plausible(w, other) else None
                where = "records start inside it" if other < end else "the record that follows it starts"
                return "damage", (
                    f"record {index} at offset {p} is damaged: its length field (offset {p + LENGTH_OFFSET}) says "
                    f"{length} data bytes, but {where} at offset {other} (the next id and timestamp, where "
                    f"one flipped bit of that length would end it)",
                    q,
                )
            next_id = w.peek(end + 3, 4)
            inner = self._next_inside(w, p, end, _ID.unpack(next_id)[0] if len(next_id) == 4 else None)
            if inner is not None:
                return "damage", (
                    f"record {index} at offset {p} is damaged: its length field (offset {p + LENGTH_OFFSET}) says "
                    f"{length} data bytes, but records start inside it at offset {inner}",
                    None,
                )
            return "record", total
        # Not followed by a record header. Either this record's length field
        # is damaged, or the next record's header is: tell them apart by
        # whether the next record, read from its own length field, is sound
        # and continues this one. Otherwise the record is not delivered: its
        # end cannot be confirmed.
        if self._sound(w, end) and self._next_inside(w, p, end) is None:
            return "record", total
        return "damage", (
            f"record {index} at offset {p} is damaged or followed by garbage: its length field "
            f"(offset {p + LENGTH_OFFSET}) says {length} data bytes, but the bytes after it at offset {end} are "
            f"{after[1:].hex(' ')}, not a record header {HEADER.hex(' ')} or the end of the file",
            None,
        )

    def _scan(self) -> Iterator[tuple[int, bytes]]:
        self._rewind()
        self.truncated = None
        self.records_read = 0
        self._record_bytes = 0
        self._damaged = []
        self._damaged_count = 0
        self._skipped = 0
        self._finished = False
        w = _Window(self._file, self.data_offset, self._chunk_size)
        rest = _remaining(self._file)
        self._size = None if rest is None else self.data_offset + rest
        unpack_from = LENGTH_FIELD.unpack_from
        head_id = _HEAD_ID.unpack_from
        p = self.data_offset
        index = 0
        while True:
            # Fast path, through what is buffered: a record header, and the
            # next one right after the record.
            buf = w.buf
            base = w.base
            rel = p - base
            limit = len(buf) - HEADER_SIZE
            # Records and skipped regions tile the file up to here.
            origin = self.data_offset + self._skipped - base
            # A record is delivered at once when the record header that
            # follows it has the next id (then no other reading of the bytes
            # can win, whatever its data holds); otherwise the slow path
            # looks closer. Runs of up to _RUN records.
            while rel <= limit and buf[rel:rel + 3] == HEADER:
                start = rel
                ends = []
                ident = unpack_from(buf, rel + 3)[0]
                while rel <= limit and len(ends) < _RUN:
                    end = rel + HEADER_SIZE + unpack_from(buf, rel + LENGTH_OFFSET)[0]
                    try:
                        head, following = head_id(buf, end)
                    except struct.error:  # the next fixed part is not buffered
                        break
                    if head != HEADER:
                        break
                    if following != ident + 1 and not _no_evidence(buf, rel, end, ident):
                        break  # the slow path judges it (also an id wrapping round)
                    ident = following
                    ends.append(end)
                    rel = end
                full = len(ends) == _RUN
                at = start
                for end in ends:
                    index += 1
                    self.records_read = index
                    self._record_bytes = end - origin
                    yield base + at, buf[at:end]
                    at = end
                if not full:
                    break
            p = base + rel
            w.mark = p
            kind, what = self._classify(w, p, index)
            if kind == "record":
                index += 1
                self.records_read = index
                self._record_bytes += what
                yield p, w.get(p, what)
                p += what
                continue
            if kind == "end":
                self._finished = True
                return
            if kind == "truncated":
                size, expected = what
                self._finished = True
                self._truncation(p, size, expected, index)
                return
            reason, q = what
            self._damaged_count += 1
            if not self.recover:
                self._damaged.append(DamagedRegion(p, None, index, reason))
                raise MalformedReadout(reason)
            if q is None:
                q = self._resync(w, p + 1)
            end = w.end if q is None else q  # at the end of the file if None
            if len(self._damaged) < MAX_DAMAGED_REGIONS:
                self._damaged.append(DamagedRegion(p, end - p, index, reason))
            self._skipped += end - p
            if q is None:
                self._finished = True
                return
            p = q


class ApxWriter:
    """Writes an ``.apx`` file: the header at once, then one record per
    :meth:`write`.

    Every record is handed to the file in a single ``write()`` call of the
    whole serialized record, so a killed writer leaves at most one partial
    record at the end of the file, which :class:`ApxReader` reports.

    Args:
        file: a path, or a binary file object opened for writing (flushed but
            not closed by the writer).
        header: the JSON header (a mapping, JSON-serializable). Default
            ``{"readout_uid": 4000}``; a header without ``readout_uid`` gets
            it as its first key; a ``readout_uid`` other than 4000 raises
            ``ValueError``. Serialized with ``json.dumps`` defaults, as
            astropix-analysis does.
        flush: when written records leave the Python process:

            * ``"record"`` (default): the file is unbuffered; every
              :meth:`write` is one ``os.write`` of the record. A killed process
              loses at most the record it was writing.
            * ``"batch"``: buffered; flushed at the end of every
              :meth:`write_many` call and by :meth:`flush`. A killed process
              loses at most the batch in progress.
            * ``"none"``: buffered; flushed when the buffer is full and on
              :meth:`close`. Fastest; a killed process loses up to a buffer
              (and may leave a partial record, which the reader reports).
        fsync: also ``os.fsync`` the file at every flush point (every record,
            every batch, or only on close), so that a power loss cannot lose
            what was flushed.

            Measured cost (45-byte simulated records, ext4, one core): about
            660k records/s with ``"record"``, 1.8M/s with ``"batch"`` (1000
            per batch) and 1.9M/s with ``"none"``; with ``fsync=True``, about
            7k/s with ``"record"`` (one fsync per record: use it only at low
            rates), 1.3M/s with ``"batch"``. The default costs ~1.5 us per
            record, far below any readout period of the chip.
        mode: ``"wb"`` (truncate an existing file) or ``"xb"`` (fail if the
            file exists).
        buffer_size: buffer size for the ``"batch"`` and ``"none"`` policies.

    Raises:
        TypeError, ValueError: bad arguments (naming them).
        OSError: the file cannot be created.

    Attributes:
        header: the header dict that was written.
        path: the path, or None for a file object.
        records_written: number of records written.
        bytes_written: bytes written, header included.
    """

    def __init__(
        self,
        file,
        header: Mapping | None = None,
        *,
        flush: str = "record",
        fsync: bool = False,
        mode: str = "wb",
        buffer_size: int = 1 << 16,
    ) -> None:
        check_choice("flush", flush, FLUSH_POLICIES, what="a flush policy")
        check_bool("fsync", fsync)
        check_choice("mode", mode, ("wb", "xb"), what="a write mode")
        check_int("buffer_size", buffer_size, 1)
        self.header = _make_header(header)
        encoded = json.dumps(self.header).encode("utf-8")
        self.flush_policy = flush
        self.fsync = fsync
        self.records_written = 0
        self.bytes_written = 0
        if _is_path(file):
            self.path = os.fspath(file)
            self._file = open(file, mode, buffering=0 if flush == "record" else buffer_size)
            self._owns = True
        else:
            if not hasattr(file, "write"):
                raise TypeError(f"file={file!r:.60} must be a path or a binary file object opened for writing")
            self.path = None
            self._file = file
            self._owns = False
        try:
            self._write(APX_MAGIC + _U32.pack(len(encoded)) + encoded)
            self._sync()  # a reader sees a complete header from the start
        except BaseException:
            self.close()
            raise

    # -- internals ----------------------------------------------------------

    def _write(self, data: bytes) -> None:
        f = self._file
        if f is None:
            raise ValueError("I/O operation on a closed ApxWriter")
        written = f.write(data)
        # A raw file may write less than asked (disk full, signal); finish the
        # record, the caller must not interleave anything into it.
        if written is not None and written < len(data):
            view = memoryview(data)[written:]
            while view:
                n = f.write(view)
                if n is None:
                    raise BlockingIOError("the .apx output file is non-blocking and would block")
                view = view[n:]
        self.bytes_written += len(data)

    def _sync(self) -> None:
        f = self._file
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())

    @staticmethod
    def _serialize(readout) -> bytes:
        if isinstance(readout, AstroPix4Readout):
            return readout.to_bytes()
        if isinstance(readout, (bytes, bytearray, memoryview)):
            data = readout if type(readout) is bytes else bytes(readout)
            error = parse_readout_header(data)[0]
            if error:
                raise MalformedReadout(f"refusing to write a malformed record: {readout_error_message(data, error)}")
            return data
        raise TypeError(
            f"readout={readout!r:.60} must be an AstroPix4Readout or a serialized readout (bytes-like)"
        )

    # -- public -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._file is None

    def write(self, readout) -> int:
        """Append one readout; return the number of bytes written.

        Args:
            readout: an :class:`AstroPix4Readout`, or a serialized readout
                (bytes-like), which is checked (header, length field) and
                written unchanged.

        Raises:
            MalformedReadout: ``readout`` is bytes but not a well-formed
                serialized readout; nothing is written.
            TypeError: ``readout`` is of another type.
            ValueError: the writer is closed.
        """
        record = self._serialize(readout)
        self._write(record)
        self.records_written += 1
        if self.flush_policy == "record":
            # Our own file is unbuffered; a caller's file object may not be.
            if not self._owns or self.fsync:
                self._sync()
        return len(record)

    def write_many(self, readouts: Iterable) -> int:
        """Append readouts (each as in :meth:`write`); return how many.

        A malformed one raises :class:`MalformedReadout`; the ones before it
        are written. With ``flush="batch"`` the file is flushed at the end.
        """
        count = 0
        try:
            for readout in readouts:
                self.write(readout)
                count += 1
        finally:
            if self.flush_policy == "batch" and self._file is not None:
                self._sync()
        return count

    def write_records(self, data, lengths) -> int:
        """Append serialized readouts that lie back to back in ``data``
        (``lengths[i]`` bytes each), as a receiver's
        :class:`~mcast_trio.ReadoutChunk` holds them (``chunk.data``,
        ``chunk.lengths``); return how many.

        All are checked at once (header, length field, as :meth:`write`
        checks one) and written in one ``write()`` call, flushed as
        :meth:`write_many` flushes: the fast path of a recorder.

        Raises:
            MalformedReadout: one of them is malformed (the message says
                which); nothing is written.
            ValueError: ``lengths`` do not add up to ``len(data)``, or the
                writer is closed.
        """
        if self._file is None:
            raise ValueError("I/O operation on a closed ApxWriter")
        check_readouts(data, lengths)
        count = len(lengths)
        if count:
            self._write(data if type(data) is bytes else memoryview(data).cast("B"))
            self.records_written += count
            if self.flush_policy in ("record", "batch") and (not self._owns or self.fsync
                                                            or self.flush_policy == "batch"):
                self._sync()
        return count

    def flush(self) -> None:
        """Flush the Python buffer (and ``fsync`` if asked) now."""
        if self._file is None:
            raise ValueError("I/O operation on a closed ApxWriter")
        self._sync()

    def close(self) -> None:
        """Flush and close the file (if the writer opened it). Idempotent."""
        f = self._file
        if f is None:
            return
        try:
            self._sync()
        finally:
            self._file = None
            if self._owns:
                f.close()

    def __enter__(self) -> ApxWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _make_header(header: Mapping | None) -> dict:
    if header is None:
        return {"readout_uid": READOUT_UID}
    if not isinstance(header, Mapping):
        raise TypeError(f"header={header!r:.60} must be a mapping (a JSON object) or None")
    if "readout_uid" in header:
        uid = header["readout_uid"]
        if type(uid) is not int or uid != READOUT_UID:
            raise ValueError(f"readout_uid={uid!r} in header is not supported; allowed: {READOUT_UID} (AstroPix 4)")
        result = dict(header)
    else:
        result = {"readout_uid": READOUT_UID, **header}
    try:
        json.dumps(result)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"header is not JSON-serializable: {exc}") from None
    return result


def open_apx(
    file,
    mode: str = "rb",
    header: Mapping | None = None,
    *,
    flush: str | None = None,
    fsync: bool | None = None,
    strict: bool | None = None,
    recover: bool | None = None,
):
    """Open an ``.apx`` file for reading or writing.

    Args:
        file: a path or a binary file object.
        mode: ``"rb"`` to read, ``"wb"`` to write (truncating), ``"xb"`` to
            write a new file.
        header: the header to write (write modes only), see
            :class:`ApxWriter`.
        flush: flush policy (write modes only): ``"record"`` (default),
            ``"batch"`` or ``"none"``, see :class:`ApxWriter`.
        fsync: also fsync at every flush point (write modes only).
        strict: raise :class:`MalformedReadout` instead of warning on a
            truncated final record (read mode only).
        recover: skip damaged regions of the file, resynchronizing on the
            next plausible record header, instead of raising
            :class:`MalformedReadout` (read mode only); see
            :class:`ApxReader` and :meth:`ApxReader.statistics`.

    Returns:
        An :class:`ApxReader` (``"rb"``) or an :class:`ApxWriter`; both are
        context managers.

    Example::

        with open_apx("run.apx", "wb", {"run": 12}) as out:
            for readout in readouts:
                out.write(readout)
        with open_apx("run.apx") as apx:
            print(apx.metadata)
            for batch in apx.batches():
                decoded = mcast_trio.decode_readouts(batch)
    """
    check_choice("mode", mode, ("rb", "wb", "xb"), what="supported")
    if mode == "rb":
        for name, value in (("header", header), ("flush", flush), ("fsync", fsync)):
            if value is not None:
                raise ValueError(f"{name}={value!r} only applies to the write modes 'wb' and 'xb', not mode='rb'")
        return ApxReader(
            file,
            strict=False if strict is None else strict,
            recover=False if recover is None else recover,
        )
    for name, value in (("strict", strict), ("recover", recover)):
        if value is not None:
            raise ValueError(f"{name}={value!r} only applies to mode='rb', not mode={mode!r}")
    return ApxWriter(
        file,
        header,
        flush="record" if flush is None else flush,
        fsync=False if fsync is None else fsync,
        mode=mode,
    )
