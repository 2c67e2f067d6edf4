"""Non-blocking batched receive and send of UDP datagrams.

:func:`receive_batch` fills a preallocated :class:`ReceiveBatch` with as
many queued datagrams as fit, in one ``recvmmsg(2)`` call (Linux, compiled
:mod:`mcast_trio._io._mmsg`) or a non-blocking ``recvmsg`` loop elsewhere; it
returns 0 when nothing is queued instead of blocking. A trio receive task
drains a socket like this::

    batch = ReceiveBatch(capacity=64, slot_size=65536)
    while True:
        n = receive_batch(sock, batch)
        if n == 0:
            await trio.lowlevel.wait_readable(sock)
            continue
        decode(batch.buffer, batch.offsets[:n], batch.lengths[:n])
        await trio.lowlevel.checkpoint()  # see below

:func:`send_batch` is the sending counterpart (``sendmmsg(2)``).

Neither function is async and neither blocks, so neither is a checkpoint:
while datagrams keep arriving the loop above never reaches
``wait_readable``, so it must checkpoint after each batch (or every few)
to let other tasks run and to deliver cancellation.
"""

from __future__ import annotations

import errno as _errno
import operator
import socket
import sys
from typing import Any, Iterable

import numpy as np

from .. import _validate
from . import _constants as _c
from ._sockets import pack_sockaddr

try:
    from . import _mmsg
except ImportError:  # not compiled (e.g. a source checkout): pure Python
    _mmsg = None  # type: ignore[assignment]

__all__ = ["ReceiveBatch", "receive_batch", "send_batch", "HAVE_MMSG"]

#: Whether the compiled recvmmsg/sendmmsg path is in use.
HAVE_MMSG: bool = bool(_mmsg is not None and _mmsg.HAVE_MMSG)

_MAX_CAPACITY = 1024  # the kernel's UIO_MAXIOV cap on one recvmmsg call
_HAS_RECVMSG = hasattr(socket.socket, "recvmsg_into")
_ANC_SIZE = socket.CMSG_SPACE(4) if (_HAS_RECVMSG and _c.SO_RXQ_OVFL is not None) else 0
_WSAEMSGSIZE = 10040


