"""Where may a test send multicast? Guards for tests that use real sockets.

A test that sends must run inside a private network namespace with no route
to anywhere (``tools/netns-run`` makes one: loopback multicast plus a veth
pair ``mc0``/``mc1`` for IPv6). These functions say why the current process
is *not* such a place, so a test module can skip with that reason::

    from mcast_trio.testing import isolation_problem

    _PROBLEM = isolation_problem()
    pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")

The decision depends only on where the process runs (the markers the
wrappers set, and the routing table), never on whether multicast happens to
work, so a broken library fails instead of skipping.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

__all__ = [
    "inside_netns_run",
    "isolation_problem",
    "joined_ipv4_groups",
    "joined_ipv6_groups",
    "open_fd_count",
    "veth_problem",
]

_MARKERS = ("NETNS_RUN_INSIDE", "MCAST_TRIO_NETNS", "MCAST_TRIO_TEST_NETNS")


def inside_netns_run() -> bool:
    """True if a netns-run wrapper (or a harness setting
    ``MCAST_TRIO_TEST_NETNS=1``) says this process is in a private namespace."""
    return any(os.environ.get(name) == "1" for name in _MARKERS)


def _default_route() -> str | None:
    """A default route of this namespace, if any (then nothing may be sent)."""
    try:
        with open("/proc/net/route") as f:
            for line in list(f)[1:]:
                fields = line.split()
                flags = int(fields[3], 16)
                if fields[1] == "00000000" and fields[7] == "00000000" and flags & 0x1 and not flags & 0x200:
                    return f"IPv4 default route via {fields[0]}"
    except OSError:
        pass
    try:
        with open("/proc/net/ipv6_route") as f:
            for line in f:
                fields = line.split()
                flags = int(fields[8], 16)
                if fields[0] == "0" * 32 and fields[1] == "00" and flags & 0x1 and not flags & 0x200:
                    return f"IPv6 default route via {fields[9]}"
    except OSError:
        pass
    return None


def isolation_problem() -> str | None:
    """Why this process must not send multicast, or None if it may: it is in
    a private network namespace (see :func:`inside_netns_run`) on Linux, and
    that namespace has no default route."""
    if not sys.platform.startswith("linux"):
        return "tests that send use a Linux network namespace (tools/netns-run)"
    if not inside_netns_run():
        return ("not inside a private network namespace: run under tools/netns-run "
                "(or set MCAST_TRIO_TEST_NETNS=1 inside one)")
    route = _default_route()
    if route is not None:
        return f"this network namespace has a {route}; refusing to send multicast from it"
    return None


def veth_problem() -> str | None:
    """Why IPv6 multicast tests over the veth pair ``mc0``/``mc1`` cannot run
    here, or None. Inside a netns-run namespace the pair always exists, so its
    absence there is reported as None: the tests then fail, they do not skip."""
    names = {name for _, name in socket.if_nameindex()}
    if {"mc0", "mc1"} <= names or inside_netns_run():
        return None
    return "no veth pair mc0/mc1 in this namespace (netns-run creates one)"


# -- what a test checks after cancelling: nothing left open or joined ----------


def open_fd_count() -> int:
    """Number of open file descriptors of this process (``/proc/self/fd``)."""
    return len(os.listdir("/proc/self/fd"))


def joined_ipv4_groups() -> set[str]:
    """IPv4 groups joined in this network namespace, dotted
    (``/proc/net/igmp``, which prints them in hex)."""
    out = set()
    with open("/proc/net/igmp") as f:
        for line in f:
            fields = line.split()
            if line.startswith(("\t", " ")) and fields and len(fields[0]) == 8:
                out.add(socket.inet_ntoa(struct.pack("=I", int(fields[0], 16))))
    return out


def joined_ipv6_groups() -> set[tuple[str, str]]:
    """``(interface, group)`` of the IPv6 groups joined in this network
    namespace (``/proc/net/igmp6``)."""
    out = set()
    with open("/proc/net/igmp6") as f:
        for line in f:
            fields = line.split()
            out.add((fields[1], socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[2]))))
    return out
