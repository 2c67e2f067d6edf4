"""Network interfaces: discovery and lookup.

:func:`list_interfaces` lists the interfaces of this host (of this network
namespace) with their flags and addresses (``getifaddrs(3)`` where there is
one); :func:`find_interface` finds one by name, index or address, naming
the argument and the interfaces there are when it finds none;
:func:`is_loopback` tells the loopback interface, which
:func:`mcast_trio._io._groups.resolve_group` picks by default. Also the
small address helpers these share with group resolution.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
from typing import Any, NamedTuple

from . import _constants as _c

__all__ = [
    "Interface",
    "describe_interfaces",
    "family_name",
    "family_of",
    "find_interface",
    "is_loopback",
    "list_interfaces",
    "split_scope",
]


class Interface(NamedTuple):
    """One network interface (:func:`list_interfaces`)."""

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


def list_interfaces() -> list[Interface]:
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
            out.append(Interface(name, index, flags, tuple(v4), tuple(v6)))
        else:
            out.append(Interface(name, index, None, (), ()))
    return out


def is_loopback(iface: Interface) -> bool:
    """Whether ``iface`` is a loopback interface (by its flags; by its name
    where the flags are unknown)."""
    if iface.flags is not None:
        return bool(iface.flags & _c.IFF_LOOPBACK)
    return iface.name in ("lo", "lo0")


def describe_interfaces(interfaces: list[Interface]) -> str:
    """``interfaces`` for an error message: ``"lo (index 1), eth0 (index 2)"``."""
    if not interfaces:
        return "none found"
    return ", ".join(f"{i.name} (index {i.index})" for i in interfaces)


def family_name(family: int) -> str:
    """``"IPv6"`` or ``"IPv4"``."""
    return "IPv6" if family == socket.AF_INET6 else "IPv4"


def family_of(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> socket.AddressFamily:
    """The :mod:`socket` address family of an :mod:`ipaddress` address."""
    return socket.AF_INET6 if addr.version == 6 else socket.AF_INET


def split_scope(text: str) -> tuple[str, str | None]:
    """``"fe80::1%eth0"`` -> ``("fe80::1", "eth0")``; no ``%``: scope ``None``."""
    if "%" in text:
        host, _, scope = text.partition("%")
        return host, scope
    return text, None


def find_interface(arg_name: str, value: Any, interfaces: list[Interface],
                   family: socket.AddressFamily) -> Interface:
    """Find the interface ``value`` names among ``interfaces``: a name, an
    index (``int`` or digits) or a local address of ``family`` (an IPv6
    address may carry ``%scope``).

    Raises:
        TypeError: ``value`` is none of these kinds.
        ValueError: no such interface (the message, naming ``arg_name``,
            lists those there are).
    """
    if isinstance(value, bool):
        raise TypeError(f"{arg_name}={value!r} is not an interface; allowed: a name (str),"
                        " an index (int) or an address of a local interface")
    if isinstance(value, int):
        for iface in interfaces:
            if iface.index == value:
                return iface
        raise ValueError(f"{arg_name}={value!r}: no network interface has this index;"
                         f" available: {describe_interfaces(interfaces)}")
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return find_interface(arg_name, int(text), interfaces, family)
    else:
        raise TypeError(f"{arg_name}={value!r} is not an interface; allowed: a name (str),"
                        " an index (int) or an address of a local interface")
    host, scope = split_scope(text)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if addr is None:
        for iface in interfaces:
            if iface.name == text:
                return iface
        raise ValueError(f"{arg_name}={value!r}: no network interface has this name;"
                         f" available: {describe_interfaces(interfaces)}")
    if (addr.version == 6) != (family == socket.AF_INET6):
        raise ValueError(f"{arg_name}={value!r} is an {family_name(family_of(addr))} address but"
                         f" the group is {family_name(family)}; allowed: an interface name,"
                         f" an index or an {family_name(family)} address of a local interface")
    if addr.version == 4:
        for iface in interfaces:
            if str(addr) in iface.ipv4:
                return iface
    else:
        want = str(ipaddress.IPv6Address(addr.packed))
        scope_iface = (find_interface(arg_name, scope, interfaces, family)
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
