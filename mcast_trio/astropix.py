"""Blocking drop-in replacements for astropix-analysis' multicast classes.

astropix-analysis (``astropix_analysis.sock``) offers two small socket
classes, ``MulticastSender`` and ``MulticastReceiver``. This module has the
same names, constructor signatures, defaults and return values, so that a
script ports by changing its imports::

    from mcast_trio.astropix import AstroPix4Readout, MulticastReceiver, MulticastSender

    sender = MulticastSender()                     # group="127.0.0.1", port=5007, ttl=2
    sender.send_readout(readout)                   # returns the bytes sent

    receiver = MulticastReceiver(AstroPix4Readout)  # group="127.0.0.1", port=5007
    readout = receiver.receive()                   # blocks; returns a readout
    hits = readout.decode()

It is blocking code, like the original: no trio, no ``async``. It shares the
socket layer (:mod:`mcast_trio._io`: validation, loopback by default,
port sharing) and the readout class and compiled decoder
(:class:`~mcast_trio.AstroPix4Readout`) with the rest of mcast_trio, and
adds what the originals lack:

* context managers (``with MulticastReceiver(...) as receiver:``);
* ``timeout=``: :meth:`MulticastReceiver.receive` raises ``TimeoutError``
  instead of blocking forever;
* :meth:`MulticastReceiver.statistics`: datagrams, malformed ones (with the
  last error), losses, duplicates, reordering and restarts per sender (the
  accounting of :class:`~mcast_trio.SequenceTracker` on the readout ids);
* several monitors per host on a multicast group (the port is shared);
* malformed datagrams are counted and skipped instead of raising out of
  ``receive()`` and killing the monitor loop;
* the compiled decoder, when ``readout_class`` is
  :class:`~mcast_trio.AstroPix4Readout` (re-exported here).

**The default group is unicast.** astropix-analysis' tools default to
``--group 127.0.0.1``, a unicast address: the DAQ then sends unicast
datagrams to ``127.0.0.1:5007``, and exactly one receiver can get them. A
:class:`MulticastReceiver` on that address owns the port alone (a second one
fails with a clear ``OSError``, ``EADDRINUSE``, instead of getting half the
stream). For several monitors, send to a multicast group, e.g.
``MulticastSender(group="239.255.0.1")`` and
``MulticastReceiver(AstroPix4Readout, group="239.255.0.1")``; the traffic
stays on the loopback interface unless ``interface=`` names another.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from ._io import _groups, _sockets
from ._errors import MalformedDatagram

try:  # the compiled send of a readout (Linux); elsewhere to_bytes() + send
    from ._io._mmsg import HAVE_MMSG as _HAVE_MMSG, send_readout as _send_readout_c
except ImportError:  # pragma: no cover - not compiled
    _HAVE_MMSG = False
    _send_readout_c = None
from ._readout import AstroPix4Readout
from ._counters import counters_for
from ._protocol._tracking import SenderStats, SenderTable
from ._validate import check_int

__all__ = [
    "AstroPix4Readout",
    "DEFAULT_PORT",
    "LOCAL_HOST",
    "MulticastReceiver",
    "MulticastSender",
    "ReceiverStatistics",
]

#: astropix-analysis' default destination: the local host (unicast).
LOCAL_HOST = "127.0.0.1"
#: astropix-analysis' default port.
DEFAULT_PORT = 5007

# The most data one readout datagram carries (65507 bytes of UDP payload
# over IPv4, less the 19-byte header); longer goes through to_bytes() and
# gets the kernel's EMSGSIZE.
_MAX_READOUT_DATA = 65507 - 19

# What a readout class's from_bytes may raise on bad bytes: ours raises
# MalformedReadout only; a foreign class (astropix-analysis' own) may raise
# the others.
_BAD_BYTES = (MalformedDatagram, ValueError, struct.error, IndexError, EOFError)
_MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0)


@dataclass(frozen=True)
class ReceiverStatistics:
    """A snapshot of a :class:`MulticastReceiver`'s counters.

    Attributes:
        datagrams: datagrams received from the socket.
        bytes: their bytes.
        readouts: well-formed readouts returned by ``receive()``.
        malformed: datagrams that were not a readout (counted, skipped).
        truncated: datagrams longer than ``max_size`` (counted, skipped).
        kernel_drops: datagrams the kernel dropped for lack of buffer space
            since the socket was opened (read from the socket when the
            statistics are taken; it does not wrap at 2**32), or None where
            the OS does not say.
        lost: readout ids never received, summed over ``senders``.
        duplicates: sum over ``senders``.
        reordered: sum over ``senders``.
        restarts: sum over ``senders``.
        senders: per-sender :class:`~mcast_trio.SenderStats` keyed by the
            source address ``(host, port)`` (IPv6: the 4-tuple).
        rcvbuf: the receive buffer the kernel granted, bytes.
        last_error: what was wrong with the last malformed or truncated
            datagram, or None.
    """

    datagrams: int = 0
    bytes: int = 0
    readouts: int = 0
    malformed: int = 0
    truncated: int = 0
    kernel_drops: int | None = None
    lost: int = 0
    duplicates: int = 0
    reordered: int = 0
    restarts: int = 0
    evicted: int = 0
    senders: Mapping[Any, SenderStats] = field(default_factory=dict)
    rcvbuf: int = 0
    last_error: str | None = None


_ReceiverCounters = counters_for(ReceiverStatistics)


class _SocketOwner:
    """What both classes share as owners of one blocking socket (``_sock``)
    for a group (``_spec``): options, descriptor, context manager, repr."""

    _sock: socket.socket
    _spec: _groups.GroupSpec
    _where = "on"  # "to" for a sender: how the repr names the group

    @property
    def spec(self) -> _groups.GroupSpec:
        """The validated group or destination (:class:`mcast_trio.GroupSpec`)."""
        return self._spec

    def set_option(self, level: int, option: int, value: int | bytes) -> None:
        """Set a socket option (``setsockopt``) on the underlying socket.

        astropix-analysis' classes *are* sockets, so its scripts may set
        options directly; this is the equivalent, e.g.
        ``sender.set_option(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)``.

        Raises:
            OSError: the kernel refused the option or value.
            TypeError: ``value`` is neither an int nor bytes.
        """
        _sockets.set_socket_option(self._sock, level, option, value)

    def fileno(self) -> int:
        """The socket's file descriptor (-1 once closed), e.g. for ``select``."""
        return self._sock.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock.fileno() < 0 else "open"
        return f"<mcast_trio.astropix.{type(self).__name__} {self._where} {self._spec} ({state})>"


