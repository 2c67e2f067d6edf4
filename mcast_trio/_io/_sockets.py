"""Multicast UDP sockets: receivers and senders, opened, configured and closed.

This is the only module of mcast_trio that calls ``setsockopt``. The
functions here are synchronous and never block: they create, configure and
close sockets. The trio tasks that move datagrams are built on top of them
(see :mod:`mcast_trio._io._batchio` for the batched, non-blocking receive/send).

Typical use::

    spec = resolve_group("239.255.0.1", 5000)          # loopback by default
    sock, granted = open_receiver_socket(spec)          # trio socket
    try:
        ...  # receive_batch(sock, batch) / await trio.lowlevel.wait_readable(sock)
    finally:
        close_receiver_socket(sock, spec)               # never raises

Design choices:

Groups are validated beforehand by :func:`mcast_trio._io._groups.resolve_group`
(which gives the :class:`~mcast_trio._io._groups.GroupSpec` used here:
loopback by default, no control groups) and interfaces found by
:mod:`mcast_trio._io._interfaces`.

* **Receivers get only their group.** They bind to the group address (on
  POSIX; Windows refuses that bind, there the wildcard is used) *and* turn
  ``IP_MULTICAST_ALL``/``IPV6_MULTICAST_ALL`` off (Linux), so a receiver
  never sees another group that happens to use the same port.
* **Several monitors per host.** Receivers set ``SO_REUSEADDR`` and, where
  it exists, ``SO_REUSEPORT``; both, so that we can share the port with
  programs that set either one (SO_REUSEPORT: same user). Linux
  load-balances *unicast* datagrams across a SO_REUSEPORT group but
  delivers each *multicast* datagram to every member, which is what
  monitors need (tested).
* **Unicast to loopback.** astropix-analysis defaults to ``127.0.0.1``:
  a loopback unicast "group" is accepted (``GroupSpec.unicast``); its
  receiver binds the address without ``SO_REUSEADDR``/``SO_REUSEPORT``
  (one socket gets a unicast stream; sharing would split it) and joins
  nothing. Other unicast addresses need ``allow_unicast=True``.
* **Clear "port in use".** ``EADDRINUSE`` on bind becomes an ``OSError``
  (same errno) naming the group, the port and the likely cause.
* **Receive buffer.** The requested ``SO_RCVBUF`` is set and the size the
  kernel granted is read back (Linux reports twice the usable request;
  the value returned here is comparable with the request). A
  :class:`BufferSizeWarning` is emitted when the kernel granted less
  (``net.core.rmem_max`` on Linux). ``SO_RCVBUFFORCE`` is not used.
* **Drops.** ``SO_RXQ_OVFL`` is switched on where it exists, so each
  datagram carries the socket's cumulative kernel drop counter; see
  :func:`socket_drop_count` for an immediate reading.
* **Senders** are connected to the group (route looked up once, and
  ``sock.send`` works), set the multicast interface, TTL / hop limit and
  loopback, and are non-blocking.
"""

from __future__ import annotations

import errno as _errno
import ipaddress
import os
import socket
import struct
import threading
import warnings
from typing import Any

import trio

from .. import _validate
from . import _constants as _c
from ._groups import AddressLike, GroupSpec, parse_address
from ._interfaces import family_name, family_of, split_scope

__all__ = [
    "BufferSizeWarning",
    "DEFAULT_RCVBUF",
    "check_bufsize",
    "check_timeout",
    "close_receiver_socket",
    "close_sender_socket",
    "open_blocking_receiver_socket",
    "open_blocking_sender_socket",
    "open_receiver_socket",
    "open_sender_socket",
    "pack_sockaddr",
    "set_socket_option",
    "DropCounter",
    "socket_drop_count",
]

#: Default receive buffer request for receivers, bytes (4 MiB).
DEFAULT_RCVBUF = 4 * 1024 * 1024
_MAX_BUFSIZE = 1 << 30  # the kernel doubles SO_RCVBUF into an int


class BufferSizeWarning(RuntimeWarning):
    """The kernel granted a smaller socket buffer than requested.

    On Linux the cap is ``net.core.rmem_max`` (receive) or
    ``net.core.wmem_max`` (send); raise it with ``sysctl -w``.
    """


