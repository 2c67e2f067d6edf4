"""The seam between the transport and the network.

Senders and receivers never touch sockets directly: they ask the *current
network* for endpoints. The default network is the real one (sockets from
``_sockets``, batched syscalls from ``_batchio``); ``mcast_trio.testing``
provides an in-memory network with the same interface, with which the real
``open_sender``/``open_receiver`` run unchanged (as trio's fake network
plugs in behind its public socket seam). A fake network uses only public
names: it fills the receiver's batch with
:meth:`~mcast_trio._io._batchio.ReceiveBatch.store`, one datagram and its
sender per slot, then sets ``batch.count``, and the receiver reads the
batch as it reads one filled by ``recvmmsg``.

A network has two methods:

* ``open_receiver(spec, *, rcvbuf)`` -> a receiver endpoint with
  ``granted_rcvbuf``, ``receive_batch(batch) -> int`` (non-blocking, fills a
  :class:`~mcast_trio._io._batchio.ReceiveBatch` from slot 0 and sets its
  ``count``; returns the count, 0 when nothing is queued),
  ``kernel_drops(batch=None) -> int | None`` (datagrams dropped for lack
  of buffer space since the endpoint was opened, None if the network cannot
  tell; cumulative, never wrapping, never going down: with a ``batch``, as
  far as the datagrams just received in it tell, without a system call;
  without one, right now, drops after the last queued datagram included:
  the receive loop asks so when it goes idle, the receiver whenever its
  statistics are taken; after ``close()``, the last count),
  ``async wait_readable()`` and ``close()`` (never raises, never blocks;
  leaves the group); optionally ``discard_queued() -> (count, nbytes)``
  (the receiver calls it at close: takes the datagrams still queued out of
  the socket without reading them, at most as many as its buffer can hold,
  so that they are counted);
* ``open_sender(spec, *, sndbuf, loop, local_address)`` -> a sender endpoint
  with ``send_batch(datagrams) -> int`` (non-blocking; how many left, 0 when
  the buffer is full), ``send_one(datagram)`` (non-blocking, one datagram;
  raises ``BlockingIOError`` when the buffer is full; optional: without it
  the sender calls ``send_batch([datagram])``), ``async wait_writable()``
  and ``close()``. ``send_batch`` and ``send_one`` raise another ``OSError``
  for a datagram the network refuses (the sender counts it and goes on).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
from collections.abc import Iterator
from typing import Any

import trio

from . import _batchio, _constants, _sockets

__all__ = ["SocketNetwork", "current_network", "use_network"]


class _SocketReceiver:
    __slots__ = ("sock", "spec", "granted_rcvbuf", "_drops", "_known", "_closed")

    def __init__(self, spec, rcvbuf) -> None:
        self.spec = spec
        self.sock, self.granted_rcvbuf = _sockets.open_receiver_socket(spec, rcvbuf=rcvbuf)
        self._drops = _sockets.DropCounter()
        self._closed = False
        # Whether the OS reports drops at all (SO_MEMINFO or SO_RXQ_OVFL).
        self._known = _sockets.socket_drop_count(self.sock) is not None \
            or _constants.SO_RXQ_OVFL is not None

    def receive_batch(self, batch) -> int:
        return _batchio.receive_batch(self.sock, batch)

    def kernel_drops(self, batch=None) -> int | None:
        if not self._known:
            return None
        if batch is not None:
            # The value the batch's datagrams carried (no system call); 0
            # means none carried one (the kernel attaches it once non-zero).
            return self._drops.update(batch.kernel_drops or None)
        if self._closed:
            return self._drops.total
        return self._drops.update(_sockets.socket_drop_count(self.sock))

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    def discard_queued(self) -> tuple[int, int]:
        if self._closed:
            return 0, 0
        # The queue cannot hold more datagrams than its buffer has room for
        # at the kernel's smallest cost per datagram (its data plus a
        # buffer head of a few hundred bytes): a sender still sending cannot
        # keep the close going.
        return _batchio.discard_queued(self.sock, max(self.granted_rcvbuf, 1 << 16) // 256 + 1)

    def close(self) -> None:
        if not self._closed:
            self.kernel_drops()  # the last reading, while the socket exists
            self._closed = True
        _sockets.close_receiver_socket(self.sock, self.spec)


class _SocketSender:
    __slots__ = ("sock", "send_one", "_plain")

    def __init__(self, spec, sndbuf, loop, local_address) -> None:
        self.sock = _sockets.open_sender_socket(spec, sndbuf=sndbuf, loop=loop, local_address=local_address)
        try:
            # A second, plain socket object on a duplicate of the descriptor
            # (the same socket): its bound ``send`` is ``send_one``, the
            # cheapest way to hand one datagram to the kernel from Python
            # (non-blocking: BlockingIOError when the buffer is full).
            # Closed with the endpoint; being a duplicate, it can never close
            # someone else's descriptor.
            plain = socket.socket(self.sock.family, self.sock.type, self.sock.proto,
                                  fileno=os.dup(self.sock.fileno()))
            plain.setblocking(False)
        except BaseException:
            _sockets.close_sender_socket(self.sock)
            raise
        self._plain = plain
        self.send_one = plain.send
        if getattr(spec, "unicast", False):
            # A unicast sender's socket is connected, so an ICMP "port
            # unreachable" (nobody listening yet) is reported by the *next*
            # send, which then did not send its own datagram. The error is
            # cleared by being reported: send once more, so that nothing is
            # lost once a receiver starts (as mcast_trio.astropix does).
            send = plain.send

            def send_one(datagram, _send=send):
                try:
                    return _send(datagram)
                except ConnectionRefusedError:
                    return _send(datagram)

            self.send_one = send_one

    def send_batch(self, datagrams) -> int:
        try:
            return _batchio.send_batch(self.sock, datagrams)
        except BlockingIOError:
            return 0
        except ConnectionRefusedError:
            # See send_one: the error belonged to an earlier datagram.
            try:
                return _batchio.send_batch(self.sock, datagrams)
            except BlockingIOError:
                return 0

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self.sock)

    def close(self) -> None:
        try:
            self._plain.close()
        except OSError:  # never raises: the descriptor is our own duplicate
            pass
        _sockets.close_sender_socket(self.sock)


class SocketNetwork:
    """The real network: UDP multicast sockets (the default)."""

    def open_receiver(self, spec, *, rcvbuf) -> _SocketReceiver:
        return _SocketReceiver(spec, rcvbuf)

    def open_sender(self, spec, *, sndbuf=None, loop=True, local_address=None) -> _SocketSender:
        return _SocketSender(spec, sndbuf, loop, local_address)

    def __repr__(self) -> str:
        return "<SocketNetwork>"


_SOCKETS = SocketNetwork()
_current: contextvars.ContextVar[Any] = contextvars.ContextVar("mcast_trio_network", default=_SOCKETS)


def current_network():
    """The network new senders and receivers use in this context."""
    return _current.get()


@contextlib.contextmanager
def use_network(network) -> Iterator[Any]:
    """Make ``network`` the current network inside the ``with`` block (and in
    tasks spawned from it); the real socket network is the default."""
    token = _current.set(network)
    try:
        yield network
    finally:
        _current.reset(token)
