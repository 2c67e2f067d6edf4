"""Multicast UDP sockets: group validation, receivers, senders.

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

* **Loopback by default.** ``interface=None`` selects the loopback
  interface, so nothing leaves the host unless an interface is named.
  Linux does not deliver IPv6 multicast over ``lo``; for IPv6 there the
  interface must be named (``interface="eth0"`` or ``"ff12::1%eth0"``).
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
* **No control groups.** 224.0.0.0/24 and the IPv6 well-known link-local
  protocol groups are refused unless ``allow_control_groups=True``.
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

import ctypes
import dataclasses
import errno as _errno
import ipaddress
import operator
import os
import socket
import threading
import struct
import warnings
from typing import Any, NamedTuple, Union

import trio

from . import _constants as _c

__all__ = [
    "BufferSizeWarning",
    "DEFAULT_RCVBUF",
    "GroupSpec",
    "close_receiver_socket",
    "close_sender_socket",
    "open_blocking_receiver_socket",
    "open_blocking_sender_socket",
    "open_receiver_socket",
    "open_sender_socket",
    "pack_sockaddr",
    "resolve_group",
    "set_socket_option",
    "socket_drop_count",
]

#: Default receive buffer request for receivers, bytes (4 MiB).
DEFAULT_RCVBUF = 4 * 1024 * 1024
_MAX_BUFSIZE = 1 << 30  # the kernel doubles SO_RCVBUF into an int

_AddressLike = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]


class BufferSizeWarning(RuntimeWarning):
    """The kernel granted a smaller socket buffer than requested.

    On Linux the cap is ``net.core.rmem_max`` (receive) or
    ``net.core.wmem_max`` (send); raise it with ``sysctl -w``.
    """


# ---------------------------------------------------------------------------
# Interfaces
# ---------------------------------------------------------------------------


class _Interface(NamedTuple):
    name: str
    index: int
    flags: int | None  # None: unknown (no getifaddrs)
    ipv4: tuple[str, ...]
    ipv6: tuple[tuple[str, int], ...]  # (address, scope id)


class _ifaddrs(ctypes.Structure):
    pass


_ifaddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_ifaddrs)),
    ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.c_void_p),
    ("ifa_netmask", ctypes.c_void_p),
    ("ifa_ifu", ctypes.c_void_p),
    ("ifa_data", ctypes.c_void_p),
]


def _getifaddrs() -> dict[str, tuple[int, list[str], list[tuple[str, int]]]] | None:
    """name -> (flags, IPv4 addresses, IPv6 (address, scope)); None if unavailable."""
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        getifaddrs = libc.getifaddrs
        freeifaddrs = libc.freeifaddrs
    except (OSError, AttributeError):
        return None
    getifaddrs.argtypes = [ctypes.POINTER(ctypes.POINTER(_ifaddrs))]
    getifaddrs.restype = ctypes.c_int
    freeifaddrs.argtypes = [ctypes.POINTER(_ifaddrs)]
    freeifaddrs.restype = None
    head = ctypes.POINTER(_ifaddrs)()
    if getifaddrs(ctypes.byref(head)) != 0:
        return None
    result: dict[str, tuple[int, list[str], list[tuple[str, int]]]] = {}
    try:
        node = head
        while node:
            entry = node.contents
            name = (entry.ifa_name or b"").decode("utf-8", "replace")
            flags, v4, v6 = result.setdefault(name, (int(entry.ifa_flags), [], []))
            if entry.ifa_addr:
                raw = ctypes.string_at(entry.ifa_addr, 2)
                family = raw[1] if _c.PLATFORM_BSD_SOCKADDR else struct.unpack("=H", raw)[0]
                if family == socket.AF_INET:
                    sa = ctypes.string_at(entry.ifa_addr, 16)
                    v4.append(socket.inet_ntop(socket.AF_INET, sa[4:8]))
                elif family == socket.AF_INET6:
                    sa = ctypes.string_at(entry.ifa_addr, 28)
                    scope = struct.unpack("=I", sa[24:28])[0]
                    v6.append((socket.inet_ntop(socket.AF_INET6, sa[8:24]), scope))
            node = entry.ifa_next
    finally:
        freeifaddrs(head)
    return result


def _list_interfaces() -> list[_Interface]:
    """The network interfaces of this host (of this network namespace)."""
    try:
        pairs = socket.if_nameindex()
    except OSError:
        pairs = []
    details = _getifaddrs()
    out = []
    for index, name in pairs:
        if details is not None and name in details:
            flags, v4, v6 = details[name]
            out.append(_Interface(name, index, flags, tuple(v4), tuple(v6)))
        else:
            out.append(_Interface(name, index, None, (), ()))
    return out


def _is_loopback(iface: _Interface) -> bool:
    if iface.flags is not None:
        return bool(iface.flags & _c.IFF_LOOPBACK)
    return iface.name in ("lo", "lo0")


def _available(interfaces: list[_Interface]) -> str:
    if not interfaces:
        return "none found"
    return ", ".join(f"{i.name} (index {i.index})" for i in interfaces)


# ---------------------------------------------------------------------------
# Group specification
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """A validated multicast group, port and interface.

    Build it with :func:`resolve_group`, which does all validation; the
    fields are normalised (addresses as compressed strings without scope).

    Attributes:
        family: ``socket.AF_INET`` or ``socket.AF_INET6``.
        group: the group address, e.g. ``"239.255.0.1"`` or ``"ff12::1"``.
        port: UDP port, 1..65535.
        interface_name: e.g. ``"lo"``, ``"eth0"``.
        interface_index: the kernel's interface index (> 0).
        interface_address: IPv4 only: the interface's IPv4 address used in
            ``ip_mreq``/``IP_MULTICAST_IF`` (``"127.0.0.1"`` for loopback);
            ``None`` when the interface has none (Linux then uses the index)
            and always for IPv6.
        scope_id: IPv6: the interface index when the group is interface- or
            link-local scoped (``ff01::/16``, ``ff02::/16``, ``ff11::``,
            ``ff12::``...), else 0; IPv4: 0.
        source: for a source-specific membership, the only source accepted
            (a unicast address of the group's family), else ``None``.
        ttl: IPv4 TTL / IPv6 hop limit for senders, 0..255.
        unicast: ``group`` is a unicast address (astropix-analysis'
            default ``127.0.0.1``; see :func:`resolve_group`): receivers bind
            it alone, without sharing the port and without joining anything;
            senders send plain unicast datagrams to it.
    """

    family: socket.AddressFamily
    group: str
    port: int
    interface_name: str
    interface_index: int
    interface_address: str | None
    scope_id: int
    source: str | None
    ttl: int
    unicast: bool = False

    @property
    def sockaddr(self) -> tuple[str, int] | tuple[str, int, int, int]:
        """The destination address in :mod:`socket` form."""
        if self.family == socket.AF_INET6:
            return (self.group, self.port, 0, self.scope_id)
        return (self.group, self.port)

    def __str__(self) -> str:
        if self.family == socket.AF_INET6:
            host = f"[{self.group}%{self.interface_name}]" if self.scope_id else f"[{self.group}]"
            where = f"{host}:{self.port}"
        else:
            where = f"{self.group}:{self.port}"
        text = f"{where} on {self.interface_name}"
        if self.unicast:
            text = f"unicast {where}"
        if self.source is not None:
            text += f" from source {self.source}"
        return text


def _family_name(family: int) -> str:
    return "IPv6" if family == socket.AF_INET6 else "IPv4"


def _parse_family(family: Any) -> socket.AddressFamily | None:
    if family is None:
        return None
    if family in (socket.AF_INET, 4) and not isinstance(family, bool):
        return socket.AF_INET
    if family in (socket.AF_INET6, 6) and not isinstance(family, bool):
        return socket.AF_INET6
    raise ValueError(f"family={family!r} is not supported; allowed: socket.AF_INET (or 4),"
                     " socket.AF_INET6 (or 6) or None")


def _parse_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r} is not an integer; allowed: {low}..{high}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}={value!r} is not an integer; allowed: {low}..{high}") from None
    if not low <= number <= high:
        raise ValueError(f"{name}={value!r} is out of range; allowed: {low}..{high}")
    return number


def _split_scope(text: str) -> tuple[str, str | None]:
    if "%" in text:
        host, _, scope = text.partition("%")
        return host, scope
    return text, None


def _parse_address(name: str, value: Any) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address,
                                                   str | None]:
    """Parse an address argument; returns (address without scope, scope text)."""
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        scope = getattr(value, "scope_id", None)
        if isinstance(value, ipaddress.IPv6Address):
            value = ipaddress.IPv6Address(value.packed)
        return value, scope
    if not isinstance(value, str):
        raise TypeError(f"{name}={value!r} is not an IP address string")
    host, scope = _split_scope(value.strip())
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an IP address") from None
    if scope is not None and (addr.version == 4 or scope == ""):
        raise ValueError(f"{name}={value!r}: a %scope suffix is only allowed on an IPv6 address"
                         " and must name an interface")
    return addr, scope


def _needs_scope(group: ipaddress.IPv6Address) -> bool:
    # multicast scope nibble: 1 = interface-local, 2 = link-local
    return (group.packed[1] & 0x0F) in (1, 2)


def _find_interface(arg_name: str, value: Any, interfaces: list[_Interface],
                    family: socket.AddressFamily) -> _Interface:
    """Resolve an interface given by name, index or address."""
    if isinstance(value, bool):
        raise TypeError(f"{arg_name}={value!r} is not an interface; allowed: a name (str),"
                        " an index (int) or an address of a local interface")
    if isinstance(value, int):
        for iface in interfaces:
            if iface.index == value:
                return iface
        raise ValueError(f"{arg_name}={value!r}: no network interface has this index;"
                         f" available: {_available(interfaces)}")
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return _find_interface(arg_name, int(text), interfaces, family)
    else:
        raise TypeError(f"{arg_name}={value!r} is not an interface; allowed: a name (str),"
                        " an index (int) or an address of a local interface")
    host, scope = _split_scope(text)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if addr is None:
        for iface in interfaces:
            if iface.name == text:
                return iface
        raise ValueError(f"{arg_name}={value!r}: no network interface has this name;"
                         f" available: {_available(interfaces)}")
    if (addr.version == 6) != (family == socket.AF_INET6):
        raise ValueError(f"{arg_name}={value!r} is an {_family_name(_family_of(addr))} address but"
                         f" the group is {_family_name(family)}; allowed: an interface name,"
                         f" an index or an {_family_name(family)} address of a local interface")
    if addr.version == 4:
        for iface in interfaces:
            if str(addr) in iface.ipv4:
                return iface
    else:
        want = str(ipaddress.IPv6Address(addr.packed))
        scope_iface = (_find_interface(arg_name, scope, interfaces, family)
                       if scope else None)
        for iface in interfaces:
            if scope_iface is not None and iface.index != scope_iface.index:
                continue
            if any(a == want for a, _ in iface.ipv6):
                return iface
    known = [f"{i.name} {a}" for i in interfaces
             for a in (i.ipv4 if addr.version == 4 else [x for x, _ in i.ipv6])]
    raise ValueError(f"{arg_name}={value!r} is not an address of any network interface here;"
                     f" local addresses: {', '.join(known) or 'none found'}")


def _family_of(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> socket.AddressFamily:
    return socket.AF_INET6 if addr.version == 6 else socket.AF_INET


def resolve_group(
    group: _AddressLike,
    port: int,
    *,
    interface: str | int | _AddressLike | None = None,
    ttl: int = 1,
    source: _AddressLike | None = None,
    family: int | None = None,
    allow_unicast: bool = False,
    allow_control_groups: bool = False,
) -> GroupSpec:
    """Validate and normalise a multicast group, port and interface.

    **Unicast.** astropix-analysis' tools default to ``--group 127.0.0.1``:
    its DAQ then sends plain unicast datagrams to ``127.0.0.1:5007``. A
    loopback unicast address (``127.0.0.0/8``, ``::1``) is therefore
    accepted as ``group`` and gives a spec with ``unicast=True``; any other
    unicast address needs ``allow_unicast=True`` (the datagrams then go
    where the routing table sends them, whatever ``interface`` says). A
    unicast receiver owns its port alone: no ``SO_REUSEADDR`` /
    ``SO_REUSEPORT`` (the kernel would split a unicast stream between the
    sockets sharing it), so a second receiver on the same address and port
    fails with ``EADDRINUSE`` instead of getting half the data. Use a
    multicast group for several monitors per host.

    **Control groups.** The IPv4 local network control block 224.0.0.0/24
    (224.0.0.1 all hosts, 224.0.0.2 all routers, 224.0.0.22 IGMPv3,
    224.0.0.251 mDNS...) and the IPv6 well-known interface- and link-local
    protocol groups (``ff01::``/``ff02::`` with group id ``1..ff``, e.g.
    ``ff02::1`` all nodes, ``ff02::16`` MLDv2, ``ff02::fb`` mDNS; and
    ``ff02::1:*``, ``ff02::2:*``, including the solicited-node groups
    ``ff02::1:ffXX:XXXX``) belong to network protocols: a receiver there sees
    their traffic and a sender disturbs them. They are refused unless
    ``allow_control_groups=True``. Other ``ff02::`` groups (e.g.
    ``ff02::1234``) are accepted.

    Args:
        group: an IPv4 (224.0.0.0/4) or IPv6 (ff00::/8) multicast address,
            as a string or :mod:`ipaddress` object. An IPv6 group may carry
            the interface as a scope: ``"ff12::1%eth0"`` or ``"ff12::1%2"``.
            A loopback unicast address (``"127.0.0.1"``, ``"::1"``) is
            accepted too (see above).
        port: UDP port, 1..65535.
        interface: the interface to join and send on: a name (``"eth0"``),
            an index (``2``) or an address of a local interface
            (``"192.0.2.7"``, ``"fe80::1%eth0"``). ``None`` (default) selects
            the loopback interface, so nothing leaves the host. On Linux,
            IPv6 multicast is not delivered over loopback: name an interface.
        ttl: IPv4 TTL / IPv6 hop limit used by senders, 0..255 (default 1:
            the local network only).
        source: accept datagrams from this unicast source address only
            (source-specific multicast; receivers only).
        family: if given (``socket.AF_INET``/``AF_INET6`` or 4/6), the group
            must be of this family.
        allow_unicast: accept a unicast ``group`` that is not a loopback
            address (default False).
        allow_control_groups: accept the link-local control groups described
            above (default False).

    Returns:
        GroupSpec: the validated, normalised specification.

    Raises:
        ValueError: an argument is invalid; the message names the argument,
            its value and what is allowed. Also when the interface does not
            exist, or for IPv6 multicast over the loopback interface on Linux.
        TypeError: an argument has the wrong type.
    """
    want_family = _parse_family(family)
    allow_unicast = _parse_bool("allow_unicast", allow_unicast)
    allow_control_groups = _parse_bool("allow_control_groups", allow_control_groups)
    group_addr, group_scope = _parse_address("group", group)
    unicast = not group_addr.is_multicast
    if unicast:
        _check_unicast_group(group, group_addr, allow_unicast)
    elif not allow_control_groups and _is_control_group(group_addr):
        raise ValueError(
            f"group={group!r} is a link-local control group reserved for network protocols"
            f" ({_CONTROL_GROUPS[group_addr.version]}); allowed: an administratively scoped"
            " group such as 239.255.0.1 or ff12::1, or allow_control_groups=True")
    fam = _family_of(group_addr)
    if want_family is not None and fam != want_family:
        raise ValueError(f"group={group!r} is an {_family_name(fam)} address but family="
                         f"{_family_name(want_family)}; allowed: an {_family_name(want_family)}"
                         " multicast address")
    port = _parse_int("port", port, 1, 65535)
    ttl = _parse_int("ttl", ttl, 0, 255)
    if unicast and source is not None:
        raise ValueError(f"source={source!r}: a source-specific membership needs a multicast"
                         f" group, but group={group!r} is a unicast address; allowed: source=None")
    if unicast and ttl == 0 and not group_addr.is_loopback:
        raise ValueError(f"ttl=0 keeps multicast on this host but cannot carry a unicast datagram"
                         f" to group={group!r}; allowed: 1..255")

    interfaces = _list_interfaces()
    if group_scope is not None:
        try:
            scoped = _find_interface("group", group_scope, interfaces, fam)
        except ValueError as exc:
            detail = str(exc).partition(": ")[2]
            raise ValueError(f"group={group!r}: the %scope {group_scope!r} is not an interface;"
                             f" {detail}") from None
        if interface is not None:
            chosen = _find_interface("interface", interface, interfaces, fam)
            if chosen.index != scoped.index:
                raise ValueError(
                    f"group={group!r} names interface {scoped.name} (index {scoped.index}) but"
                    f" interface={interface!r} is {chosen.name} (index {chosen.index});"
                    " allowed: give the interface once, or the same one twice")
        iface = scoped
    elif interface is not None:
        iface = _find_interface("interface", interface, interfaces, fam)
    else:
        if unicast and group_addr.version == 6 and group_addr.is_link_local:
            raise ValueError(f"group={group!r} is a link-local address, which needs its interface;"
                             " allowed: group='fe80::...%eth0' or interface='eth0'")
        loopbacks = [i for i in interfaces if _is_loopback(i)]
        if not loopbacks:
            raise ValueError("interface=None selects the loopback interface, but none was"
                             f" found; name an interface; available: {_available(interfaces)}")
        iface = loopbacks[0]

    if unicast and group_addr.is_loopback and not _is_loopback(iface):
        raise ValueError(f"group={group!r} is a loopback address but interface={interface!r} is"
                         f" {iface.name}, not the loopback interface; allowed: interface=None")

    if (fam == socket.AF_INET6 and not unicast and not _c.IPV6_LOOPBACK_MULTICAST
            and _is_loopback(iface)):
        if interface is not None:
            given = f"interface={interface!r} is"
        elif group_scope is not None:
            given = f"group={group!r} names"
        else:
            given = "interface=None selects"
        others = [i for i in interfaces if not _is_loopback(i)]
        raise ValueError(
            f"{given} the loopback interface {iface.name!r}, but this OS does not deliver IPv6"
            " multicast over loopback; name a multicast-capable interface, e.g."
            f" interface='eth0' or group='{ipaddress.IPv6Address(group_addr.packed)}%eth0';"
            f" available: {_available(others)}")

    if fam == socket.AF_INET:
        if iface.ipv4:
            iface_address: str | None = iface.ipv4[0]
        elif _is_loopback(iface) and iface.flags is None:
            iface_address = "127.0.0.1"
        else:
            iface_address = None
        if iface_address is None and not _c.PLATFORM_LINUX:
            raise ValueError(f"interface={iface.name!r} has no IPv4 address; IPv4 multicast on"
                             " this OS needs one; allowed: an interface with an IPv4 address")
        scope_id = 0
        group_text = str(group_addr)
    else:
        iface_address = None
        v6 = ipaddress.IPv6Address(group_addr.packed)
        if unicast:
            scope_id = iface.index if v6.is_link_local else 0
        else:
            scope_id = iface.index if _needs_scope(v6) else 0
        group_text = str(v6)

    source_text: str | None = None
    if source is not None:
        src, _scope = _parse_address("source", source)
        if _family_of(src) != fam:
            raise ValueError(f"source={source!r} is an {_family_name(_family_of(src))} address"
                             f" but group={group!r} is {_family_name(fam)}; allowed: a unicast"
                             f" {_family_name(fam)} address")
        if src.is_multicast or src.is_unspecified:
            raise ValueError(f"source={source!r} is not a unicast address; allowed: the unicast"
                             f" {_family_name(fam)} address of the sender")
        if fam == socket.AF_INET:
            supported = _c.IP_ADD_SOURCE_MEMBERSHIP is not None and (
                iface_address is not None or _c.MCAST_JOIN_SOURCE_GROUP is not None)
        else:
            supported = _c.MCAST_JOIN_SOURCE_GROUP is not None
        if not supported:
            raise ValueError(f"source={source!r}: source-specific multicast is not supported on"
                             f" this platform for {_family_name(fam)}; allowed: source=None")
        source_text = str(src) if src.version == 4 else str(ipaddress.IPv6Address(src.packed))

    return GroupSpec(
        family=fam,
        group=group_text,
        port=port,
        interface_name=iface.name,
        interface_index=iface.index,
        interface_address=iface_address,
        scope_id=scope_id,
        source=source_text,
        ttl=ttl,
        unicast=unicast,
    )


_CONTROL_GROUPS = {
    4: "224.0.0.0/24, the local network control block: 224.0.0.1 all hosts, 224.0.0.2 all"
       " routers, 224.0.0.22 IGMPv3, 224.0.0.251 mDNS...",
    6: "ff01::1..ff and ff02::1..ff, ff02::1:*, ff02::2:*: ff02::1 all nodes, ff02::2 all"
       " routers, ff02::16 MLDv2, ff02::fb mDNS, ff02::1:ffXX:XXXX solicited-node...",
}
_IPV4_CONTROL = ipaddress.IPv4Network("224.0.0.0/24")


def _is_control_group(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for the link-local control groups :func:`resolve_group` refuses."""
    if addr.version == 4:
        return addr in _IPV4_CONTROL
    packed = addr.packed
    flags, scope = packed[1] >> 4, packed[1] & 0x0F
    if flags != 0 or scope not in (1, 2):  # well-known, interface-/link-local only
        return False
    group_id = int.from_bytes(packed[2:], "big")
    return group_id <= 0xFF or (group_id >> 16) in (1, 2) or (group_id >> 24) in (0x1FF, 0x2FF)


def _check_unicast_group(value: Any, addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
                         allow_unicast: bool) -> None:
    """Refuse a unicast ``group`` unless it is loopback or unicast is allowed."""
    allowed = ("allowed: a multicast group (224.0.0.0/4 or ff00::/8), a loopback unicast"
               " address (127.0.0.0/8 or ::1; astropix-analysis' default is 127.0.0.1)")
    if addr.is_unspecified or (addr.version == 4 and addr == ipaddress.IPv4Address(
            "255.255.255.255")):
        raise ValueError(f"group={value!r} is not a multicast address nor a destination; {allowed}")
    if addr.is_loopback or allow_unicast:
        return
    raise ValueError(f"group={value!r} is not a multicast address; {allowed}, or another unicast"
                     " address with allow_unicast=True")


def _parse_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} is not a bool; allowed: True or False")
    return value


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
    port = _parse_int("port", port, 0, 65535)
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
        host, scope = _split_scope(host)
        flowinfo = _parse_int("flowinfo", address[2], 0, 0xFFFFF) if len(address) > 2 else 0
        scope_id = _parse_int("scope_id", address[3], 0, 0xFFFFFFFF) if len(address) > 3 else 0
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