class MulticastSender(_SocketOwner):
    """Send readouts to a group (or astropix-analysis' default unicast host).

    Same signature and defaults as astropix-analysis'
    ``MulticastSender(group, port, ttl)``; the other arguments are
    keyword-only additions. The socket is opened (and every argument
    checked) here; it is connected to the destination and blocking.

    Args:
        group: a multicast group, or a loopback unicast address (default
            ``"127.0.0.1"``, astropix-analysis' default: one receiver).
        port: UDP port, 1..65535 (default 5007).
        ttl: multicast TTL / hop limit (IPv4 TTL for unicast), 0..255
            (default 2, astropix-analysis' default).
        interface: the interface to send on: name, index or address;
            ``None`` (default) is the loopback interface, so nothing leaves
            the host.
        loop: deliver to receivers on this host too (default True).
        timeout: seconds a send may wait for socket buffer space before
            ``TimeoutError``; ``None`` (default) waits as needed.
        sndbuf: ``SO_SNDBUF`` to request, bytes; ``None`` keeps the default.
        allow_unicast: accept a unicast ``group`` that is not a loopback
            address (see :func:`mcast_trio.resolve_group`).
        allow_control_groups: accept link-local control groups
            (224.0.0.0/24, well-known ``ff02::`` groups), refused by default.

    Raises:
        ValueError, TypeError: an argument is invalid (the message names it,
            its value and what is allowed).
        OSError: the socket could not be opened.
    """

    _where = "to"

    def __init__(self, group: str = LOCAL_HOST, port: int = DEFAULT_PORT, ttl: int = 2, *,
                 interface: str | int | None = None, loop: bool = True,
                 timeout: float | None = None, sndbuf: int | None = None,
                 allow_unicast: bool = False, allow_control_groups: bool = False) -> None:
        self._spec = _groups.resolve_group(group, port, interface=interface, ttl=ttl,
                                            allow_unicast=allow_unicast,
                                            allow_control_groups=allow_control_groups)
        self._sock = _sockets.open_blocking_sender_socket(self._spec, sndbuf=sndbuf, loop=loop,
                                                          timeout=timeout)
        self._send = self._sock.send
        # An AstroPix4Readout goes out without being serialized in Python:
        # the header is built in C and sent with the data in one sendmsg
        # (the same bytes as to_bytes()). Only on a blocking socket: with a
        # timeout, socket.send does the waiting.
        self._fd = self._sock.fileno() if (_HAVE_MMSG and self._sock.gettimeout() is None) else -1

    def send_data(self, data) -> int:
        """Send one datagram.

        Args:
            data: bytes-like, at most 65507 bytes (IPv4).

        Returns:
            int: the number of bytes sent.

        Raises:
            OSError: the kernel refused it (e.g. ``EMSGSIZE``), or the
                sender is closed.
            TimeoutError: ``timeout`` passed without buffer space.
        """
        try:
            return self._send(data)
        except ConnectionRefusedError:
            # Unicast: an earlier datagram found nobody listening (ICMP port
            # unreachable); this one was not sent. Send it again.
            return self._send(data)

    def send_readout(self, readout) -> int:
        """Send a readout (its ``to_bytes()``) as one datagram.

        Args:
            readout: an :class:`~mcast_trio.AstroPix4Readout` or any object
                with ``to_bytes()`` (astropix-analysis' readouts too).

        Returns:
            int: the number of bytes sent.

        Raises:
            TypeError: ``readout`` has no ``to_bytes()`` (send serialized
                bytes with :meth:`send_data`).
            OSError, TimeoutError: as :meth:`send_data`.
        """
        if type(readout) is AstroPix4Readout and self._fd >= 0:
            data = readout.data()
            if len(data) <= _MAX_READOUT_DATA:
                try:
                    return _send_readout_c(self._fd, data, readout.readout_id, readout.timestamp)
                except ConnectionRefusedError:  # see send_data
                    return _send_readout_c(self._fd, data, readout.readout_id, readout.timestamp)
        try:
            to_bytes = readout.to_bytes
        except AttributeError:
            raise TypeError(f"readout={readout!r:.60} has no to_bytes(); allowed: a readout such"
                            " as AstroPix4Readout; send serialized bytes with send_data()") from None
        data = to_bytes()
        try:
            return self._send(data)
        except ConnectionRefusedError:
            return self._send(data)

    def close(self) -> None:
        """Close the socket; idempotent, never raises."""
        self._fd = -1  # never a descriptor number that may be reused
        _sockets.close_sender_socket(self._sock)