# ---------------------------------------------------------------------------
# C structures
# ---------------------------------------------------------------------------


def pack_sockaddr(family: int, address: tuple[Any, ...]) -> bytes:
    """Pack a :mod:`socket`-style address into a C ``struct sockaddr``.

    Args:
        family: ``socket.AF_INET`` or ``socket.AF_INET6``.
        address: ``(host, port)`` for IPv4; ``(host, port[, flowinfo[,
            scope_id]])`` for IPv6. ``host`` must be numeric; an IPv6 host
            may carry ``%interface`` instead of a scope id.

    Returns:
        bytes: ``sockaddr_in`` (16 bytes) or ``sockaddr_in6`` (28 bytes) in
        this platform's layout.

    Raises:
        ValueError: the address is malformed.
    """
    if not isinstance(address, tuple) or len(address) < 2:
        raise ValueError(f"address={address!r} is not a (host, port) tuple")
    host, port = address[0], address[1]
    port = _validate.check_int("port", port, 0, 65535)
    if not isinstance(host, str):
        host = str(host)
    if family == socket.AF_INET:
        try:
            packed = socket.inet_pton(socket.AF_INET, host)
        except OSError:
            raise ValueError(f"address={address!r}: {host!r} is not an IPv4 address") from None
        if _c.PLATFORM_BSD_SOCKADDR:
            head = struct.pack("=BB", 16, socket.AF_INET)
        else:
            head = struct.pack("=H", socket.AF_INET)
        return head + struct.pack("!H", port) + packed + bytes(8)
    if family == socket.AF_INET6:
        host, scope = split_scope(host)
        flowinfo = _validate.check_int("flowinfo", address[2], 0, 0xFFFFF) if len(address) > 2 else 0
        scope_id = _validate.check_int("scope_id", address[3], 0, 0xFFFFFFFF) if len(address) > 3 else 0
        if scope:
            scope_id = int(scope) if scope.isdigit() else _name_to_index(scope)
        try:
            packed = socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            raise ValueError(f"address={address!r}: {host!r} is not an IPv6 address") from None
        if _c.PLATFORM_BSD_SOCKADDR:
            head = struct.pack("=BB", 28, socket.AF_INET6)
        else:
            head = struct.pack("=H", socket.AF_INET6)
        return head + struct.pack("!HI", port, flowinfo) + packed + struct.pack("=I", scope_id)
    raise ValueError(f"family={family!r} is not supported; allowed: AF_INET, AF_INET6")


def _name_to_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise ValueError(f"interface {name!r} does not exist") from None


def _sockaddr_storage(family: int, host: str) -> bytes:
    return pack_sockaddr(family, (host, 0)).ljust(128, b"\0")


def _membership(spec: GroupSpec, join: bool) -> tuple[int, int, bytes]:
    """(level, option, value) to join or leave ``spec``'s group."""
    group = socket.inet_pton(spec.family, spec.group)
    if spec.family == socket.AF_INET:
        if spec.source is None:
            ifaddr = socket.inet_aton(spec.interface_address or "0.0.0.0")
            if _c.PLATFORM_LINUX:  # struct ip_mreqn: by index, unambiguous
                value = group + ifaddr + struct.pack("@i", spec.interface_index)
            else:  # struct ip_mreq
                value = group + ifaddr
            option = socket.IP_ADD_MEMBERSHIP if join else socket.IP_DROP_MEMBERSHIP
            return socket.IPPROTO_IP, option, value
        if spec.interface_address is not None:
            fields = {
                "multiaddr": group,
                "interface": socket.inet_aton(spec.interface_address),
                "sourceaddr": socket.inet_aton(spec.source),
            }
            value = b"".join(fields[name] for name in _c.IP_MREQ_SOURCE_ORDER)
            option = _c.IP_ADD_SOURCE_MEMBERSHIP if join else _c.IP_DROP_SOURCE_MEMBERSHIP
            return socket.IPPROTO_IP, _require(option, "IP_ADD_SOURCE_MEMBERSHIP"), value
        level = socket.IPPROTO_IP
    else:
        if spec.source is None:
            value = group + struct.pack("@I", spec.interface_index)
            option = _c.IPV6_JOIN_GROUP if join else _c.IPV6_LEAVE_GROUP
            return socket.IPPROTO_IPV6, _require(option, "IPV6_JOIN_GROUP"), value
        level = socket.IPPROTO_IPV6
    # struct group_source_req: protocol-independent, by interface index
    value = struct.pack(_c.GROUP_SOURCE_REQ_FORMAT, spec.interface_index,
                        _sockaddr_storage(spec.family, spec.group),
                        _sockaddr_storage(spec.family, spec.source))
    option = _c.MCAST_JOIN_SOURCE_GROUP if join else _c.MCAST_LEAVE_SOURCE_GROUP
    return level, _require(option, "MCAST_JOIN_SOURCE_GROUP"), value


