"""Attacks on the second-round fixes of issue 13 (per-sender compiled carry,
ghost senders, discard at close, shared ledger, reassembly fairness, CLI
stdio), each a test of behaviour that should hold.

Tests that open sockets run only inside ``tools/netns-run``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_ENV = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_child(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("offset", [2**63 - 32, 2**63 - 16, 2**63 - 1])
def test_decode_readouts_huge_offset_is_a_value_error_not_a_segfault(offset):
    """offsets + lengths overflows int64 (numpy and the compiled check both
    add them in int64): the datagram is accepted as inside a 64-byte buffer
    and the compiled decoder reads ~2**63 bytes past it (SIGSEGV). The
    documented answer to a datagram outside the buffer is ValueError."""
    proc = _run_child(f"""
        import mcast_trio
        try:
            mcast_trio.decode_readouts(bytes(64), lengths=[32], offsets=[{offset}])
        except ValueError as exc:
            print("ValueError", exc)
        else:
            print("accepted")
    """)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])
    assert proc.stdout.startswith("ValueError"), proc.stdout


# -- sockets (inside tools/netns-run only) ---------------------------------------

import functools
import socket

import trio

from mcast_trio import AstroPix4Readout, serve_receiver
from mcast_trio.sim import DaqSimulator
from mcast_trio.testing import isolation_problem

_PROBLEM = isolation_problem()
needs_netns = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")


def _plain_sender() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@needs_netns
@pytest.mark.parametrize("marker", [None, "end of run"])
async def test_drop_oldest_taking_a_user_item_out_of_the_channel_neither_crashes_nor_miscounts(marker):
    """serve_receiver into a send_channel that user code also sends into
    (the _Ledger's docstring allows it: "items that other code sends into
    the channel are not counted"). With overflow="drop_oldest" the receive
    task takes the user's item out as its oldest and counts it with
    len(item): a None marker kills the receive task (TypeError: object of
    type 'NoneType' has no len()), a string marker adds its length to
    ``dropped`` as if that many readouts had been thrown away. The task
    must survive, and ``dropped`` counts only what it received."""
    group, port = "239.255.91.1", 40601 + (marker is None)
    send, recv = trio.open_memory_channel(1)
    drop = recv.clone()
    async with trio.open_nursery() as nursery:
        service = await nursery.start(functools.partial(
            serve_receiver, group, port, send, AstroPix4Readout, drop_channel=drop, overflow="drop_oldest"))
        send.send_nowait(marker)  # fills the channel
        sock = _plain_sender()
        try:
            for d in DaqSimulator(3).generate(5).datagrams():
                sock.sendto(d, (group, port))
        finally:
            sock.close()
        await trio.sleep(0.5)
        s = service.statistics()
        nursery.cancel_scope.cancel()
    assert s.readouts == 5, s
    assert s.dropped <= 4, s  # at most 4 of its own 5 (one single-readout item stays queued)


def test_sender_table_a_late_readout_after_eviction_is_not_a_restart_with_phantom_losses():
    """SenderTable (public): sender K's readout 97 is late (it arrives
    after 98, 99); meanwhile K was evicted by another sender. When K comes
    back with 97, 100, 101, 102, its ghost (highest 99) resumes the stream
    and 97 is taken as a restart: restarts 1 and lost 3, while nothing was
    lost (the same arrivals with K never evicted: lost 0, reordered 1,
    restarts 0). The ghost table must not turn a late arrival into phantom
    losses."""
    from mcast_trio import SenderTable

    table = SenderTable(1)
    for seq in range(100):
        if seq != 97:
            table.observe("K", seq)
    table.observe("X", 0)  # evicts K
    for seq in (97, 100, 101, 102):
        table.observe("K", seq)
    totals = table.totals()
    assert totals["lost"] == 0 and totals["restarts"] == 0, totals


@needs_netns
async def test_receiver_a_late_readout_of_an_evicted_sender_is_not_counted_lost():
    """The same through a receiver (max_senders=1): DAQ A's readout 97 is
    delayed past 98 and 99, DAQ B sends one readout in between (evicting A),
    then A's 97 and 100..102 arrive. Every readout was received; the
    receiver reports lost 3 and a restart."""
    from mcast_trio import open_receiver

    group, port = "239.255.91.5", 40613
    a = DaqSimulator(7, start_ns=0, chip_id=1).generate(103).datagrams()
    b = DaqSimulator(8, start_ns=0, chip_id=2).generate(1).datagrams()
    order = [k for k in range(100) if k != 97]
    async with open_receiver(group, port, AstroPix4Readout, max_senders=1) as receiver:
        sa, sb = _plain_sender(), _plain_sender()
        try:
            for k in order:
                sa.sendto(a[k], (group, port))
            await trio.sleep(0.05)
            sb.sendto(b[0], (group, port))
            await trio.sleep(0.05)
            for k in (97, 100, 101, 102):
                sa.sendto(a[k], (group, port))
            await trio.sleep(0.2)
        finally:
            sa.close()
            sb.close()
        s = receiver.statistics()
    assert s.readouts == 104 and s.kernel_drops == 0, s
    assert s.lost == 0 and s.restarts == 0, s
