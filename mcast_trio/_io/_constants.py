"""Socket constants that Python's :mod:`socket` lacks on some versions/OSes.

Everything platform-specific about option numbers and C structure layouts
lives here, in one place, so that :mod:`mcast_trio._io._sockets` can stay free of
``sys.platform`` checks for numbers. Where :mod:`socket` defines a name it
wins (``getattr(socket, NAME, fallback)``); a value is ``None`` where the OS
does not have the option at all, and callers must check for ``None``.

Linux values were checked against this machine's ``/usr/include``
(``linux/in.h``, ``linux/in6.h``, ``asm-generic/socket.h``,
``netinet/in.h``) and the structure sizes against a compiled C program
(``group_source_req`` = 264 bytes on x86_64, with 4 bytes of padding after
``gsr_interface``; ``ip_mreq_source`` = multiaddr, interface, sourceaddr).
The macOS/BSD and Windows values come from those platforms' headers
(``netinet/in.h`` resp. ``ws2ipdef.h``) and are not exercised by this
repository's CI.
"""

from __future__ import annotations

import socket
import sys

__all__ = [
    "PLATFORM_LINUX",
    "PLATFORM_BSD_SOCKADDR",
    "IP_MULTICAST_ALL",
    "IPV6_MULTICAST_ALL",
    "SO_RXQ_OVFL",
    "SO_MEMINFO",
    "SK_MEMINFO_DROPS",
    "IP_PKTINFO",
    "IPV6_RECVPKTINFO",
    "IPV6_PKTINFO",
    "IP_ADD_SOURCE_MEMBERSHIP",
    "IP_DROP_SOURCE_MEMBERSHIP",
    "MCAST_JOIN_SOURCE_GROUP",
    "MCAST_LEAVE_SOURCE_GROUP",
    "IPV6_JOIN_GROUP",
    "IPV6_LEAVE_GROUP",
    "SO_REUSEPORT",
    "MSG_DONTWAIT",
    "MSG_TRUNC",
    "IFF_LOOPBACK",
    "IFF_MULTICAST",
    "IP_MREQ_SOURCE_ORDER",
    "GROUP_SOURCE_REQ_FORMAT",
    "GETSOCKOPT_BUFSIZE_DOUBLED",
    "BIND_TO_GROUP_ADDRESS",
    "IPV6_LOOPBACK_MULTICAST",
    "UDP_MAX_PAYLOAD_IPV4",
    "UDP_MAX_PAYLOAD_IPV6",
]

_PLATFORM = sys.platform
PLATFORM_LINUX: bool = _PLATFORM.startswith("linux")
_DARWIN = _PLATFORM == "darwin"
_BSD = _DARWIN or "bsd" in _PLATFORM or _PLATFORM.startswith("dragonfly")
_WINDOWS = _PLATFORM == "win32"

#: Whether ``struct sockaddr`` starts with a one-byte ``sa_len`` followed by a
#: one-byte ``sa_family`` (BSD, macOS) instead of a two-byte ``sa_family``
#: (Linux, Windows).
PLATFORM_BSD_SOCKADDR: bool = _BSD


def _pick(name: str, *, linux: int | None, bsd: int | None, darwin: int | None = None,
          windows: int | None = None) -> int | None:
    value = getattr(socket, name, None)
    if value is not None:
        return int(value)
    if PLATFORM_LINUX:
        return linux
    if _DARWIN:
        return darwin if darwin is not None else bsd
    if _BSD:
        return bsd
    if _WINDOWS:
        return windows
    return None


# --- receive-side filtering -------------------------------------------------
#: Linux only: 0 = deliver only groups joined *on this socket* (default 1
#: delivers every group joined by any socket on the host to a socket bound to
#: the wildcard address).
IP_MULTICAST_ALL = _pick("IP_MULTICAST_ALL", linux=49, bsd=None)
#: Linux >= 4.20: the IPv6 counterpart of IP_MULTICAST_ALL.
IPV6_MULTICAST_ALL = _pick("IPV6_MULTICAST_ALL", linux=29, bsd=None)