def _require(option: int | None, name: str) -> int:
    if option is None:
        raise OSError(_errno.ENOPROTOOPT, f"{name} is not available on this platform")
    return option


# ---------------------------------------------------------------------------
# Opening and closing
# ---------------------------------------------------------------------------


def _oserror(exc: OSError, what: str) -> OSError:
    new = OSError(exc.errno, f"{what}: {exc.strerror or exc}")
    new.__cause__ = exc
    return new


def _bind_error(exc: OSError, spec: GroupSpec, address: tuple[Any, ...], *,
                local_address: Any = None) -> OSError:
    """The OSError to raise when a socket cannot bind; keeps the errno.

    A receiver's: names the group, the port and, for ``EADDRINUSE``, the
    likely cause. A sender's (``local_address`` given, the argument that
    made it bind): names ``local_address=`` with its value, the cause and
    what to do instead."""
    if local_address is not None:
        host = address[0]
        if exc.errno == _errno.EADDRNOTAVAIL:
            cause = f"{host} is not an address of this host"
        elif exc.errno == _errno.EADDRINUSE:
            cause = (f"no local port is free on {host} (all ports of"
                     " net.ipv4.ip_local_port_range are taken)")
        else:
            cause = f"the kernel refused to bind the sender to {address}"
        new = OSError(exc.errno, f"local_address={local_address!r}: {cause}"
                                 f" ({exc.strerror or exc}); allowed: a unicast address of this"
                                 f" host, preferably of interface {spec.interface_name!r}, or None"
                                 " (the interface's own address)")
        new.__cause__ = exc
        return new
    if exc.errno != _errno.EADDRINUSE:
        return _oserror(exc, f"cannot bind a receiver for {spec} to {address}")
    if spec.unicast:
        cause = (f"a unicast receiver owns its port alone, and another socket (another monitor,"
                 f" or an astropix-analysis receiver?) already holds port {spec.port};"
                 " stop it, or use a multicast group so that several monitors share the port")
    else:
        cause = (f"another program (an astropix-analysis receiver?) holds port {spec.port}"
                 " without SO_REUSEADDR, or another user's socket holds it with"
                 " SO_REUSEPORT; stop it or choose another port")
    new = OSError(exc.errno, f"cannot bind a receiver for {spec} to port {spec.port}: {cause}"
                             f" ({exc.strerror or exc})")
    new.__cause__ = exc
    return new


def _set_optional(sock: socket.socket, level: int, option: int | None, value: int) -> bool:
    """setsockopt for an option an older kernel may lack; False if refused."""
    if option is None:
        return False
    try:
        sock.setsockopt(level, option, value)
    except OSError as exc:
        if exc.errno in (_errno.ENOPROTOOPT, _errno.EINVAL, _errno.EOPNOTSUPP):
            return False
        raise
    return True


def _read_bufsize(sock: socket.socket, option: int) -> int:
    value = sock.getsockopt(socket.SOL_SOCKET, option)
    return value // 2 if _c.GETSOCKOPT_BUFSIZE_DOUBLED else value


def _set_bufsize(sock: socket.socket, option: int, requested: int, name: str,
                 sysctl: str) -> int:
    sock.setsockopt(socket.SOL_SOCKET, option, requested)
    granted = _read_bufsize(sock, option)
    if granted < requested:
        hint = f" (capped by {sysctl}; raise it with sysctl -w {sysctl}=...)" if (
            _c.PLATFORM_LINUX) else ""
        warnings.warn(BufferSizeWarning(
            f"{name}={requested}: the kernel granted only {granted} bytes{hint}"), stacklevel=4)
    return granted


