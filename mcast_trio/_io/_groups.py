"""Multicast groups: validation and normalisation.

:func:`resolve_group` checks a group, port, interface, TTL and source once,
before anything is opened, and gives a :class:`GroupSpec` that the socket
layer (:mod:`mcast_trio._io._sockets`) and the in-memory network use as is.
Its rules (details in :func:`resolve_group`):

* **Loopback by default.** ``interface=None`` selects the loopback
  interface, so nothing leaves the host unless an interface is named.
  Linux does not deliver IPv6 multicast over ``lo``; for IPv6 there the
  interface must be named (``interface="eth0"`` or ``"ff12::1%eth0"``).
* **Unicast to loopback.** A loopback unicast "group" is accepted
  (astropix-analysis' default is ``127.0.0.1``); other unicast addresses
  need ``allow_unicast=True``.
* **No control groups.** 224.0.0.0/24 and the IPv6 well-known link-local
  protocol groups are refused unless ``allow_control_groups=True``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from typing import Any, Union

from .. import _validate
from . import _constants as _c
from ._interfaces import (
    describe_interfaces,
    family_name,
    family_of,
    find_interface,
    is_loopback,
    list_interfaces,
    split_scope,
)

__all__ = ["AddressLike", "GroupSpec", "parse_address", "resolve_group"]

#: What an address argument may be.
AddressLike = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]


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


def _parse_family(family: Any) -> socket.AddressFamily | None:
    if family is None:
        return None
    if family in (socket.AF_INET, 4) and not isinstance(family, bool):
        return socket.AF_INET
    if family in (socket.AF_INET6, 6) and not isinstance(family, bool):
        return socket.AF_INET6
    raise ValueError(f"family={family!r} is not supported; allowed: socket.AF_INET (or 4),"
                     " socket.AF_INET6 (or 6) or None")


def parse_address(name: str, value: Any, *, allowed: str = "an IPv4 or IPv6 address string"
                  " (an IPv6 one may end in %interface)") -> tuple[
                      ipaddress.IPv4Address | ipaddress.IPv6Address, str | None]:
    """Parse an address argument (the error names ``name`` and says what
    is ``allowed``); returns (address without scope, scope text or None)."""
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        scope = getattr(value, "scope_id", None)
        if isinstance(value, ipaddress.IPv6Address):
            value = ipaddress.IPv6Address(value.packed)
        return value, scope
    if not isinstance(value, str):
        raise TypeError(f"{name}={value!r} is not an IP address string; allowed: {allowed}")
    host, scope = split_scope(value.strip())
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an IP address; allowed: {allowed}") from None
    if scope is not None and (addr.version == 4 or scope == ""):
        raise ValueError(f"{name}={value!r}: a %scope suffix is only allowed on an IPv6 address"
                         f" and must name an interface; allowed: {allowed}")
    return addr, scope


def _needs_scope(group: ipaddress.IPv6Address) -> bool:
    # multicast scope nibble: 1 = interface-local, 2 = link-local
    return (group.packed[1] & 0x0F) in (1, 2)


def resolve_group(
    group: AddressLike,
    port: int,
    *,
    interface: str | int | AddressLike | None = None,
    ttl: int = 1,
    source: AddressLike | None = None,
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
    allow_unicast = _validate.check_bool("allow_unicast", allow_unicast)
    allow_control_groups = _validate.check_bool("allow_control_groups", allow_control_groups)
    group_addr, group_scope = parse_address("group", group)
    unicast = not group_addr.is_multicast
    if unicast:
        _check_unicast_group(group, group_addr, allow_unicast)
    elif not allow_control_groups and _is_control_group(group_addr):
        raise ValueError(
            f"group={group!r} is a link-local control group reserved for network protocols"
            f" ({_CONTROL_GROUPS[group_addr.version]}); allowed: an administratively scoped"
            " group such as 239.255.0.1 or ff12::1, or allow_control_groups=True")
    fam = family_of(group_addr)
    if want_family is not None and fam != want_family:
        raise ValueError(f"group={group!r} is an {family_name(fam)} address but family="
                         f"{family_name(want_family)}; allowed: an {family_name(want_family)}"
                         " multicast address")
    port = _validate.check_int("port", port, 1, 65535)
    ttl = _validate.check_int("ttl", ttl, 0, 255)
    if unicast and source is not None:
        raise ValueError(f"source={source!r}: a source-specific membership needs a multicast"
                         f" group, but group={group!r} is a unicast address; allowed: source=None")
    if unicast and ttl == 0 and not group_addr.is_loopback:
        raise ValueError(f"ttl=0 keeps multicast on this host but cannot carry a unicast datagram"
                         f" to group={group!r}; allowed: 1..255")

    interfaces = list_interfaces()
    if group_scope is not None:
        try:
            scoped = find_interface("group", group_scope, interfaces, fam)
        except ValueError as exc:
            detail = str(exc).partition(": ")[2]
            raise ValueError(f"group={group!r}: the %scope {group_scope!r} is not an interface;"
                             f" {detail}") from None
        if interface is not None:
            chosen = find_interface("interface", interface, interfaces, fam)
            if chosen.index != scoped.index:
                raise ValueError(
                    f"group={group!r} names interface {scoped.name} (index {scoped.index}) but"
                    f" interface={interface!r} is {chosen.name} (index {chosen.index});"
                    " allowed: give the interface once, or the same one twice")
        iface = scoped
    elif interface is not None:
        iface = find_interface("interface", interface, interfaces, fam)
    else:
        if unicast and group_addr.version == 6 and group_addr.is_link_local:
            raise ValueError(f"group={group!r} is a link-local address, which needs its interface;"
                             " allowed: group='fe80::...%eth0' or interface='eth0'")
        loopbacks = [i for i in interfaces if is_loopback(i)]
        if not loopbacks:
            raise ValueError("interface=None selects the loopback interface, but none was"
                             f" found; name an interface; available: {describe_interfaces(interfaces)}")
        iface = loopbacks[0]

    if unicast and group_addr.is_loopback and not is_loopback(iface):
        raise ValueError(f"group={group!r} is a loopback address but interface={interface!r} is"
                         f" {iface.name}, not the loopback interface; allowed: interface=None")

    if (fam == socket.AF_INET6 and not unicast and not _c.IPV6_LOOPBACK_MULTICAST
            and is_loopback(iface)):
        if interface is not None:
            given = f"interface={interface!r} is"
        elif group_scope is not None:
            given = f"group={group!r} names"
        else:
            given = "interface=None selects"
        others = [i for i in interfaces if not is_loopback(i)]
        raise ValueError(
            f"{given} the loopback interface {iface.name!r}, but this OS does not deliver IPv6"
            " multicast over loopback; name a multicast-capable interface, e.g."
            f" interface='eth0' or group='{ipaddress.IPv6Address(group_addr.packed)}%eth0';"
            f" available: {describe_interfaces(others)}")

    if fam == socket.AF_INET:
        if iface.ipv4:
            iface_address: str | None = iface.ipv4[0]
        elif is_loopback(iface) and iface.flags is None:
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
        src, _scope = parse_address("source", source)
        if family_of(src) != fam:
            raise ValueError(f"source={source!r} is an {family_name(family_of(src))} address"
                             f" but group={group!r} is {family_name(fam)}; allowed: a unicast"
                             f" {family_name(fam)} address")
        if src.is_multicast or src.is_unspecified:
            raise ValueError(f"source={source!r} is not a unicast address; allowed: the unicast"
                             f" {family_name(fam)} address of the sender")
        if fam == socket.AF_INET:
            supported = _c.IP_ADD_SOURCE_MEMBERSHIP is not None and (
                iface_address is not None or _c.MCAST_JOIN_SOURCE_GROUP is not None)
        else:
            supported = _c.MCAST_JOIN_SOURCE_GROUP is not None
        if not supported:
            raise ValueError(f"source={source!r}: source-specific multicast is not supported on"
                             f" this platform for {family_name(fam)}; allowed: source=None")
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