class MulticastReceiver(_SocketOwner):
    """Receive readouts from a group (or astropix-analysis' default unicast host).

    Same signature and defaults as astropix-analysis'
    ``MulticastReceiver(readout_class, group, port)``; the other arguments
    are keyword-only additions. The socket is opened (and every argument
    checked) here.

    On a multicast group the port is shared, so several monitors on one host
    each get every datagram. On a unicast address (the default
    ``127.0.0.1``) this receiver owns the port alone; a second receiver there
    raises ``OSError`` (``EADDRINUSE``) naming the group, the port and the
    likely cause, as does a multicast receiver whose port another program
    holds without ``SO_REUSEADDR`` (an astropix-analysis receiver does).

    Args:
        readout_class: the readout type expected, with ``from_bytes()``:
            :class:`~mcast_trio.AstroPix4Readout` (compiled decoder) or
            astropix-analysis' own class.
        group: a multicast group, or a loopback unicast address (default
            ``"127.0.0.1"``).
        port: UDP port, 1..65535 (default 5007).
        interface: the interface to join on: name, index or address;
            ``None`` (default) is the loopback interface. A receiver on the
            wrong interface receives nothing and says nothing: see
            :doc:`/porting`.
        timeout: seconds :meth:`receive` waits before ``TimeoutError``;
            ``None`` (default) waits forever, like the original.
        rcvbuf: ``SO_RCVBUF`` to request, bytes (default 4 MiB).
        source: accept datagrams from this source address only
            (source-specific multicast).
        allow_unicast: accept a unicast ``group`` that is not a loopback
            address.
        allow_control_groups: accept link-local control groups
            (224.0.0.0/24, well-known ``ff02::`` groups), refused by default.
        max_senders: senders whose losses are tracked at once (default 64).
        loss_window: readout ids a late datagram may be behind and still
            count as reordered rather than lost (default 1024).

    Raises:
        ValueError, TypeError: an argument is invalid (the message names it).
        OSError: the socket could not be bound or could not join the group.
    """

    DEFAULT_MAX_PACKET_SIZE = 65535

    def __init__(self, readout_class: type, group: str = LOCAL_HOST, port: int = DEFAULT_PORT, *,
                 interface: str | int | None = None, timeout: float | None = None,
                 rcvbuf: int | None = _sockets.DEFAULT_RCVBUF, source: str | None = None,
                 allow_unicast: bool = False, allow_control_groups: bool = False,
                 max_senders: int = 64, loss_window: int = 1024) -> None:
        if not callable(getattr(readout_class, "from_bytes", None)):
            raise TypeError(f"readout_class={readout_class!r} has no from_bytes(); allowed: a"
                            " readout class such as AstroPix4Readout")
        self._readout_class = readout_class
        self._spec = _groups.resolve_group(group, port, interface=interface, source=source,
                                            allow_unicast=allow_unicast,
                                            allow_control_groups=allow_control_groups)
        check_int("max_senders", max_senders, 1, 1 << 20)
        check_int("loss_window", loss_window, 1, 1 << 16)
        self._senders: SenderTable = SenderTable(max_senders, window=loss_window)
        self._timeout = _sockets.check_timeout(timeout)
        self._sock, self._rcvbuf = _sockets.open_blocking_receiver_socket(
            self._spec, rcvbuf=rcvbuf, timeout=self._timeout)
        self._c = _ReceiverCounters()
        # The socket's drop counter, unwrapped; None where the OS cannot tell.
        self._drops: _sockets.DropCounter | None = (
            _sockets.DropCounter() if _sockets.socket_drop_count(self._sock) is not None else None)

    def receive(self, max_size: int = DEFAULT_MAX_PACKET_SIZE):
        """Wait for the next well-formed readout and return it.

        Datagrams that are not a readout, or longer than ``max_size``, are
        counted in :meth:`statistics` (with ``last_error``) and skipped.

        Args:
            max_size: the largest datagram accepted, 1..65535 bytes.

        Returns:
            A ``readout_class`` instance.

        Raises:
            TimeoutError: ``timeout`` seconds passed without a readout.
            OSError: the receiver is closed, or the socket failed.
            ValueError, TypeError: ``max_size`` is invalid.
        """
        check_int("max_size", max_size, 1, 65535)
        sock = self._sock
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        try:
            while True:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"no readout from {self._spec} within"
                                           f" timeout={self._timeout} s")
                    sock.settimeout(remaining)
                try:
                    data, _anc, flags, address = sock.recvmsg(max_size)
                except TimeoutError:
                    raise TimeoutError(f"no readout from {self._spec} within"
                                       f" timeout={self._timeout} s") from None
                self._c.datagrams += 1
                self._c.bytes += len(data)
                if flags & _MSG_TRUNC:
                    self._c.truncated += 1
                    self._c.last_error = (f"a datagram from {address} longer than max_size={max_size}"
                                        " bytes was truncated and skipped")
                    continue
                try:
                    readout = self._readout_class.from_bytes(data)
                except _BAD_BYTES as exc:
                    self._c.malformed += 1
                    self._c.last_error = f"{exc} (datagram of {len(data)} bytes from {address})"
                    continue
                self._c.readouts += 1
                readout_id = getattr(readout, "readout_id", None)
                if readout_id is not None:
                    self._senders.observe(address, int(readout_id) & 0xFFFFFFFF)
                    self._senders.tracker(address).add_volume(0, len(data))
                return readout
        finally:
            if deadline is not None and sock.fileno() >= 0:
                sock.settimeout(self._timeout)

    def statistics(self) -> ReceiverStatistics:
        """A frozen snapshot of the counters (see :class:`ReceiverStatistics`)."""
        senders = self._senders.snapshot()
        return self._c.snapshot(kernel_drops=self._kernel_drops(),
                                senders=MappingProxyType(senders), rcvbuf=self._rcvbuf,
                                **self._senders.totals(senders))

    def _kernel_drops(self) -> int | None:
        """The socket's drop counter now (the last reading once closed)."""
        drops = self._drops
        if drops is None:
            return None
        if self._sock.fileno() < 0:
            return drops.total
        return drops.update(_sockets.socket_drop_count(self._sock))

    def close(self) -> None:
        """Leave the group and close the socket; idempotent, never raises."""
        self._kernel_drops()  # the last reading, kept for statistics()
        _sockets.close_receiver_socket(self._sock, self._spec)