def check_bufsize(name: str, value: Any) -> int:
    """A socket buffer size argument (``rcvbuf``, ``sndbuf``): bytes,
    ``1..2**30``.

    Raises:
        TypeError: not an integer.
        ValueError: out of range.
    """
    return _validate.check_int(name, value, 1, _MAX_BUFSIZE)


def _open_receiver_stdlib(spec: GroupSpec, rcvbuf: int | None) -> tuple[socket.socket, int]:
    if not isinstance(spec, GroupSpec):
        raise TypeError(f"spec={spec!r} is not a GroupSpec; build one with resolve_group()")
    if rcvbuf is not None:
        rcvbuf = check_bufsize("rcvbuf", rcvbuf)
    sock = socket.socket(spec.family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        if not spec.unicast:  # a unicast port is not shared: see resolve_group
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _set_optional(sock, socket.SOL_SOCKET, _c.SO_REUSEPORT, 1)
        if spec.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if not spec.unicast:
                _set_optional(sock, socket.IPPROTO_IPV6, _c.IPV6_MULTICAST_ALL, 0)
        elif not spec.unicast:
            _set_optional(sock, socket.IPPROTO_IP, _c.IP_MULTICAST_ALL, 0)
        if rcvbuf is not None:
            granted = _set_bufsize(sock, socket.SO_RCVBUF, rcvbuf, "rcvbuf",
                                   "net.core.rmem_max")
        else:
            granted = _read_bufsize(sock, socket.SO_RCVBUF)
        _set_optional(sock, socket.SOL_SOCKET, _c.SO_RXQ_OVFL, 1)
        if _c.BIND_TO_GROUP_ADDRESS or spec.unicast:
            address: tuple[Any, ...] = spec.sockaddr
        elif spec.family == socket.AF_INET6:
            address = ("::", spec.port, 0, 0)
        else:
            address = ("0.0.0.0", spec.port)
        try:
            sock.bind(address)
        except OSError as exc:
            raise _bind_error(exc, spec, address) from exc
        if not spec.unicast:
            level, option, value = _membership(spec, join=True)
            try:
                sock.setsockopt(level, option, value)
            except OSError as exc:
                raise _oserror(exc, f"cannot join {spec}") from exc
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, granted


def open_receiver_socket(
    spec: GroupSpec, *, rcvbuf: int | None = DEFAULT_RCVBUF
) -> tuple[trio.socket.SocketType, int]:
    """Open a non-blocking UDP socket that receives ``spec``'s group.

    The socket shares its port (``SO_REUSEADDR``, ``SO_REUSEPORT``), is bound
    to the group address, receives only that group (``IP_MULTICAST_ALL`` /
    ``IPV6_MULTICAST_ALL`` off on Linux), has joined the group on
    ``spec``'s interface (source-specific if ``spec.source`` is set) and,
    where available, reports kernel drops (``SO_RXQ_OVFL``).

    For a unicast ``spec`` (``spec.unicast``, e.g. astropix-analysis'
    default ``127.0.0.1``) the socket is bound to that address and port
    *without* ``SO_REUSEADDR``/``SO_REUSEPORT`` and joins nothing: it alone
    receives what is sent there, and a second receiver fails (``EADDRINUSE``).

    This function does not block. Close the socket with
    :func:`close_receiver_socket`.

    Args:
        spec: from :func:`resolve_group`.
        rcvbuf: ``SO_RCVBUF`` to request, bytes (default 4 MiB); ``None``
            keeps the kernel's default.

    Returns:
        (sock, granted): a :mod:`trio.socket` socket and the receive buffer
        the kernel granted, in the units of the request (on Linux:
        ``getsockopt(SO_RCVBUF) // 2``).

    Warns:
        BufferSizeWarning: the kernel granted less than ``rcvbuf``.

    Raises:
        OSError: binding or joining failed; the message names the group and
            the port, and for ``EADDRINUSE`` (kept as ``errno``) the likely
            cause: a program that holds the port without ``SO_REUSEADDR``
            (an astropix-analysis receiver is one) or, for unicast, another
            receiver.
        ValueError, TypeError: ``rcvbuf`` or ``spec`` is invalid.
    """
    sock, granted = _open_receiver_stdlib(spec, rcvbuf)
    return trio.socket.from_stdlib_socket(sock), granted


def _open_sender_stdlib(spec: GroupSpec, sndbuf: int | None, loop: bool,
                        local_address: AddressLike | None, connect: bool) -> socket.socket:
    if not isinstance(spec, GroupSpec):
        raise TypeError(f"spec={spec!r} is not a GroupSpec; build one with resolve_group()")
    if sndbuf is not None:
        sndbuf = check_bufsize("sndbuf", sndbuf)
    loop = _validate.check_bool("loop", loop)
    bind_to: tuple[Any, ...] | None = None
    if local_address is not None:
        addr, scope = parse_address("local_address", local_address,
                                    allowed="a unicast address of this host as a string, e.g. '127.0.0.1'"
                                    " or '::1', or None")
        if family_of(addr) != spec.family:
            raise ValueError(f"local_address={local_address!r} is not an"
                             f" {family_name(spec.family)} address; allowed: a unicast"
                             f" {family_name(spec.family)} address of this host")
        if addr.is_multicast:
            raise ValueError(f"local_address={local_address!r} is a multicast address;"
                             " allowed: a unicast address of this host")
        if addr.version == 4:
            bind_to = (str(addr), 0)
        else:
            scope_id = spec.interface_index if (addr.is_link_local or scope) else 0
            bind_to = (str(ipaddress.IPv6Address(addr.packed)), 0, 0, scope_id)
    if (spec.family == socket.AF_INET and spec.interface_address is None and bind_to is None
            and not spec.unicast):
        raise ValueError(f"spec={spec}: interface {spec.interface_name!r} has no IPv4 address,"
                         " so datagrams would leave with source 0.0.0.0 and be dropped;"
                         " allowed: an interface with an IPv4 address, or local_address=")
    sock = socket.socket(spec.family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        if spec.unicast:
            _configure_unicast_sender(sock, spec)
        elif spec.family == socket.AF_INET:
            if spec.interface_address is not None:
                ifvalue = socket.inet_aton(spec.interface_address)
            else:  # Linux only (resolve_group checked): struct ip_mreqn by index
                ifvalue = bytes(8) + struct.pack("@i", spec.interface_index)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, ifvalue)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, spec.ttl)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, int(loop))
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, spec.interface_index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, spec.ttl)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, int(loop))
        if sndbuf is not None:
            _set_bufsize(sock, socket.SO_SNDBUF, sndbuf, "sndbuf", "net.core.wmem_max")
        if bind_to is not None:
            try:
                sock.bind(bind_to)
            except OSError as exc:
                raise _bind_error(exc, spec, bind_to, local_address=local_address) from exc
        if connect:
            try:
                sock.connect(spec.sockaddr)
            except OSError as exc:
                raise _oserror(exc, f"cannot connect the sender to {spec}") from exc
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _configure_unicast_sender(sock: socket.socket, spec: GroupSpec) -> None:
    if spec.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if spec.ttl >= 1:  # resolve_group allows ttl=0 only towards loopback
        if spec.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, spec.ttl)
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, spec.ttl)


