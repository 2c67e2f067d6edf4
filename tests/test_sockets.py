"""Tests of the socket layer: validation, receivers, senders, batched I/O.

Everything that opens a socket uses real sockets and real multicast, and
must run inside a private network namespace (``/work/shared/tools/netns-run``
creates one with multicast on ``lo`` and a veth pair ``mc0``/``mc1``; CI
always uses it). Outside one, those tests are skipped with that reason --
the skip is decided only by *where* we run (the netns-run marker, or
``MCAST_TRIO_TEST_NETNS=1`` from another harness, and no default route),
never by whether multicast happens to work, so a broken socket layer fails.

Run::

    PYTHONPATH=/work/main /work/shared/tools/netns-run \\
        python -m pytest tests/test_sockets.py -q
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import struct
import sys
import time
import warnings

import numpy as np
import pytest
import trio
import trio.testing

from mcast_trio.testing import (
    isolation_problem,
    joined_ipv4_groups,
    joined_ipv6_groups,
    open_fd_count,
    veth_problem,
)
from mcast_trio._io import _batchio, _constants
from mcast_trio._io._batchio import ReceiveBatch, receive_batch, send_batch
from mcast_trio._io._groups import GroupSpec, resolve_group
from mcast_trio._io._sockets import (
    BufferSizeWarning,
    close_receiver_socket,
    close_sender_socket,
    open_receiver_socket,
    open_sender_socket,
    pack_sockaddr,
    socket_drop_count,
)

LINUX = sys.platform.startswith("linux")


# ---------------------------------------------------------------------------
# Where are we?
# ---------------------------------------------------------------------------


_PROBLEM = isolation_problem()
netns = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")

_VETH = None if _PROBLEM else veth_problem()
veth = pytest.mark.skipif(_VETH is not None, reason=_VETH or "")

_ports = itertools.count(41000 + os.getpid() % 1000 * 7)
_groups = itertools.count(1)


def _port() -> int:
    return next(_ports)


def _group4() -> str:
    return f"239.255.77.{next(_groups) % 250 + 1}"


def _group6() -> str:
    return f"ff12::77:{next(_groups):x}"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _wait_readable(sock, timeout: float = 2.0) -> bool:
    readable, _, _ = select.select([sock], [], [], timeout)
    return bool(readable)


def _receive_all(sock, batch: ReceiveBatch, expected: int, timeout: float = 3.0,
                 receive=receive_batch) -> list[tuple[bytes, object, bool]]:
    """Receive until ``expected`` datagrams arrived: (data, source, truncated)."""
    out: list[tuple[bytes, object, bool]] = []
    deadline = time.monotonic() + timeout
    while len(out) < expected:
        n = receive(sock, batch)
        if n == 0:
            left = deadline - time.monotonic()
            if left <= 0 or not _wait_readable(sock, left):
                break
            continue
        for i in range(n):
            out.append((bytes(batch.datagram(i)), batch.source(i), bool(batch.truncated[i])))
    return out


def _nothing_arrives(sock, wait: float = 0.15) -> bool:
    if _wait_readable(sock, wait):
        return False
    return receive_batch(sock, ReceiveBatch(4, 2048)) == 0


def _send_all(sock, datagrams, address=None) -> None:
    sent = 0
    deadline = time.monotonic() + 3.0
    while sent < len(datagrams):
        n = send_batch(sock, datagrams[sent:], address)
        sent += n
        if n == 0:
            assert time.monotonic() < deadline, "send_batch made no progress"
            select.select([], [sock], [], 0.5)








def _link_local(ifname: str) -> str:
    with open("/proc/net/if_inet6") as f:
        for line in f:
            fields = line.split()
            if fields[5] == ifname and fields[0].startswith("fe80"):
                return socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0]))
    raise AssertionError(f"{ifname} has no link-local IPv6 address")


def _payloads(n: int, prefix: bytes = b"d") -> list[bytes]:
    return [prefix + b"%06d" % i + b"x" * (i % 37) for i in range(n)]


# ---------------------------------------------------------------------------
# Validation (no sockets)
# ---------------------------------------------------------------------------


def test_resolve_ipv4_defaults_to_loopback():
    spec = resolve_group(" 239.255.0.1 ", 5000)
    assert spec.family == socket.AF_INET
    assert spec.group == "239.255.0.1"
    assert spec.port == 5000
    assert spec.interface_name == "lo"
    assert spec.interface_index == socket.if_nametoindex("lo")
    assert spec.interface_address == "127.0.0.1"
    assert spec.ttl == 1 and spec.scope_id == 0 and spec.source is None
    assert spec.sockaddr == ("239.255.0.1", 5000)
    assert str(spec) == "239.255.0.1:5000 on lo"
    with pytest.raises(AttributeError):
        spec.port = 1  # type: ignore[misc]  # frozen


def test_resolve_interface_by_name_index_address_agree():
    by_name = resolve_group("239.255.0.2", 5000, interface="lo", ttl=0)
    by_index = resolve_group("239.255.0.2", 5000, interface=socket.if_nametoindex("lo"), ttl=0)
    by_address = resolve_group("239.255.0.2", 5000, interface="127.0.0.1", ttl=0)
    assert by_name == by_index == by_address
    assert by_name.ttl == 0
    assert resolve_group("239.255.0.2", 5000, ttl=255, source="127.0.0.1").source == "127.0.0.1"


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragments"),
    [
        (dict(group="no-such-group", port=5000), ValueError, ["group='no-such-group'", "not an IP"]),
        (dict(group="0.0.0.0", port=5000), ValueError,
         ["group='0.0.0.0'", "not a multicast", "224.0.0.0/4", "127.0.0.0/8"]),
        (dict(group="::", port=5000), ValueError, ["group='::'", "not a multicast", "ff00::/8"]),
        (dict(group="224.0.0.1", port=5000), ValueError,
         ["group='224.0.0.1'", "control group", "224.0.0.0/24", "allow_control_groups=True"]),
        (dict(group="224.0.0.251", port=5000), ValueError, ["group='224.0.0.251'", "control group"]),
        (dict(group="ff02::1", port=5000), ValueError,
         ["group='ff02::1'", "control group", "allow_control_groups=True"]),
        (dict(group="ff02::fb", port=5000), ValueError, ["group='ff02::fb'"]),
        (dict(group="ff01::2", port=5000), ValueError, ["group='ff01::2'"]),
        (dict(group="ff02::1:ff12:3456", port=5000), ValueError,
         ["group='ff02::1:ff12:3456'", "solicited-node"]),
        (dict(group="127.0.0.1", port=5000, source="127.0.0.1"), ValueError,
         ["source='127.0.0.1'", "unicast", "source=None"]),
        (dict(group="127.0.0.1", port=5000, allow_unicast=1), TypeError, ["allow_unicast=1"]),
        (dict(group="239.255.0.1", port=5000, allow_control_groups="yes"), TypeError,
         ["allow_control_groups='yes'"]),
        (dict(group="239.255.0.1", port=5000, family=socket.AF_INET6), ValueError,
         ["group='239.255.0.1'", "IPv4", "family=IPv6"]),
        (dict(group="ff12::1", port=5000, family=4), ValueError, ["group='ff12::1'", "IPv6"]),
        (dict(group="239.255.0.1", port=5000, family=99), ValueError, ["family=99", "allowed"]),
        (dict(group="239.255.0.1%lo", port=5000), ValueError, ["group='239.255.0.1%lo'"]),
        (dict(group="239.255.0.1", port=0), ValueError, ["port=0", "allowed: 1..65535"]),
        (dict(group="239.255.0.1", port=70000), ValueError, ["port=70000", "allowed: 1..65535"]),
        (dict(group="239.255.0.1", port="5000"), TypeError, ["port='5000'", "not an integer"]),
        (dict(group="239.255.0.1", port=True), TypeError, ["port=True"]),
        (dict(group="239.255.0.1", port=5000, ttl=256), ValueError, ["ttl=256", "allowed: 0..255"]),
        (dict(group="239.255.0.1", port=5000, ttl=-1), ValueError, ["ttl=-1", "allowed: 0..255"]),
        (dict(group="239.255.0.1", port=5000, interface="nosuch0"), ValueError,
         ["interface='nosuch0'", "no network interface has this name", "available: lo"]),
        (dict(group="239.255.0.1", port=5000, interface=99999), ValueError,
         ["interface=99999", "no network interface has this index"]),
        (dict(group="239.255.0.1", port=5000, interface="127.0.0.9"), ValueError,
         ["interface='127.0.0.9'", "not an address of any network interface", "127.0.0.1"]),
        (dict(group="239.255.0.1", port=5000, interface="::1"), ValueError,
         ["interface='::1'", "IPv6 address", "group is IPv4"]),
        (dict(group="239.255.0.1", port=5000, interface=1.5), TypeError, ["interface=1.5"]),
        (dict(group="239.255.0.1", port=5000, source="239.255.0.9"), ValueError,
         ["source='239.255.0.9'", "not a unicast"]),
        (dict(group="239.255.0.1", port=5000, source="0.0.0.0"), ValueError,
         ["source='0.0.0.0'", "not a unicast"]),
        (dict(group="239.255.0.1", port=5000, source="::1"), ValueError,
         ["source='::1'", "IPv6", "IPv4"]),
        (dict(group="239.255.0.1", port=5000, source="nonsense"), ValueError,
         ["source='nonsense'", "not an IP address"]),
    ],
)
def test_resolve_rejects_bad_arguments(kwargs, exc, fragments):
    with pytest.raises(exc) as info:
        resolve_group(**kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.skipif(not LINUX, reason="Linux-specific: no IPv6 multicast over lo")
@pytest.mark.parametrize("interface", [None, "lo", "::1"])
def test_ipv6_on_loopback_says_name_an_interface(interface):
    with pytest.raises(ValueError) as info:
        resolve_group("ff12::1", 5000, interface=interface)
    message = str(info.value)
    assert "loopback interface 'lo'" in message
    assert "name a multicast-capable interface" in message
    assert f"interface={interface!r}" in message or "interface=None" in message


@netns
@veth
def test_resolve_ipv6_scope_and_normalisation():
    mc0 = socket.if_nametoindex("mc0")
    mc1 = socket.if_nametoindex("mc1")
    spec = resolve_group("FF12:0:0::0077%mc0", 6000)
    assert (spec.family, spec.group, spec.interface_name) == (socket.AF_INET6, "ff12::77", "mc0")
    assert spec.interface_index == spec.scope_id == mc0
    assert spec.sockaddr == ("ff12::77", 6000, 0, mc0)
    assert spec.interface_address is None
    assert resolve_group(f"ff12::77%{mc1}", 6000) == resolve_group("ff12::77", 6000, interface="mc1")
    assert resolve_group("ff12::77%mc0", 6000, interface=mc0) == spec
    # a global-scope group needs no scope id
    assert resolve_group("ff1e::77", 6000, interface="mc0").scope_id == 0
    # the interface by its link-local address
    assert resolve_group("ff12::77", 6000, interface=_link_local("mc0") + "%mc0") == spec
    with pytest.raises(ValueError, match=r"group='ff12::77%mc0' names interface mc0.*"
                                         r"interface='mc1' is mc1"):
        resolve_group("ff12::77%mc0", 6000, interface="mc1")
    with pytest.raises(ValueError, match=r"group='ff12::77%nosuch9'"):
        resolve_group("ff12::77%nosuch9", 6000)
    # mc0 has no IPv4 address: on Linux IPv4 uses the index
    spec4 = resolve_group("239.255.0.3", 6000, interface="mc0")
    assert spec4.interface_address is None and spec4.interface_index == mc0
    with pytest.raises(ValueError, match="interface 'mc0' has no IPv4 address"):
        open_sender_socket(spec4)  # would send from 0.0.0.0


def test_receive_batch_validates_its_arguments():
    for kwargs, exc, fragment in [
        (dict(capacity=0), ValueError, "capacity=0"),
        (dict(capacity=1025), ValueError, "capacity=1025"),
        (dict(capacity=2.0), TypeError, "capacity=2.0"),
        (dict(slot_size=0), ValueError, "slot_size=0"),
        (dict(slot_size=65537), ValueError, "slot_size=65537"),
    ]:
        with pytest.raises(exc, match=fragment):
            ReceiveBatch(**kwargs)
    batch = ReceiveBatch(4, 128)
    assert batch.buffer.shape == (512,) and batch.buffer.dtype == np.uint8
    assert batch.offsets.tolist() == [0, 128, 256, 384]
    assert batch.lengths.dtype == np.int64 and batch.offsets.dtype == np.int64
    assert len(batch) == 0
    with pytest.raises(IndexError, match="holds 0"):
        batch.datagram(0)


def test_receive_batch_store_fills_a_slot_as_a_receive_would():
    batch = ReceiveBatch(4, 8)
    batch.store(0, b"hello", ("127.0.0.1", 4000))
    batch.store(1, bytearray(b"0123456789"), ("::1", 4001))
    batch.store(2, memoryview(b"x"), ("ff12::1", 4002, 5, 3))
    batch.store(3, b"", None)
    batch.count = 4
    assert [bytes(batch.datagram(i)) for i in range(4)] == [b"hello", b"01234567", b"x", b""]
    assert batch.truncated.tolist() == [False, True, False, False]
    assert batch.truncated_count == 1
    assert batch.families.tolist() == [4, 6, 6, 0]
    assert batch.ports.tolist() == [4000, 4001, 4002, 0]
    assert batch.scope_ids.tolist() == [0, 0, 3, 0]
    assert batch.addresses[0, :4].tobytes() == socket.inet_aton("127.0.0.1")
    assert not batch.addresses[0, 4:].any()
    assert batch.sources() == [("127.0.0.1", 4000), ("::1", 4001, 0, 0), ("ff12::1", 4002, 0, 3),
                               None]
    for bad in (-1, 4):
        with pytest.raises(IndexError, match="slot"):
            batch.store(bad, b"", None)


def test_receive_batch_same_source():
    batch = ReceiveBatch(4, 8)
    assert batch.same_source()
    for i, source in enumerate([("127.0.0.1", 1), ("127.0.0.1", 1), ("127.0.0.1", 2),
                                ("::1", 1)]):
        batch.store(i, b"d", source)
    batch.count = 1
    assert batch.same_source()
    batch.count = 2
    assert batch.same_source()
    batch.count = 4
    assert not batch.same_source()
    assert batch.same_source([0, 1]) and batch.same_source(np.array([2]))
    assert not batch.same_source([1, 2]) and not batch.same_source([0, 3])


def test_pack_sockaddr_layout():
    v4 = pack_sockaddr(socket.AF_INET, ("239.255.0.1", 0x1234))
    v6 = pack_sockaddr(socket.AF_INET6, ("ff12::1", 0x1234, 0, 7))
    assert len(v4) == 16 and len(v6) == 28
    assert v4[2:4] == b"\x12\x34" and v4[4:8] == socket.inet_aton("239.255.0.1")
    assert v6[2:4] == b"\x12\x34" and v6[8:24] == socket.inet_pton(socket.AF_INET6, "ff12::1")
    assert struct.unpack("=I", v6[24:28])[0] == 7
    with pytest.raises(ValueError, match="not an IPv4 address"):
        pack_sockaddr(socket.AF_INET, ("ff12::1", 1))
    with pytest.raises(ValueError, match=r"port=70000"):
        pack_sockaddr(socket.AF_INET, ("239.255.0.1", 70000))


def test_constants_match_linux_headers():
    if not LINUX:
        pytest.skip("Linux values")
    c = _constants
    assert (c.IP_MULTICAST_ALL, c.IPV6_MULTICAST_ALL, c.SO_RXQ_OVFL, c.IP_PKTINFO) == (49, 29, 40, 8)
    assert (c.IP_ADD_SOURCE_MEMBERSHIP, c.IP_DROP_SOURCE_MEMBERSHIP) == (39, 40)
    assert (c.MCAST_JOIN_SOURCE_GROUP, c.MCAST_LEAVE_SOURCE_GROUP) == (46, 47)
    assert (c.IPV6_RECVPKTINFO, c.IPV6_PKTINFO, c.SO_MEMINFO) == (49, 50, 55)
    assert c.IP_MREQ_SOURCE_ORDER == ("multiaddr", "interface", "sourceaddr")
    assert struct.calcsize(c.GROUP_SOURCE_REQ_FORMAT) == (264 if struct.calcsize("@L") == 8
                                                          else 260)


# ---------------------------------------------------------------------------
# Sockets (inside the namespace)
# ---------------------------------------------------------------------------


@netns
def test_receiver_and_sender_socket_options():
    spec = resolve_group(_group4(), _port(), ttl=3)
    rx, granted = open_receiver_socket(spec, rcvbuf=256 * 1024)
    tx = open_sender_socket(spec, loop=False, sndbuf=128 * 1024)
    try:
        assert granted == 256 * 1024
        assert rx.getsockname() == spec.sockaddr  # bound to the group itself
        assert rx.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert rx.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert rx.getsockopt(socket.IPPROTO_IP, _constants.IP_MULTICAST_ALL) == 0
        assert rx.getsockopt(socket.SOL_SOCKET, _constants.SO_RXQ_OVFL) == 1
        assert rx.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 256 * 1024
        assert os.get_blocking(rx.fileno()) is False
        assert tx.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL) == 3
        assert tx.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP) == 0
        assert socket.inet_ntoa(tx.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, 4)) \
            == "127.0.0.1"
        assert tx.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 128 * 1024
        assert tx.getpeername() == spec.sockaddr  # connected to the group
        assert os.get_blocking(tx.fileno()) is False
    finally:
        close_receiver_socket(rx, spec)
        close_sender_socket(tx)


@netns
def test_ipv4_batch_receive_over_loopback():
    spec = resolve_group(_group4(), _port())
    rx, _ = open_receiver_socket(spec)
    tx = open_sender_socket(spec)
    batch = ReceiveBatch(capacity=16, slot_size=2048)
    try:
        payloads = [b"", b"a", b"bb" * 100, bytes(range(256)) * 4, b"last"]
        assert send_batch(tx, payloads) == len(payloads)
        assert _wait_readable(rx)
        time.sleep(0.05)  # all five are queued: one call must take them all
        n = receive_batch(rx, batch)
        assert n == len(payloads) == batch.count == len(batch)
        assert [bytes(batch.datagram(i)) for i in range(n)] == payloads
        assert batch.lengths[:n].tolist() == [len(p) for p in payloads]
        # the decoder's view: one buffer, offsets, lengths
        for i, p in enumerate(payloads):
            start = int(batch.offsets[i])
            assert batch.buffer[start:start + int(batch.lengths[i])].tobytes() == p
        assert not batch.truncated[:n].any()
        assert batch.sources() == [tx.getsockname()] * n
        assert batch.kernel_drops == 0
        assert receive_batch(rx, batch) == 0  # EAGAIN is 0, not an exception
        assert batch.count == 0
    finally:
        close_receiver_socket(rx, spec)
        close_sender_socket(tx)


@netns
def test_two_receivers_both_get_everything():
    spec = resolve_group(_group4(), _port())
    rx1, _ = open_receiver_socket(spec)
    rx2, _ = open_receiver_socket(spec)
    tx = open_sender_socket(spec)
    try:
        payloads = _payloads(50)
        _send_all(tx, payloads)
        for rx in (rx1, rx2):
            got = _receive_all(rx, ReceiveBatch(8, 256), len(payloads))
            assert [data for data, _, _ in got] == payloads
        assert _nothing_arrives(rx1) and _nothing_arrives(rx2)
    finally:
        close_receiver_socket(rx1, spec)
        close_receiver_socket(rx2, spec)
        close_sender_socket(tx)


@netns
def test_receiver_gets_only_its_own_group():
    port = _port()
    spec_a = resolve_group(_group4(), port)
    spec_b = resolve_group(_group4(), port)
    rx_a, _ = open_receiver_socket(spec_a)
    rx_b, _ = open_receiver_socket(spec_b)  # B is joined on this host, same port
    tx_a = open_sender_socket(spec_a)
    tx_b = open_sender_socket(spec_b)
    try:
        assert rx_a.getsockopt(socket.IPPROTO_IP, _constants.IP_MULTICAST_ALL) == 0
        send_batch(tx_b, [b"for B"])
        assert [d for d, _, _ in _receive_all(rx_b, ReceiveBatch(4, 64), 1)] == [b"for B"]
        assert _nothing_arrives(rx_a)
        send_batch(tx_a, [b"for A"])  # and A itself works
        assert [d for d, _, _ in _receive_all(rx_a, ReceiveBatch(4, 64), 1)] == [b"for A"]
        assert _nothing_arrives(rx_b)
    finally:
        for rx, spec in ((rx_a, spec_a), (rx_b, spec_b)):
            close_receiver_socket(rx, spec)
        close_sender_socket(tx_a)
        close_sender_socket(tx_b)


@netns
@veth
def test_ipv6_over_the_veth_pair():
    group, port = _group6(), _port()
    spec_tx = resolve_group(group, port, interface="mc0", ttl=1)
    spec_far = resolve_group(f"{group}%mc1", port)   # across the veth
    spec_near = resolve_group(group, port, interface="mc0")  # via multicast loop
    rx_far, _ = open_receiver_socket(spec_far)
    rx_near, _ = open_receiver_socket(spec_near)
    tx = open_sender_socket(spec_tx)
    try:
        assert tx.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF) \
            == socket.if_nametoindex("mc0")
        assert tx.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS) == 1
        assert tx.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP) == 1
        assert rx_far.getsockopt(socket.IPPROTO_IPV6, _constants.IPV6_MULTICAST_ALL) == 0
        payloads = _payloads(20, b"v6-")
        _send_all(tx, payloads)
        sender = tx.getsockname()  # (fe80::..., port, 0, mc0 index)
        for rx, spec in ((rx_far, spec_far), (rx_near, spec_near)):
            got = _receive_all(rx, ReceiveBatch(8, 512), len(payloads))
            assert [d for d, _, _ in got] == payloads
            for _, source, _ in got:
                assert source == (sender[0], sender[1], 0, spec.interface_index)
        # the pure-Python path gives the same answer
        _send_all(tx, payloads[:3])
        got = _receive_all(rx_far, ReceiveBatch(8, 512), 3,
                           receive=_batchio._receive_batch_fallback)
        assert [(d, s) for d, s, _ in got] == [
            (p, (sender[0], sender[1], 0, spec_far.interface_index)) for p in payloads[:3]]
    finally:
        close_receiver_socket(rx_far, spec_far)
        close_receiver_socket(rx_near, spec_near)
        close_sender_socket(tx)


@netns
@pytest.mark.parametrize("receive", [receive_batch, _batchio._receive_batch_fallback],
                         ids=["recvmmsg", "fallback"])
def test_oversized_datagram_is_flagged_truncated(receive):
    spec = resolve_group(_group4(), _port())
    rx, _ = open_receiver_socket(spec)
    tx = open_sender_socket(spec)
    try:
        big = bytes(range(256)) * 2  # 512 bytes
        send_batch(tx, [big, b"small", big[:100]])
        got = _receive_all(rx, ReceiveBatch(4, 100), 3, receive=receive)
        assert got == [(big[:100], tx.getsockname(), True),
                       (b"small", tx.getsockname(), False),
                       (big[:100], tx.getsockname(), False)]
    finally:
        close_receiver_socket(rx, spec)
        close_sender_socket(tx)


@netns
def test_granted_receive_buffer_is_read_back():
    spec = resolve_group(_group4(), _port())
    with open("/proc/sys/net/core/rmem_max") as f:
        rmem_max = int(f.read())
    with open("/proc/sys/net/core/rmem_default") as f:
        rmem_default = int(f.read())
    socks = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sock, granted = open_receiver_socket(spec, rcvbuf=min(rmem_max, 1 << 20))
            socks.append(sock)
            assert granted == min(rmem_max, 1 << 20)
            sock, granted = open_receiver_socket(spec, rcvbuf=None)
            socks.append(sock)
            # the kernel's default is not doubled: half of it, in request units
            assert granted == rmem_default // 2
        with pytest.warns(BufferSizeWarning, match=rf"rcvbuf={2 * rmem_max}: the kernel"
                                                   rf" granted only {rmem_max} bytes"):
            sock, granted = open_receiver_socket(spec, rcvbuf=2 * rmem_max)
        socks.append(sock)
        assert granted == rmem_max
        with pytest.raises(ValueError, match=r"rcvbuf=0 is out of range"):
            open_receiver_socket(spec, rcvbuf=0)
    finally:
        for sock in socks:
            close_receiver_socket(sock, spec)


@netns
@pytest.mark.parametrize("receive", [receive_batch, _batchio._receive_batch_fallback],
                         ids=["recvmmsg", "fallback"])
def test_kernel_drop_counter_reports_overflow(receive):
    spec = resolve_group(_group4(), _port())
    rx, granted = open_receiver_socket(spec, rcvbuf=1)  # the kernel's minimum
    tx = open_sender_socket(spec)
    batch = ReceiveBatch(64, 2048)
    try:
        assert granted < 16 * 1024
        flood = _payloads(300, b"f")
        flood = [p.ljust(1000, b".") for p in flood]
        _send_all(tx, flood)
        drops = socket_drop_count(rx)
        assert drops is not None and drops > 0
        received = _receive_all(rx, batch, len(flood), timeout=0.3, receive=receive)
        assert 0 < len(received) < len(flood)
        # every datagram is either received or counted as dropped
        assert len(received) + drops == len(flood)
        # the datagrams queued before the drops carry no (or a smaller) counter;
        # the next one queued after them carries the full count
        send_batch(tx, [b"after the flood"])
        got = _receive_all(rx, batch, 1, receive=receive)
        assert got[0][0] == b"after the flood"
        assert batch.kernel_drops == drops == socket_drop_count(rx)
    finally:
        close_receiver_socket(rx, spec)
        close_sender_socket(tx)


@netns
def test_source_specific_membership_ipv4():
    group, port = _group4(), _port()
    spec_any = resolve_group(group, port)
    spec_1 = resolve_group(group, port, source="127.0.0.1")
    spec_2 = resolve_group(group, port, source="127.0.0.2")
    rx_any, _ = open_receiver_socket(spec_any)
    rx_1, _ = open_receiver_socket(spec_1)
    rx_2, _ = open_receiver_socket(spec_2)
    tx_1 = open_sender_socket(spec_any, local_address="127.0.0.1")
    tx_2 = open_sender_socket(spec_any, local_address="127.0.0.2")
    try:
        assert tx_2.getsockname()[0] == "127.0.0.2"
        send_batch(tx_1, [b"from .1"])
        send_batch(tx_2, [b"from .2"])
        got_any = _receive_all(rx_any, ReceiveBatch(4, 64), 2)
        assert sorted((d, s[0]) for d, s, _ in got_any) == [
            (b"from .1", "127.0.0.1"), (b"from .2", "127.0.0.2")]
        assert [(d, s[0]) for d, s, _ in _receive_all(rx_1, ReceiveBatch(4, 64), 1)] == [
            (b"from .1", "127.0.0.1")]
        assert [(d, s[0]) for d, s, _ in _receive_all(rx_2, ReceiveBatch(4, 64), 1)] == [
            (b"from .2", "127.0.0.2")]
        assert _nothing_arrives(rx_1) and _nothing_arrives(rx_2)
        assert group in joined_ipv4_groups()
    finally:
        for rx, spec in ((rx_any, spec_any), (rx_1, spec_1), (rx_2, spec_2)):
            close_receiver_socket(rx, spec)
        close_sender_socket(tx_1)
        close_sender_socket(tx_2)
    assert group not in joined_ipv4_groups()


@netns
@veth
def test_source_specific_membership_ipv6():
    group, port = _group6(), _port()
    mc0_address = _link_local("mc0")
    spec_ok = resolve_group(group, port, interface="mc1", source=mc0_address)
    spec_other = resolve_group(group, port, interface="mc1", source="fe80::dead:beef")
    rx_ok, _ = open_receiver_socket(spec_ok)
    rx_other, _ = open_receiver_socket(spec_other)
    tx = open_sender_socket(resolve_group(group, port, interface="mc0"))
    try:
        assert tx.getsockname()[0] == mc0_address
        send_batch(tx, [b"ssm6-1", b"ssm6-2"])
        got = _receive_all(rx_ok, ReceiveBatch(4, 64), 2)
        assert [(d, s[0]) for d, s, _ in got] == [(b"ssm6-1", mc0_address),
                                                  (b"ssm6-2", mc0_address)]
        assert _nothing_arrives(rx_other)
        assert ("mc1", group) in joined_ipv6_groups()
    finally:
        close_receiver_socket(rx_ok, spec_ok)
        close_receiver_socket(rx_other, spec_other)
        close_sender_socket(tx)
    assert ("mc1", group) not in joined_ipv6_groups()


@netns
@pytest.mark.parametrize("n", [500, 2500])
def test_send_batch_sends_all_in_order(n):
    spec = resolve_group(_group4(), _port())
    rx, _ = open_receiver_socket(spec, rcvbuf=4 << 20)
    tx = open_sender_socket(spec)
    try:
        payloads = _payloads(n)
        sent = send_batch(tx, payloads)  # one call; <= 1024 per syscall inside
        assert sent == n
        got = _receive_all(rx, ReceiveBatch(256, 64), n)
        assert [d for d, _, _ in got] == payloads
        assert socket_drop_count(rx) == 0
    finally:
        close_receiver_socket(rx, spec)
        close_sender_socket(tx)


@netns
def test_send_batch_errors_and_partial_sends():
    spec = resolve_group(_group4(), _port())
    rx, _ = open_receiver_socket(spec)
    tx = open_sender_socket(spec)
    batch = ReceiveBatch(8, 65536)
    try:
        with pytest.raises(ValueError, match=r"datagrams\[1\] has 70000 bytes"):
            send_batch(tx, [b"never sent", bytes(70000)])
        too_big = bytes(_constants.UDP_MAX_PAYLOAD_IPV4 + 1)
        with pytest.raises(OSError) as info:
            send_batch(tx, [too_big])
        assert info.value.errno == errno.EMSGSIZE
        # an error after the first datagram: that one is counted, the error
        # comes with the next call, which starts at the failing datagram
        assert send_batch(tx, [b"ok", too_big, b"later"]) == 1
        with pytest.raises(OSError):
            send_batch(tx, [too_big, b"later"])
        assert send_batch(tx, [bytes(_constants.UDP_MAX_PAYLOAD_IPV4)]) == 1
        got = _receive_all(rx, batch, 2)
        assert [len(d) for d, _, _ in got] == [2, _constants.UDP_MAX_PAYLOAD_IPV4]
        assert got[0][0] == b"ok"
        assert _nothing_arrives(rx)
        with pytest.raises(TypeError):
            send_batch(tx, ["text is not bytes"])
        assert send_batch(tx, []) == 0
    finally:
        close_receiver_socket(rx, spec)
        close_sender_socket(tx)


@netns
@veth
def test_send_batch_to_an_address_and_python_fallback():
    # unconnected senders: the address is packed by pack_sockaddr
    spec4 = resolve_group(_group4(), _port())
    group6, port6 = _group6(), _port()
    spec6 = resolve_group(group6, port6, interface="mc1")
    rx4, _ = open_receiver_socket(spec4)
    rx6, _ = open_receiver_socket(spec6)
    tx4 = open_sender_socket(spec4, connect=False)
    tx6 = open_sender_socket(resolve_group(group6, port6, interface="mc0"), connect=False)
    try:
        assert send_batch(tx4, [b"a1", b"a2"], spec4.sockaddr) == 2
        assert _batchio._send_batch_fallback(tx4, [b"b1", memoryview(b"b2")], spec4.sockaddr) == 2
        assert [d for d, _, _ in _receive_all(rx4, ReceiveBatch(8, 64), 4)] == [
            b"a1", b"a2", b"b1", b"b2"]
        mc0 = socket.if_nametoindex("mc0")
        assert send_batch(tx6, [b"c1"], (group6, port6, 0, mc0)) == 1
        assert send_batch(tx6, [b"c2"], (f"{group6}%mc0", port6)) == 1
        assert _batchio._send_batch_fallback(tx6, [b"c3"], (group6, port6, 0, mc0)) == 1
        assert [d for d, _, _ in _receive_all(rx6, ReceiveBatch(8, 64), 3)] == [
            b"c1", b"c2", b"c3"]
        with pytest.raises(OSError):  # unconnected and no address
            send_batch(tx4, [b"nowhere"])
    finally:
        close_receiver_socket(rx4, spec4)
        close_receiver_socket(rx6, spec6)
        close_sender_socket(tx4)
        close_sender_socket(tx6)


@netns
@veth
def test_closing_drops_membership_and_releases_descriptors():
    base_fds = open_fd_count()
    group4, group6 = _group4(), _group6()
    specs = [
        resolve_group(group4, _port()),
        resolve_group(group4, _port(), source="127.0.0.1"),
        resolve_group(group6, _port(), interface="mc1"),
        resolve_group(group6, _port(), interface="mc1", source="fe80::1"),
    ]
    opened = [(open_receiver_socket(spec)[0], spec) for spec in specs]
    tx = open_sender_socket(specs[0])
    assert open_fd_count() == base_fds + len(specs) + 1
    assert group4 in joined_ipv4_groups()
    assert ("mc1", group6) in joined_ipv6_groups()
    # membership is dropped explicitly, before the close: check after each
    close_receiver_socket(*opened[0])
    assert group4 in joined_ipv4_groups()  # the SSM socket still holds it
    close_receiver_socket(*opened[1])
    assert group4 not in joined_ipv4_groups()
    for sock, spec in opened[2:]:
        close_receiver_socket(sock, spec)
    assert ("mc1", group6) not in joined_ipv6_groups()
    close_sender_socket(tx)
    assert open_fd_count() == base_fds
    # the membership is dropped explicitly, not only by the close: with a
    # second descriptor keeping the socket alive, the group must still go
    sock, _ = open_receiver_socket(specs[0])
    twin = os.dup(sock.fileno())
    try:
        assert group4 in joined_ipv4_groups()
        close_receiver_socket(sock, specs[0])
        assert group4 not in joined_ipv4_groups()
    finally:
        os.close(twin)
    # idempotent and never raising, also on a stdlib socket or a failed open
    for sock, spec in opened:
        close_receiver_socket(sock, spec)
        assert sock.fileno() == -1
    close_sender_socket(tx)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    close_receiver_socket(raw, specs[0])  # never joined
    assert raw.fileno() == -1
    assert open_fd_count() == base_fds


@netns
def test_open_failures_leak_nothing():
    base_fds = open_fd_count()
    spec = resolve_group(_group4(), _port())
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        blocker.bind(spec.sockaddr)  # no SO_REUSEADDR: nobody may share
        with pytest.raises(OSError) as info:
            open_receiver_socket(spec)
        assert info.value.errno == errno.EADDRINUSE
        assert str(spec) in str(info.value)
    finally:
        blocker.close()
    with pytest.raises(ValueError, match=r"local_address='::1' is not an IPv4 address"):
        open_sender_socket(spec, local_address="::1")
    assert open_fd_count() == base_fds


async def _drain(sock, batch, into: list[bytes], want: int) -> None:
    while len(into) < want:
        n = receive_batch(sock, batch)
        if n == 0:
            await trio.lowlevel.wait_readable(sock)
            continue
        into.extend(bytes(batch.datagram(i)) for i in range(n))


@netns
async def test_trio_receive_loop_and_cancellation():
    spec = resolve_group(_group4(), _port())
    rx, _ = open_receiver_socket(spec)
    tx = open_sender_socket(spec)
    base_groups = joined_ipv4_groups()
    assert spec.group in base_groups
    got: list[bytes] = []
    batch = ReceiveBatch(16, 256)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, rx, batch, got, 30)
            for chunk in range(3):
                await trio.sleep(0.01)
                await tx.send(b"trio-%d" % chunk)  # trio's own socket API works too
                assert send_batch(tx, _payloads(9, b"c%d-" % chunk)) == 9
        assert len(got) == 30
        assert got[:1] == [b"trio-0"]
        # a task blocked in wait_readable is cancelled cleanly; the finally
        # closes the socket and the waiter sees no error
        with trio.move_on_after(0.05) as scope:
            await _drain(rx, batch, got, 31)
        assert scope.cancelled_caught
    finally:
        close_receiver_socket(rx, spec)
        close_sender_socket(tx)
    assert spec.group not in joined_ipv4_groups()
    assert rx.fileno() == -1 and tx.fileno() == -1


@netns
async def test_close_wakes_a_waiting_task():
    spec = resolve_group(_group4(), _port())
    rx, _ = open_receiver_socket(spec)

    async def waiter():
        with pytest.raises(trio.ClosedResourceError):
            await trio.lowlevel.wait_readable(rx)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        close_receiver_socket(rx, spec)
    assert rx.fileno() == -1


@netns
def test_pure_python_path_end_to_end(monkeypatch):
    # what non-Linux platforms (no recvmmsg/sendmmsg) run
    monkeypatch.setattr(_batchio, "HAVE_MMSG", False)
    spec = resolve_group(_group4(), _port())
    rx, _ = open_receiver_socket(spec)
    tx = open_sender_socket(spec)
    try:
        batch = ReceiveBatch(8, 64)
        assert batch._native is None
        payloads = _payloads(20)
        assert send_batch(tx, payloads) == 20
        got = _receive_all(rx, batch, 20)
        assert [(d, s, t) for d, s, t in got] == [
            (p[:64], tx.getsockname(), len(p) > 64) for p in payloads]
        assert batch.kernel_drops == 0
        assert receive_batch(rx, batch) == 0
    finally:
        close_receiver_socket(rx, spec)
        close_sender_socket(tx)


@netns
def test_sender_ttl_zero_and_loop_off_still_reach_loopback_receivers():
    # documented: on lo, datagrams are looped back by the interface itself
    spec = resolve_group(_group4(), _port(), ttl=0)
    rx, _ = open_receiver_socket(spec)
    tx = open_sender_socket(spec, loop=False)
    try:
        send_batch(tx, [b"ttl0"])
        assert [d for d, _, _ in _receive_all(rx, ReceiveBatch(2, 64), 1)] == [b"ttl0"]
    finally:
        close_receiver_socket(rx, spec)
        close_sender_socket(tx)


def test_spec_is_required():
    with pytest.raises(TypeError, match="not a GroupSpec"):
        open_receiver_socket(("239.255.0.1", 5000))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a GroupSpec"):
        open_sender_socket("239.255.0.1")  # type: ignore[arg-type]
    assert isinstance(resolve_group("239.255.0.1", 1), GroupSpec)
