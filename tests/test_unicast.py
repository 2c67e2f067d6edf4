"""astropix-analysis' default destination, 127.0.0.1:5007, is unicast: the
socket layer, open_receiver and open_sender accept it (issue 7), one socket
owns the port, and a port held without SO_REUSEADDR gives a clear OSError.

Real sockets, inside the private network namespace (tools/netns-run).
"""

from __future__ import annotations

import errno
import itertools
import os
import socket

import pytest
import trio

from mcast_trio import AstroPix4Readout, open_receiver, open_sender, resolve_group
from mcast_trio._io._sockets import (
    close_receiver_socket,
    close_sender_socket,
    open_blocking_receiver_socket,
    open_blocking_sender_socket,
    open_receiver_socket,
)
from mcast_trio.sim import DaqSimulator
from mcast_trio.testing import isolation_problem

_PROBLEM = isolation_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")

_ports = itertools.count(43000 + os.getpid() % 1000 * 3)

ASTROPIX_DEFAULT = ("127.0.0.1", 5007)


def _astropix_style_sender() -> socket.socket:
    """What astropix-analysis' MulticastSender is: a plain UDP socket with
    IP_MULTICAST_TTL set, sending with sendto() to (group, port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
    return sock


def _astropix_style_receiver(port: int) -> socket.socket:
    """What astropix-analysis' MulticastReceiver does first: bind ('', port)
    without SO_REUSEADDR."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.bind(("", port))
    return sock


def test_loopback_unicast_resolves_as_unicast():
    spec = resolve_group(*ASTROPIX_DEFAULT)
    assert spec.unicast and spec.group == "127.0.0.1" and spec.port == 5007
    assert spec.interface_name == "lo" and spec.source is None
    assert str(spec) == "unicast 127.0.0.1:5007"
    assert not resolve_group("239.255.0.1", 5007).unicast
    six = resolve_group("::1", 5007)
    assert six.unicast and six.family == socket.AF_INET6 and six.sockaddr == ("::1", 5007, 0, 0)


async def test_open_receiver_gets_an_unmodified_astropix_daq_at_its_defaults():
    readouts = DaqSimulator(seed=7).readouts(200)
    async with open_receiver(*ASTROPIX_DEFAULT, readout_class=AstroPix4Readout) as receiver:
        daq = _astropix_style_sender()
        try:
            for readout in readouts:
                daq.sendto(readout.to_bytes(), ASTROPIX_DEFAULT)
        finally:
            daq.close()
        got = []
        with trio.fail_after(10):
            while len(got) < len(readouts):
                got.append(await receiver.receive())
        stats = receiver.statistics()
    assert got == readouts
    for a, b in zip(got, readouts):
        assert (a.decode() == b.decode()).all()
    assert stats.readouts == 200 and stats.malformed == 0 and stats.lost == 0


async def test_open_sender_sends_unicast_to_127_0_0_1():
    port = next(_ports)
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plain.bind(("127.0.0.1", port))
    plain.settimeout(5)
    try:
        readouts = DaqSimulator(seed=8).readouts(20)
        async with open_sender("127.0.0.1", port, framing="raw") as sender:
            for readout in readouts:
                await sender.send(readout.to_bytes())
        got = [AstroPix4Readout.from_bytes(plain.recv(65535)) for _ in readouts]
    finally:
        plain.close()
    assert got == readouts


def test_unicast_receiver_owns_its_port():
    port = next(_ports)
    spec = resolve_group("127.0.0.1", port)
    sock, _ = open_receiver_socket(spec)
    try:
        # no sharing: the kernel would split a unicast stream between sockets
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
        if hasattr(socket, "SO_REUSEPORT"):
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        assert sock.getsockname() == ("127.0.0.1", port)
        with pytest.raises(OSError) as info:
            open_receiver_socket(spec)
        assert type(info.value) is OSError
        assert info.value.errno == errno.EADDRINUSE
        message = str(info.value)
        for fragment in ("127.0.0.1", str(port), "unicast", "multicast group"):
            assert fragment in message, message
    finally:
        close_receiver_socket(sock, spec)
    # closed: the port is free again (close_receiver_socket left nothing)
    sock, _ = open_receiver_socket(spec)
    close_receiver_socket(sock, spec)


def test_second_receiver_on_the_unicast_port_fails_not_half_the_data():
    port = next(_ports)
    spec = resolve_group("127.0.0.1", port)
    first, _ = open_blocking_receiver_socket(spec, timeout=5)
    try:
        with pytest.raises(OSError, match="already holds port"):
            open_blocking_receiver_socket(spec)
        daq = _astropix_style_sender()
        try:
            for i in range(50):
                daq.sendto(AstroPix4Readout(b"\xbc", i).to_bytes(), ("127.0.0.1", port))
        finally:
            daq.close()
        ids = [AstroPix4Readout.from_bytes(first.recv(100)).readout_id for _ in range(50)]
    finally:
        close_receiver_socket(first, spec)
    assert ids == list(range(50))  # the one receiver got all of it