def open_sender_socket(
    spec: GroupSpec,
    *,
    sndbuf: int | None = None,
    loop: bool = True,
    local_address: AddressLike | None = None,
    connect: bool = True,
) -> trio.socket.SocketType:
    """Open a non-blocking UDP socket that sends to ``spec``'s group.

    Sets the outgoing interface (``IP_MULTICAST_IF`` with the interface's
    address, ``IPV6_MULTICAST_IF`` with its index), ``IP_MULTICAST_TTL`` /
    ``IPV6_MULTICAST_HOPS`` from ``spec.ttl`` and the multicast loopback.
    By default the socket is connected to the group, so ``sock.send`` and
    :func:`mcast_trio._io._batchio.send_batch` without an address work.

    For a unicast ``spec`` (``spec.unicast``) none of the multicast options
    is set; ``spec.ttl`` becomes ``IP_TTL`` / ``IPV6_UNICAST_HOPS``. A
    connected unicast socket reports an ICMP "port unreachable" (nobody
    listens) as ``ConnectionRefusedError`` from the *next* send, which did
    not send its datagram: sending it again does.

    This function does not block. Close the socket with
    :func:`close_sender_socket`.

    Args:
        spec: from :func:`resolve_group` (``spec.source`` is ignored).
        sndbuf: ``SO_SNDBUF`` to request, bytes; ``None`` keeps the default.
        loop: deliver to receivers on this host too (``IP_MULTICAST_LOOP``).
            On the loopback interface datagrams are delivered locally
            whatever this says: the interface itself loops them back.
        local_address: bind to this unicast address of the host first, e.g.
            so that receivers with a source-specific membership accept the
            datagrams; ``None`` lets the kernel choose.
        connect: connect the socket to the group (default).

    Returns:
        trio.socket.SocketType: the configured socket.

    Warns:
        BufferSizeWarning: the kernel granted less than ``sndbuf``.

    Raises:
        OSError: binding or connecting failed.
        ValueError, TypeError: an argument is invalid.
    """
    sock = _open_sender_stdlib(spec, sndbuf, loop, local_address, connect)
    return trio.socket.from_stdlib_socket(sock)