class ReceiveBatch:
    """Preallocated storage for one batch of received datagrams.

    Allocated once and reused by every :func:`receive_batch` call (use one
    batch per socket: the drop counter is per socket). Datagram ``i`` (for
    ``i < count``) is ``buffer[offsets[i] : offsets[i] + lengths[i]]``.
    The arrays are overwritten by the next call: copy what must outlive it.

    :func:`receive_batch` fills a batch from a socket; a fake network (such
    as :class:`mcast_trio.testing.MemoryNetwork`) or a test fills it with
    :meth:`store`, one datagram per slot, and then sets :attr:`count`.

    Args:
        capacity: most datagrams per call, 1..1024.
        slot_size: bytes reserved per datagram, 1..65536 (default 65536:
            no UDP datagram is truncated). A longer datagram is cut to the
            slot and flagged in :attr:`truncated`.

    Attributes:
        buffer (numpy.ndarray): ``uint8[capacity * slot_size]``.
        offsets (numpy.ndarray): ``int64[capacity]``, ``i * slot_size``
            (constant).
        lengths (numpy.ndarray): ``int64[capacity]``: bytes stored for each
            datagram (at most ``slot_size``).
        truncated (numpy.ndarray): ``bool[capacity]``: the datagram was
            longer than ``slot_size`` (``MSG_TRUNC``); its tail is lost.
        families (numpy.ndarray): ``uint8[capacity]``: the sender's address
            family, 4 (IPv4), 6 (IPv6) or 0 (unknown: no address reported).
        addresses (numpy.ndarray): ``uint8[capacity, 16]``: the sender's
            address in network byte order (IPv4: the first 4 bytes, the
            rest zero).
        ports (numpy.ndarray): ``uint16[capacity]``: the sender's port.
        scope_ids (numpy.ndarray): ``uint32[capacity]``: the sender's IPv6
            scope id (0 for IPv4).
        count (int): how many entries the last call filled.
        capacity (int), slot_size (int): as constructed.

    Raises:
        ValueError, TypeError: ``capacity`` or ``slot_size`` is invalid.
    """

    __slots__ = (
        "capacity", "slot_size", "buffer", "offsets", "lengths", "truncated", "count",
        "families", "addresses", "ports", "scope_ids", "_native", "_drops", "_view",
        "_mv_lengths", "_mv_truncated", "_mv_families", "_mv_addresses", "_mv_ports",
        "_mv_scope_ids",
    )

    def __init__(self, capacity: int = 64, slot_size: int = 65536) -> None:
        capacity = _validate.check_int("capacity", capacity, 1, _MAX_CAPACITY)
        slot_size = _validate.check_int("slot_size", slot_size, 1, 65536)
        self.capacity = capacity
        self.slot_size = slot_size
        self.buffer = np.zeros(capacity * slot_size, dtype=np.uint8)
        self.offsets = np.arange(capacity, dtype=np.int64) * slot_size
        self.lengths = np.zeros(capacity, dtype=np.int64)
        self.truncated = np.zeros(capacity, dtype=np.bool_)
        self.count = 0
        self.families = np.zeros(capacity, dtype=np.uint8)
        self.addresses = np.zeros((capacity, 16), dtype=np.uint8)
        self.ports = np.zeros(capacity, dtype=np.uint16)
        self.scope_ids = np.zeros(capacity, dtype=np.uint32)
        self._drops = -1
        self._view = memoryview(self.buffer)
        # flat memoryviews for the pure-Python path (faster than numpy setitem)
        self._mv_lengths = memoryview(self.lengths)
        self._mv_truncated = memoryview(self.truncated.view(np.uint8))
        self._mv_families = memoryview(self.families)
        self._mv_addresses = memoryview(self.addresses.reshape(-1))
        self._mv_ports = memoryview(self.ports)
        self._mv_scope_ids = memoryview(self.scope_ids)
        self._native = None
        if HAVE_MMSG:
            self._native = _mmsg.RecvMmsg(
                self.buffer, slot_size, self.lengths, self.truncated.view(np.uint8),
                self.families, self.addresses, self.ports, self.scope_ids)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (f"<ReceiveBatch count={self.count} capacity={self.capacity}"
                f" slot_size={self.slot_size}>")

    def _check_index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.count:
            raise IndexError(f"datagram index {i} out of range; this batch holds {self.count}")
        return i

    def datagram(self, i: int) -> memoryview:
        """Datagram ``i`` as a read-only view into :attr:`buffer` (no copy)."""
        i = self._check_index(i)
        start = i * self.slot_size
        return self._view[start:start + int(self.lengths[i])].toreadonly()

    def source(self, i: int) -> tuple[str, int] | tuple[str, int, int, int] | None:
        """The sender of datagram ``i`` in :mod:`socket` form.

        Returns:
            ``(host, port)`` for IPv4, ``(host, port, 0, scope_id)`` for
            IPv6 (like ``recvfrom``; the flow label is not kept), ``None``
            if the kernel reported no address.
        """
        i = self._check_index(i)
        fam = int(self.families[i])
        if fam == 4:
            host = socket.inet_ntop(socket.AF_INET, self.addresses[i, :4].tobytes())
            return (host, int(self.ports[i]))
        if fam == 6:
            host = socket.inet_ntop(socket.AF_INET6, self.addresses[i].tobytes())
            return (host, int(self.ports[i]), 0, int(self.scope_ids[i]))
        return None

    def sources(self) -> list[Any]:
        """:meth:`source` for every datagram of the batch."""
        return [self.source(i) for i in range(self.count)]

    def same_source(self, positions: Any = None) -> bool:
        """Whether the datagrams at ``positions`` (an index array or list;
        default: all :attr:`count`) all came from one sender: the same
        family, address and port. True for fewer than two datagrams."""
        if positions is None:
            positions = slice(0, self.count)
        families = self.families[positions]
        if len(families) < 2:
            return True
        ports = self.ports[positions]
        addresses = self.addresses[positions]
        return bool((families == families[0]).all() and (ports == ports[0]).all()
                    and (addresses == addresses[0]).all())

    def store(self, i: int, data: Any, source: Any) -> None:
        """Put one datagram into slot ``i``, as :func:`receive_batch` would
        have: how a fake network or a test fills a batch. The caller sets
        :attr:`count` when the batch is complete.

        Args:
            i: the slot, ``0..capacity - 1``.
            data: the datagram (bytes-like); copied, cut to
                :attr:`slot_size` (then flagged in :attr:`truncated`).
            source: the sender in :mod:`socket` form, ``(host, port)`` or
                ``(host, port, flowinfo, scope_id)`` with a numeric host
                (IPv4 or IPv6), or ``None`` if unknown.

        Raises:
            IndexError: ``i`` is not a slot of this batch.
        """
        i = operator.index(i)
        if not 0 <= i < self.capacity:
            raise IndexError(f"slot {i} out of range; this batch has {self.capacity}")
        view = memoryview(data).cast("B")
        size = min(view.nbytes, self.slot_size)
        start = i * self.slot_size
        self._view[start:start + size] = view[:size]
        self._mv_lengths[i] = size
        self._mv_truncated[i] = 1 if view.nbytes > self.slot_size else 0
        self._mv_families[i], self._mv_addresses[i * 16:i * 16 + 16], self._mv_ports[i], \
            self._mv_scope_ids[i] = _parse_source(source)

    @property
    def truncated_count(self) -> int:
        """How many datagrams of the last call were truncated."""
        return int(np.count_nonzero(self.truncated[:self.count]))

    @property
    def kernel_drops(self) -> int | None:
        """The socket's cumulative kernel drop counter (``SO_RXQ_OVFL``).

        The value carried by the latest received datagram that had one (the
        kernel attaches it once it is non-zero; sockets from
        :func:`mcast_trio._io._sockets.open_receiver_socket` ask for it), else 0.
        Drops become visible here with the next datagram queued *after*
        them; :func:`mcast_trio._io._sockets.socket_drop_count` reads the
        counter immediately. ``None`` where the OS has no such counter.
        Wraps at 2**32.
        """
        if _c.SO_RXQ_OVFL is None:
            return None
        drops = self._drops
        if self._native is not None:
            drops = max(drops, self._native.drops)
        return max(int(drops), 0)