@pytest.mark.parametrize("group", ["239.255.43.7", "127.0.0.1"])
def test_port_held_without_so_reuseaddr_gives_a_clear_oserror(group):
    port = next(_ports)
    holder = _astropix_style_receiver(port)
    try:
        spec = resolve_group(group, port)
        with pytest.raises(OSError) as info:
            open_receiver_socket(spec)
    finally:
        holder.close()
    assert type(info.value) is OSError
    assert info.value.errno == errno.EADDRINUSE
    message = str(info.value)
    for fragment in (group, f"port {port}", "astropix-analysis receiver"):
        assert fragment in message, message
    if group.startswith("239."):
        assert "without SO_REUSEADDR" in message


def test_unicast_receiver_on_ipv6_loopback():
    port = next(_ports)
    spec = resolve_group("::1", port)
    sock, _ = open_blocking_receiver_socket(spec, timeout=5)
    tx = open_blocking_sender_socket(spec)
    try:
        tx.send(AstroPix4Readout(b"\xbc\xbc", 3).to_bytes())
        assert AstroPix4Readout.from_bytes(sock.recv(100)).readout_id == 3
    finally:
        close_sender_socket(tx)
        close_receiver_socket(sock, spec)


def test_other_unicast_needs_allow_unicast():
    """A non-loopback unicast address (here mc0's own link-local address, so
    nothing can leave the namespace) is refused by default and works with
    allow_unicast=True."""
    with open("/proc/net/if_inet6") as f:
        raws = [line.split()[0] for line in f if line.split()[-1] == "mc0"]
    assert raws, "netns-run creates mc0 with a link-local address"
    raw = raws[0]
    address = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(raw))
    port = next(_ports)
    with pytest.raises(ValueError, match="allow_unicast=True"):
        resolve_group(f"{address}%mc0", port)
    with pytest.raises(ValueError, match="needs its interface"):
        resolve_group(address, port, allow_unicast=True)
    spec = resolve_group(f"{address}%mc0", port, allow_unicast=True)
    assert spec.unicast and spec.scope_id == socket.if_nametoindex("mc0")
    sock, _ = open_blocking_receiver_socket(spec, timeout=5)
    tx = open_blocking_sender_socket(spec)
    try:
        tx.send(b"over mc0")
        assert sock.recv(100) == b"over mc0"
    finally:
        close_sender_socket(tx)
        close_receiver_socket(sock, spec)


async def test_control_groups_are_refused_before_anything_opens():
    for group in ("224.0.0.1", "224.0.0.251"):
        with pytest.raises(ValueError, match="allow_control_groups=True"):
            async with open_sender(group, next(_ports)):
                pytest.fail("open_sender accepted a link-local control group")
        with pytest.raises(ValueError, match="control group"):
            async with open_receiver(group, next(_ports)):
                pytest.fail("open_receiver accepted a link-local control group")


def test_control_group_allowed_explicitly():
    port = next(_ports)
    spec = resolve_group("224.0.0.1", port, allow_control_groups=True)
    assert not spec.unicast and spec.group == "224.0.0.1"
    # other ff02:: groups stay usable (the docs recommend ff02::/ff12:: for local work)
    assert resolve_group("ff02::1234", port, interface="mc0").scope_id == socket.if_nametoindex("mc0")


async def test_open_sender_unicast_loses_nothing_after_nobody_was_listening():
    # A connected unicast socket reports an ICMP "port unreachable" on the
    # *next* send, which then sends nothing: the endpoint sends again, so
    # every datagram sent once a receiver listens arrives.
    port = next(_ports)
    readouts = DaqSimulator(seed=9).readouts(40)
    async with open_sender("127.0.0.1", port, framing="raw") as sender:
        # Nobody listens: the kernel answers this one datagram with an ICMP
        # port unreachable, pending on the socket until the next send.
        await sender.send_readout(readouts[0])
        await sender.flush()
        await trio.sleep(0.05)
        plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        plain.bind(("127.0.0.1", port))
        plain.settimeout(5)
        try:
            for readout in readouts[10:20]:  # the direct path (send_one)
                await sender.send_readout(readout)
            await sender.send_many(readouts[20:])  # the batched path (send_batch)
            await sender.flush()
            got = [AstroPix4Readout.from_bytes(plain.recv(65535)) for _ in readouts[10:]]
        finally:
            plain.close()
    assert got == readouts[10:]


async def test_open_sender_and_receiver_take_the_group_options():
    port = next(_ports)
    for opener in (open_sender, open_receiver):
        with pytest.raises(ValueError, match="allow_control_groups=True"):
            async with opener("224.0.0.1", port):
                pytest.fail("a link-local control group was accepted without the option")
    async with open_receiver("224.0.0.250", port, allow_control_groups=True, framing="raw") as receiver:
        async with open_sender("224.0.0.250", port, allow_control_groups=True, framing="raw") as sender:
            await sender.send(b"x" * 32)
        with trio.fail_after(5):
            message = await receiver.receive()
    assert message.payload == b"x" * 32