def check_timeout(timeout: Any) -> float | None:
    """A blocking socket's ``timeout`` argument: ``None`` (wait forever) or
    seconds in ``(0, threading.TIMEOUT_MAX]``, as a float.

    Raises:
        TypeError: not a number.
        ValueError: out of range.
    """
    if timeout is None:
        return None
    return _validate.check_number(
        "timeout", timeout, 0, threading.TIMEOUT_MAX, low_open=True,
        allowed=f"None (wait forever) or seconds in (0, {threading.TIMEOUT_MAX:g}]")


def open_blocking_receiver_socket(
    spec: GroupSpec, *, rcvbuf: int | None = DEFAULT_RCVBUF, timeout: float | None = None
) -> tuple[socket.socket, int]:
    """:func:`open_receiver_socket` for blocking code: a :mod:`socket` socket.

    Configured exactly like :func:`open_receiver_socket`, then put in
    blocking mode with ``timeout`` (:meth:`socket.socket.settimeout`).
    Close it with :func:`close_receiver_socket`.

    Args:
        spec: from :func:`resolve_group`.
        rcvbuf: as for :func:`open_receiver_socket`.
        timeout: seconds a receive may wait before ``TimeoutError``;
            ``None`` waits forever.

    Returns:
        (sock, granted): the socket and the receive buffer granted.

    Raises:
        OSError, ValueError, TypeError: as :func:`open_receiver_socket`, and
            for a bad ``timeout``.
    """
    timeout = check_timeout(timeout)
    sock, granted = _open_receiver_stdlib(spec, rcvbuf)
    sock.settimeout(timeout)
    return sock, granted


def open_blocking_sender_socket(
    spec: GroupSpec,
    *,
    sndbuf: int | None = None,
    loop: bool = True,
    local_address: AddressLike | None = None,
    timeout: float | None = None,
) -> socket.socket:
    """:func:`open_sender_socket` for blocking code: a connected :mod:`socket`
    socket in blocking mode with ``timeout``.

    Args:
        spec, sndbuf, loop, local_address: as for :func:`open_sender_socket`.
        timeout: seconds a send may wait for buffer space before
            ``TimeoutError``; ``None`` (default) waits as long as needed and
            costs no ``poll`` per send.

    Returns:
        socket.socket: the configured, connected socket.

    Raises:
        OSError, ValueError, TypeError: as :func:`open_sender_socket`, and
            for a bad ``timeout``.
    """
    timeout = check_timeout(timeout)
    sock = _open_sender_stdlib(spec, sndbuf, loop, local_address, True)
    sock.settimeout(timeout)
    return sock


def _close_quietly(sock: Any) -> None:
    try:
        sock.close()
    except RuntimeError:
        # A trio socket closed outside trio.run(): trio cannot notify
        # waiters (there are none), so close the descriptor directly.
        try:
            fd = sock.detach()
            if fd >= 0:
                os.close(fd)
        except OSError:
            pass
    except OSError:
        pass