def receive_batch(sock: Any, batch: ReceiveBatch) -> int:
    """Receive the datagrams queued on ``sock`` into ``batch``, without blocking.

    One ``recvmmsg`` call (GIL released) where available. Not a trio
    checkpoint: when it returns 0, ``await trio.lowlevel.wait_readable(sock)``.

    Args:
        sock: a UDP socket (trio or stdlib), e.g. from
            :func:`mcast_trio._io._sockets.open_receiver_socket`.
        batch: the preallocated batch to fill.

    Returns:
        int: the number of datagrams received, ``0..batch.capacity``
        (``batch.count`` is set to it). 0 means nothing was queued.

    Raises:
        OSError: the socket failed (not EAGAIN/EINTR), e.g. it was closed.
    """
    native = batch._native
    if native is not None:
        fd = sock.fileno()
        if fd < 0:
            raise OSError(_errno.EBADF, "receive_batch on a closed socket")
        n = native.recv(fd)
    else:
        n = _receive_batch_fallback(sock, batch)
    batch.count = n
    return n


def _stdlib_view(sock: Any) -> socket.socket:
    """A temporary stdlib socket object for ``sock``'s descriptor.

    The caller must ``detach()`` it (not close it): the descriptor belongs
    to ``sock``.
    """
    fd = sock.fileno()
    if fd < 0:
        raise OSError(_errno.EBADF, "socket is closed")
    return socket.socket(sock.family, sock.type, sock.proto, fileno=fd)


def discard_queued(sock: Any, limit: int) -> tuple[int, int]:
    """Take at most ``limit`` datagrams out of ``sock``'s queue without
    copying them (``MSG_TRUNC``: the kernel reports each one's size), until
    the queue is empty; never blocks, never raises.

    Returns:
        ``(count, nbytes)``: the datagrams taken and their sizes.
    """
    count = nbytes = 0
    scratch = bytearray(1)
    flags = socket.MSG_DONTWAIT | getattr(socket, "MSG_TRUNC", 0)
    try:
        s = _stdlib_view(sock)
    except OSError:
        return 0, 0
    try:
        while count < limit:
            try:
                size = s.recv_into(scratch, 1, flags)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            count += 1
            nbytes += size
    finally:
        s.detach()
    return count, nbytes