def _bind_error(exc: OSError, spec: GroupSpec, address: tuple[Any, ...]) -> OSError:
    """The OSError to raise when a receiver cannot bind: names the group, the
    port and, for ``EADDRINUSE``, the likely cause; keeps the errno."""
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


def _check_bufsize(name: str, value: Any) -> int:
    return _parse_int(name, value, 1, _MAX_BUFSIZE)


def _open_receiver_stdlib(spec: GroupSpec, rcvbuf: int | None) -> tuple[socket.socket, int]:
    if not isinstance(spec, GroupSpec):
        raise TypeError(f"spec={spec!r} is not a GroupSpec; build one with resolve_group()")
    if rcvbuf is not None:
        rcvbuf = _check_bufsize("rcvbuf", rcvbuf)
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
                        local_address: _AddressLike | None, connect: bool) -> socket.socket:
    if not isinstance(spec, GroupSpec):
        raise TypeError(f"spec={spec!r} is not a GroupSpec; build one with resolve_group()")
    if sndbuf is not None:
        sndbuf = _check_bufsize("sndbuf", sndbuf)
    loop = _parse_bool("loop", loop)
    bind_to: tuple[Any, ...] | None = None
    if local_address is not None:
        addr, scope = _parse_address("local_address", local_address)
        if _family_of(addr) != spec.family:
            raise ValueError(f"local_address={local_address!r} is not an"
                             f" {_family_name(spec.family)} address; allowed: a unicast"
                             f" {_family_name(spec.family)} address of this host")
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
                raise _oserror(exc, f"cannot bind the sender to {bind_to}") from exc
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
    local_address: _AddressLike | None = None,
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


def _check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout={timeout!r} is not a number; allowed: None (wait forever) or"
                        " seconds > 0")
    if not 0 < timeout <= threading.TIMEOUT_MAX:
        raise ValueError(f"timeout={timeout!r} is out of range; allowed: None (wait forever) or"
                         f" seconds in (0, {threading.TIMEOUT_MAX:g}]")
    return float(timeout)


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
    timeout = _check_timeout(timeout)
    sock, granted = _open_receiver_stdlib(spec, rcvbuf)
    sock.settimeout(timeout)
    return sock, granted


def open_blocking_sender_socket(
    spec: GroupSpec,
    *,
    sndbuf: int | None = None,
    loop: bool = True,
    local_address: _AddressLike | None = None,
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
    timeout = _check_timeout(timeout)
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