def close_receiver_socket(sock: Any, spec: GroupSpec) -> None:
    """Leave ``spec``'s group and close ``sock``; never raises, never blocks.

    Safe to call more than once, on a socket whose open failed half-way,
    and from ``finally`` blocks during cancellation. If a trio task is
    waiting on the socket (``wait_readable``) and this runs inside
    ``trio.run``, that task gets :class:`trio.ClosedResourceError`.

    Args:
        sock: a socket from :func:`open_receiver_socket` (trio or stdlib).
        spec: the spec it was opened with.
    """
    try:
        if sock.fileno() >= 0 and not spec.unicast:
            level, option, value = _membership(spec, join=False)
            sock.setsockopt(level, option, value)
    except (OSError, ValueError):
        pass  # not joined (any more), or closed: closing drops it anyway
    _close_quietly(sock)


def close_sender_socket(sock: Any) -> None:
    """Close a sender socket; never raises, never blocks. Idempotent.

    Args:
        sock: a socket from :func:`open_sender_socket` (trio or stdlib).
    """
    _close_quietly(sock)


def set_socket_option(sock: Any, level: int, option: int, value: int | bytes) -> None:
    """``setsockopt`` on a socket this module opened (one owner for options).

    Args:
        sock: any socket (trio or stdlib).
        level, option, value: as for :meth:`socket.socket.setsockopt`.

    Raises:
        OSError: the kernel refused; the message names the option and value.
        TypeError: ``value`` is neither an int nor bytes.
    """
    if isinstance(value, bool) or not isinstance(value, (int, bytes, bytearray)):
        raise TypeError(f"value={value!r} is not an int or bytes; allowed: an int or the"
                        " option's C structure as bytes")
    try:
        sock.setsockopt(level, option, value)
    except OSError as exc:
        raise _oserror(exc, f"setsockopt(level={level}, option={option}, value={value!r})"
                       ) from exc


class DropCounter:
    """The kernel drop count of one receiving socket, cumulative and unwrapped.

    The kernel keeps one drop counter per socket (``sk_drops``, the "drops"
    column of ``/proc/net/udp``), 32 bits wide. It reaches user space two
    ways: as the ``SO_RXQ_OVFL`` value a received datagram carries (the
    counter when that datagram was queued: it lags, and never shows drops
    after the last datagram queued) and through :func:`socket_drop_count`
    (the counter now). Both are readings of the same counter, so they are
    not added: each reading advances the total by how far the counter moved
    since the previous one, modulo 2**32. A reading older than the previous
    one (a datagram's ``SO_RXQ_OVFL`` value after an immediate reading)
    moves the counter "backwards" by less than 2**31 and is ignored, so the
    total never goes down, never counts a drop twice, and survives the
    counter's wrap at 2**32 as long as fewer than 2**31 drops happen between
    two readings.

    Attributes:
        total (int): drops counted since the socket was opened.
    """

    __slots__ = ("_raw", "total")

    def __init__(self) -> None:
        self._raw = 0  # the counter starts at 0 when the socket is opened
        self.total = 0

    def update(self, raw: int | None) -> int:
        """Account for a reading ``raw`` of the 32-bit counter (None: no
        reading) and return :attr:`total`."""
        if raw is not None:
            delta = (raw - self._raw) & 0xFFFFFFFF
            if delta and delta < 0x80000000:
                self._raw = raw
                self.total += delta
        return self.total


def socket_drop_count(sock: Any) -> int | None:
    """The kernel's count of datagrams dropped for ``sock``, right now.

    Reads ``SK_MEMINFO_DROPS`` through ``getsockopt(SO_MEMINFO)`` (Linux);
    unlike the ``SO_RXQ_OVFL`` value carried by received datagrams, it
    includes drops after the last datagram that was queued. The counter is
    cumulative over the socket's life and wraps at 2**32.

    Args:
        sock: any socket (trio or stdlib).

    Returns:
        int | None: the count, or ``None`` where the OS cannot tell.
    """
    if _c.SO_MEMINFO is None:
        return None
    size = 4 * (_c.SK_MEMINFO_DROPS + 1)
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _c.SO_MEMINFO, 4 * 16)
    except (OSError, ValueError):
        return None
    if len(raw) < size:
        return None
    return int(struct.unpack_from("=I", raw, 4 * _c.SK_MEMINFO_DROPS)[0])