def _receive_batch_fallback(sock: Any, batch: ReceiveBatch) -> int:
    """Pure-Python :func:`receive_batch`: same results, one syscall per datagram."""
    s = _stdlib_view(sock)
    try:
        n = 0
        size = batch.slot_size
        view = batch._view
        lengths = batch._mv_lengths
        truncated = batch._mv_truncated
        families, ports, scopes = batch._mv_families, batch._mv_ports, batch._mv_scope_ids
        addresses = batch._mv_addresses
        last_address: Any = None
        parsed = (0, b"\0" * 16, 0, 0)
        while n < batch.capacity:
            slot = view[n * size:(n + 1) * size]
            flags = 0
            anc: list[Any] = []
            try:
                if _HAS_RECVMSG:
                    nbytes, anc, flags, address = s.recvmsg_into([slot], _ANC_SIZE,
                                                                 _c.MSG_DONTWAIT)
                else:
                    nbytes, address = s.recvfrom_into(slot)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if getattr(exc, "winerror", None) == _WSAEMSGSIZE:  # Windows: truncated
                    nbytes, address, flags = size, None, _c.MSG_TRUNC
                else:
                    raise
            lengths[n] = nbytes if nbytes < size else size
            truncated[n] = 1 if flags & _c.MSG_TRUNC else 0
            if address != last_address:
                parsed = _parse_source(address)
                last_address = address
            families[n], addresses[n * 16:n * 16 + 16], ports[n], scopes[n] = parsed
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == _c.SO_RXQ_OVFL and len(data) >= 4:
                    batch._drops = int.from_bytes(data[:4], sys.byteorder)
            n += 1
        batch.count = n
        return n
    finally:
        s.detach()


def _parse_source(address: Any) -> tuple[int, bytes, int, int]:
    """(family code, 16 address bytes, port, scope id) of a socket address:
    ``(host, port)`` or ``(host, port, flowinfo, scope_id)``; the host is
    IPv6 if it has a colon (so ``("::1", port)`` is IPv6, scope 0)."""
    if not isinstance(address, tuple) or len(address) < 2:
        return (0, bytes(16), 0, 0)
    host = str(address[0]).partition("%")[0]
    try:
        if ":" in host:
            scope = int(address[3]) if len(address) >= 4 else 0
            return (6, socket.inet_pton(socket.AF_INET6, host), int(address[1]), scope)
        return (4, socket.inet_pton(socket.AF_INET, host).ljust(16, b"\0"), int(address[1]), 0)
    except (OSError, ValueError):
        return (0, bytes(16), 0, 0)


def send_batch(sock: Any, datagrams: Iterable[Any], address: tuple[Any, ...] | None = None
               ) -> int:
    """Send datagrams without blocking, up to 1024 per syscall (``sendmmsg``).

    Not a trio checkpoint. When it returns fewer than were given, the
    socket buffer is full: ``await trio.lowlevel.wait_writable(sock)`` and
    send the rest. Order is preserved.

    Args:
        sock: a UDP socket (trio or stdlib).
        datagrams: C-contiguous bytes-like objects (``bytes``, ``bytearray``,
            ``memoryview``, numpy arrays), one datagram each.
        address: the destination in :mod:`socket` form (numeric host), or
            ``None`` for a connected socket (e.g. from
            :func:`mcast_trio._io._sockets.open_sender_socket`).

    Returns:
        int: how many of ``datagrams``, from the start, were sent; 0 if the
        socket buffer is full. If an error hits a datagram after some were
        sent, those are counted and the error is raised by the next call
        (which starts with the failing datagram).

    Raises:
        OSError: the first datagram could not be sent (not EAGAIN), e.g.
            ``EMSGSIZE`` or ``ENETUNREACH``.
        ValueError: a datagram is longer than 65535 bytes, or ``address``
            is malformed; nothing was sent.
    """
    items = datagrams if isinstance(datagrams, list) else list(datagrams)
    name = None if address is None else pack_sockaddr(sock.family, address)
    if HAVE_MMSG:
        return int(_mmsg.sendmmsg(sock.fileno(), items, name))
    return _send_batch_fallback(sock, items, address)


def _send_batch_fallback(sock: Any, items: list[Any], address: tuple[Any, ...] | None) -> int:
    """Pure-Python :func:`send_batch`: same results, one syscall per datagram."""
    for i, item in enumerate(items):
        size = memoryview(item).nbytes
        if size > 65535:
            raise ValueError(f"datagrams[{i}] has {size} bytes; a UDP datagram carries at"
                             " most 65507 (IPv4) or 65527 (IPv6) bytes")
    s = _stdlib_view(sock)
    sent = 0
    try:
        for item in items:
            try:
                if address is None:
                    s.send(item, _c.MSG_DONTWAIT)
                else:
                    s.sendto(item, _c.MSG_DONTWAIT, address)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                if sent:
                    break
                raise
            sent += 1
        return sent
    finally:
        s.detach()