# --- drop accounting (Linux only) ---------------------------------------------
#: SOL_SOCKET option; when on, each datagram carries the socket's cumulative
#: drop counter (uint32) as a control message, if that counter is non-zero.
SO_RXQ_OVFL = _pick("SO_RXQ_OVFL", linux=40, bsd=None)
#: SOL_SOCKET option, getsockopt only: an array of uint32 ``SK_MEMINFO_*``.
SO_MEMINFO = _pick("SO_MEMINFO", linux=55, bsd=None)
#: Index of the drop counter in the SO_MEMINFO array (linux/sock_diag.h).
SK_MEMINFO_DROPS = 8

# --- packet info ------------------------------------------------------------
IP_PKTINFO = _pick("IP_PKTINFO", linux=8, bsd=None, darwin=26, windows=19)
IPV6_RECVPKTINFO = _pick("IPV6_RECVPKTINFO", linux=49, bsd=36, darwin=61, windows=None)
IPV6_PKTINFO = _pick("IPV6_PKTINFO", linux=50, bsd=46, darwin=46, windows=19)

# --- source-specific multicast ---------------------------------------------
IP_ADD_SOURCE_MEMBERSHIP = _pick("IP_ADD_SOURCE_MEMBERSHIP", linux=39, bsd=70, windows=15)
IP_DROP_SOURCE_MEMBERSHIP = _pick("IP_DROP_SOURCE_MEMBERSHIP", linux=40, bsd=71, windows=16)
MCAST_JOIN_SOURCE_GROUP = _pick("MCAST_JOIN_SOURCE_GROUP", linux=46, bsd=82, windows=45)
MCAST_LEAVE_SOURCE_GROUP = _pick("MCAST_LEAVE_SOURCE_GROUP", linux=47, bsd=83, windows=46)

#: Field order of ``struct ip_mreq_source`` (three 4-byte ``in_addr``).
#: Linux puts the interface second; BSD, macOS and Windows put the source second.
IP_MREQ_SOURCE_ORDER: tuple[str, str, str] = (
    ("multiaddr", "interface", "sourceaddr")
    if PLATFORM_LINUX
    else ("multiaddr", "sourceaddr", "interface")
)

#: :mod:`struct` format of ``struct group_source_req``: ``uint32_t
#: gsr_interface`` then two ``struct sockaddr_storage`` (128 bytes each).
#: glibc aligns sockaddr_storage like ``unsigned long`` (``0L`` pads to it:
#: 264 bytes on LP64); macOS packs the structure to 4 bytes (260 bytes).
GROUP_SOURCE_REQ_FORMAT: str = "=I128s128s" if _DARWIN else "@I0L128s128s"

# --- plain options Python usually has -----------------------------------------
IPV6_JOIN_GROUP = _pick("IPV6_JOIN_GROUP", linux=20, bsd=12, windows=12)
IPV6_LEAVE_GROUP = _pick("IPV6_LEAVE_GROUP", linux=21, bsd=13, windows=13)
SO_REUSEPORT = _pick("SO_REUSEPORT", linux=15, bsd=0x0200, windows=None)
MSG_DONTWAIT: int = int(getattr(socket, "MSG_DONTWAIT", 0))
MSG_TRUNC: int = int(getattr(socket, "MSG_TRUNC", 0x20 if PLATFORM_LINUX else 0x10))

#: ``struct ifaddrs.ifa_flags`` bits (``net/if.h``); identical on Linux/BSD.
IFF_LOOPBACK = 0x8
IFF_MULTICAST = 0x1000 if PLATFORM_LINUX else 0x8000

# --- behaviour differences --------------------------------------------------
#: Linux reports twice the requested SO_RCVBUF/SO_SNDBUF in getsockopt (the
#: kernel reserves the other half for bookkeeping).
GETSOCKOPT_BUFSIZE_DOUBLED: bool = PLATFORM_LINUX
#: POSIX stacks filter by destination when a receiver binds to the group
#: address; Windows refuses that bind, receivers bind to the wildcard there.
BIND_TO_GROUP_ADDRESS: bool = not _WINDOWS
#: Whether IPv6 multicast is delivered over the loopback interface. Linux
#: does not (it refuses to route ff00::/8 over ``lo``, and even with a route
#: nothing is delivered), so an interface must be named there.
IPV6_LOOPBACK_MULTICAST: bool = not PLATFORM_LINUX

UDP_MAX_PAYLOAD_IPV4 = 65507
UDP_MAX_PAYLOAD_IPV6 = 65527
