"""Loss accounting of issue 13, points 1, 3, 6, 8 and 18 (first half), each
with a test that failed before its fix:

* (1) kernel drops after the last queued datagram are counted: the endpoint
  reads the socket's drop counter (``SO_MEMINFO``) when the receive loop goes
  idle and whenever statistics are taken, so that ``datagrams +
  kernel_drops`` equals what reached the socket (the kernel's own
  ``/proc/net/udp`` drop column is the witness);
* (3) two DAQs on one group keep separate carry chains: a hit split across
  two readouts of one sender is never completed with bytes of another;
* (6) what evicted senders counted stays in the totals, and the number of
  evictions is reported;
* (8) a single exception comes out as itself when an outer scope is
  cancelled (``Cancelled`` leaves do not count as a second exception);
* (18) a sender that cannot bind ``local_address`` says so, naming it.

Everything that opens a real socket runs only inside a private network
namespace (``tools/netns-run``); elsewhere the module is skipped with that
reason.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
import time

import numpy as np
import pytest
import trio

from mcast_trio import (
    HIT_DTYPE,
    AstroPix4Readout,
    open_receiver,
    open_sender,
)
from mcast_trio import astropix
from mcast_trio._io import _sockets
from mcast_trio._protocol._pipeline import ReceivePipeline
from mcast_trio._protocol._tracking import SenderTable
from mcast_trio.sim import DaqSimulator
from mcast_trio.testing import isolation_problem

_PROBLEM = isolation_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")

_serial = itertools.count()
_BASE_PORT = 47000 + os.getpid() % 1000 * 3


@pytest.fixture
def ep() -> tuple[str, int]:
    """A fresh IPv4 group and port for one test."""
    n = next(_serial)
    return f"239.255.73.{n % 250 + 1}", _BASE_PORT + n


def plain_sender() -> socket.socket:
    """A blocking stdlib UDP socket sending loopback multicast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def proc_udp_drops(port: int) -> int:
    """The kernel's drop count of the UDP sockets bound to ``port``
    (``/proc/net/udp``, last column), summed."""
    total = 0
    found = False
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port:
                total += int(fields[-1])
                found = True
    assert found, f"no UDP socket bound to port {port} in /proc/net/udp"
    return total


async def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _datagrams(n: int, seed: int = 1) -> list[bytes]:
    return DaqSimulator(seed, start_ns=0, mean_hits=1.0).datagrams(n)


# -- (1) kernel drops at the end of a burst -------------------------------------


async def test_kernel_drops_at_the_end_of_a_burst_with_a_stalled_blocking_consumer(ep):
    group, port = ep
    sent = 20_000
    datagrams = _datagrams(sent)
    async with open_receiver(group, port, AstroPix4Readout, overflow="block", queue_size=1,
                             rcvbuf=65536) as receiver:
        sock = plain_sender()
        try:
            for d in datagrams:
                sock.sendto(d, (group, port))
        finally:
            sock.close()
        # The consumer stalls: the receive task blocks on the full channel.
        await trio.sleep(0.3)
        stalled = receiver.statistics()
        drops = proc_udp_drops(port)
        assert drops > 10_000  # the burst overflowed the socket
        # What the kernel dropped is counted while the task is blocked.
        assert stalled.kernel_drops == drops
        # The consumer comes back and takes everything that was queued.
        got = 0
        while True:
            with trio.move_on_after(0.5):
                await receiver.receive()
                got += 1
                continue
            break
        s = receiver.statistics()
        assert got == s.readouts == s.datagrams < sent
        assert s.kernel_drops == proc_udp_drops(port) == drops
        assert s.datagrams + s.kernel_drops == sent


async def test_kernel_drops_while_the_consumer_does_synchronous_work(ep):
    group, port = ep
    sent = 20_000
    datagrams = _datagrams(sent, seed=2)
    async with open_receiver(group, port, AstroPix4Readout, rcvbuf=65536) as receiver:
        sock = plain_sender()
        sock.sendto(datagrams[0], (group, port))
        await receiver.receive()

        def burst():
            for d in datagrams[1:]:
                sock.sendto(d, (group, port))

        thread = threading.Thread(target=burst)
        thread.start()
        time.sleep(1.5)  # synchronous work: the trio loop does not run
        thread.join()
        sock.close()
        # Drain what the socket queued; the receive task then goes idle.
        with trio.move_on_after(0.5):
            async for _ in receiver:
                pass
        s = receiver.statistics()
        assert s.kernel_drops == proc_udp_drops(port) > 10_000
        assert s.datagrams + s.kernel_drops == sent
        # Readout ids missing between two received ones are lost, and were
        # dropped by the kernel.
        assert s.lost <= s.kernel_drops


def test_drop_counter_unwraps_and_ignores_stale_readings():
    c = _sockets.DropCounter()
    assert c.update(None) == 0
    assert c.update(5) == 5
    assert c.update(3) == 5  # a datagram's older SO_RXQ_OVFL value: not a drop
    assert c.update(5) == 5  # the same counter read twice: no double count
    assert c.update(2**31) == 2**31
    assert c.update(2**32 - 2) == 2**32 - 2
    assert c.update(3) == 2**32 + 3  # the 32-bit counter wrapped
    assert c.update(2**32 - 1) == 2**32 + 3  # stale, from before the wrap


def test_astropix_receiver_counts_drops_at_the_end_of_a_burst_and_after_close(ep):
    group, port = ep
    sent = 5000
    datagrams = _datagrams(sent, seed=3)
    receiver = astropix.MulticastReceiver(AstroPix4Readout, group, port, rcvbuf=65536, timeout=0.3)
    try:
        sock = plain_sender()
        try:
            for d in datagrams:
                sock.sendto(d, (group, port))
        finally:
            sock.close()
        drops = proc_udp_drops(port)
        assert drops > 1000
        assert receiver.statistics().kernel_drops == drops
        got = 0
        with pytest.raises(TimeoutError):
            while True:
                receiver.receive()
                got += 1
        s = receiver.statistics()
        assert got == s.datagrams
        assert s.datagrams + s.kernel_drops == sent
    finally:
        receiver.close()
    assert receiver.statistics().kernel_drops == drops


# -- (6) losses of evicted senders stay in the totals ----------------------------


async def test_100_daq_restarts_losing_10_readouts_each_report_1000_lost(ep):
    group, port = ep
    restarts, lost_each = 100, 10
    sim = DaqSimulator(5, start_ns=0, mean_hits=1.0)
    batch = sim.generate(30)
    # Each DAQ run sends readouts 0..9 and 20..29: readouts 10..19 are lost.
    run = [d for i, d in enumerate(batch.datagrams()) if not 10 <= i < 20]
    socks = []
    async with open_receiver(group, port, AstroPix4Readout) as receiver:
        try:
            for _ in range(restarts):
                # A restarted DAQ: a new source port (the old sockets stay
                # open, so that no port is drawn twice).
                socks.append(plain_sender())
                for d in run:
                    socks[-1].sendto(d, (group, port))
                await trio.sleep(0)
        finally:
            for sock in socks:
                sock.close()
        await wait_until(lambda: receiver.statistics().datagrams == restarts * len(run), "every datagram")
        s = receiver.statistics()
    assert s.kernel_drops == 0
    assert s.lost == restarts * lost_each
    assert s.evicted == restarts - 64
    assert len(s.senders) == 64
    assert s.restarts == 0 and s.duplicates == 0


def test_totals_of_60000_senders_never_go_down():
    table = SenderTable(64)
    previous = 0
    for n in range(60_000):
        table.observe(("127.0.0.1", n), 7)
        table.observe(("127.0.0.1", n), 9)  # 8 is lost
        table.observe(("127.0.0.1", n), 9)  # a duplicate
        if n % 997 == 0:
            totals = table.totals()
            assert totals["lost"] == n + 1 >= previous
            previous = totals["lost"]
    totals = table.totals()
    assert totals == {"lost": 60_000, "duplicates": 60_000, "reordered": 0, "restarts": 0,
                      "evicted": 60_000 - 64}
    table.forget(("127.0.0.1", 59_999))
    assert table.totals()["lost"] == 60_000


def test_pipeline_statistics_keep_evicted_losses():
    sim = DaqSimulator(6, start_ns=0, mean_hits=1.0)
    datagrams = sim.generate(3).datagrams()
    pipeline = ReceivePipeline(readout_class=AstroPix4Readout, max_senders=2)
    from mcast_trio._io._batchio import ReceiveBatch

    batch = ReceiveBatch(4, 2048)
    for n in range(10):
        batch.store(0, datagrams[0], ("127.0.0.1", 1000 + n))
        batch.store(1, datagrams[2], ("127.0.0.1", 1000 + n))  # readout 1 lost
        batch.count = 2
        pipeline.run(batch, 2, 0.0)
    s = pipeline.statistics()
    assert (s.lost, s.evicted, len(s.senders)) == (10, 8, 2)
    assert len(pipeline._carry) == 2  # the carry chains are bounded alike


# -- (8) a single error inside a cancelled outer scope --------------------------


async def test_open_receiver_oserror_in_finally_under_move_on_after_comes_out_as_itself(ep):
    group, port = ep
    with pytest.raises(OSError) as info:
        with trio.move_on_after(0.05):
            async with open_receiver(group, port):
                try:
                    await trio.sleep_forever()
                finally:
                    raise OSError(errno.EIO, "flush failed")
    assert type(info.value) is OSError and info.value.errno == errno.EIO


async def test_open_sender_oserror_in_finally_under_move_on_after_comes_out_as_itself(ep):
    group, port = ep
    with pytest.raises(OSError) as info:
        with trio.move_on_after(0.05):
            async with open_sender(group, port):
                try:
                    await trio.sleep_forever()
                finally:
                    raise OSError(errno.EIO, "flush failed")
    assert type(info.value) is OSError and info.value.errno == errno.EIO


async def test_two_errors_under_a_cancelled_scope_stay_grouped(ep):
    group, port = ep

    async def fail():
        try:
            await trio.sleep_forever()
        finally:
            raise KeyError("task")

    with pytest.raises(BaseExceptionGroup) as info:
        with trio.move_on_after(0.05):
            async with trio.open_nursery() as outer:
                outer.start_soon(fail)
                async with open_receiver(group, port):
                    try:
                        await trio.sleep_forever()
                    finally:
                        raise OSError(errno.EIO, "flush failed")
    assert info.value.subgroup(OSError) is not None and info.value.subgroup(KeyError) is not None


# -- (18) the sender's bind error names local_address ---------------------------

_PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


async def test_bind_error_names_local_address(ep):
    group, port = ep
    try:
        with open(_PORT_RANGE) as f:
            saved = f.read()
        with open(_PORT_RANGE, "w") as f:
            f.write(saved)
    except OSError as exc:
        pytest.skip(f"cannot set {_PORT_RANGE} in this namespace ({exc}); the test needs it to make "
                    "binding local_address fail")
    free = port + 500
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        holder.bind(("127.0.0.1", free))
        # Inside the private namespace only: one ephemeral port, taken.
        with open(_PORT_RANGE, "w") as f:
            f.write(f"{free} {free}")
        with pytest.raises(OSError) as info:
            async with open_sender(group, port, local_address="127.0.0.1"):
                pass
    finally:
        with open(_PORT_RANGE, "w") as f:
            f.write(saved)
        holder.close()
    assert info.value.errno == errno.EADDRINUSE
    message = str(info.value)
    assert "local_address='127.0.0.1'" in message
    assert "allowed:" in message and "ip_local_port_range" in message


# -- (3) one carry chain per sender ---------------------------------------------


def _split_sim(seed: int, chip_id: int, start_id: int) -> DaqSimulator:
    return DaqSimulator(seed, start_ns=0, chip_id=chip_id, mean_hits=3.0, split_fraction=0.6,
                        start_id=start_id)


def _assert_hits_equal(hits: np.ndarray, truth: np.ndarray, who: str) -> None:
    assert len(hits) == len(truth), f"{who}: {len(hits)} hits decoded, {len(truth)} real"
    for name in HIT_DTYPE.names:
        np.testing.assert_array_equal(hits[name], truth[name], err_msg=f"{who}: {name}")


@pytest.mark.parametrize("start_b", [0, 900_000], ids=["ids-in-lockstep", "ids-unrelated"])
async def test_two_daqs_on_one_group_keep_their_own_carry(ep, start_b):
    group, port = ep
    n = 600
    a = _split_sim(21, 1, 0).generate(n)
    b = _split_sim(22, 2, start_b).generate(n)
    assert a.n_split > 100 and b.n_split > 100
    hits = []
    async with open_receiver(group, port, AstroPix4Readout) as receiver:
        sock_a, sock_b = plain_sender(), plain_sender()
        try:
            for da, db in zip(a.datagrams(), b.datagrams()):
                sock_a.sendto(da, (group, port))
                sock_b.sendto(db, (group, port))
        finally:
            sock_a.close()
            sock_b.close()
        while sum(len(h) for h in hits) < len(a.truth) + len(b.truth) \
                or receiver.statistics().readouts < 2 * n:
            with trio.move_on_after(2) as scope:
                hits.append(np.asarray((await receiver.receive_batch()).hits))
            if scope.cancelled_caught:
                break
        s = receiver.statistics()
    assert s.kernel_drops == 0 and s.datagrams == 2 * n and s.lost == 0
    hits = np.concatenate(hits)
    assert set(np.unique(hits["chip_id"]).tolist()) <= {1, 2}
    _assert_hits_equal(hits[hits["chip_id"] == 1], a.truth, "sender A")
    _assert_hits_equal(hits[hits["chip_id"] == 2], b.truth, "sender B")
    assert s.hits == len(hits)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("filtered", [False, True], ids=["counted", "filtered"])
def test_pipeline_carry_per_sender_across_batches_with_malformed_datagrams(host, filtered):
    from mcast_trio._io._batchio import ReceiveBatch

    n = 300
    a = _split_sim(31, 3, 0).generate(n)
    b = _split_sim(32, 4, 0).generate(n)
    def src(port):
        return (host, port) if ":" not in host else (host, port, 0, 0)
    src_a, src_b, src_bad = src(4001), src(4002), src(4003)
    arrivals = []
    for k, (da, db) in enumerate(zip(a.datagrams(), b.datagrams())):
        arrivals += [(da, src_a), (db, src_b)]
        if k % 50 == 7:
            arrivals.append((b"\x00" * 30, src_bad))  # garbage from a third source
    bad = []
    pipeline = ReceivePipeline(readout_class=AstroPix4Readout,
                               filter=(lambda payload, source: source != src_bad) if filtered else None,
                               on_malformed=lambda payload, source: bad.append((payload, source)))
    batch = ReceiveBatch(7, 2048)
    hits = []
    for start in range(0, len(arrivals), 7):
        part = arrivals[start:start + 7]
        for i, (data, source) in enumerate(part):
            batch.store(i, data, source)
        batch.count = len(part)
        chunk = pipeline.run(batch, len(part), 0.0)
        if chunk is not None:
            assert len(chunk.batch.readouts) == len(chunk) == sum(source != src_bad
                                                                  for _d, source in part)
            assert chunk.batch.hits.readout_id.tolist() == np.repeat(
                chunk.batch.readouts.readout_id, chunk.batch.readouts.n_hits).tolist()
            hits.append(np.asarray(chunk.batch.hits))
            # Which sender each delivered readout came from, in order of first appearance.
            good = [(data, source) for data, source in part if source != src_bad]
            assert chunk.sources == tuple(dict.fromkeys(source for _d, source in good))
            assert [chunk.sources[k] for k in chunk.source_index] == [source for _d, source in good]
            for source, rows in chunk.by_source():
                assert [chunk.batch.readouts.readout_id[k] for k in rows] == [
                    int.from_bytes(d[3:7], "little") for d, s_ in good if s_ == source]
                ends = np.cumsum(chunk.lengths)
                assert [bytes(chunk.data[ends[k] - chunk.lengths[k]:ends[k]]) for k in rows] == [
                    d for d, s_ in good if s_ == source]
    hits = np.concatenate(hits)
    _assert_hits_equal(hits[hits["chip_id"] == 3], a.truth, "sender A")
    _assert_hits_equal(hits[hits["chip_id"] == 4], b.truth, "sender B")
    s = pipeline.statistics()
    if filtered:
        assert s.filtered == 6 and s.malformed == len(bad) == 0
    else:
        assert s.malformed == len(bad) == 6 and {source for _p, source in bad} == {src_bad}
    assert s.lost == 0 and s.readouts == 2 * n
    assert {k: (v.received, v.hits) for k, v in s.senders.items()} == {
        src_a: (n, len(a.truth)), src_b: (n, len(b.truth))}


def test_pipeline_losses_of_interleaved_senders_are_theirs():
    from mcast_trio._io._batchio import ReceiveBatch

    a = DaqSimulator(51, start_ns=0).generate(100).datagrams()
    b = DaqSimulator(52, start_ns=0, start_id=5000).generate(100).datagrams()
    arrivals = []
    for k in range(100):
        if not 10 <= k < 15:
            arrivals.append((a[k], ("127.0.0.1", 1)))
        if k != 60:
            arrivals.append((b[k], ("127.0.0.1", 2)))
    pipeline = ReceivePipeline(readout_class=AstroPix4Readout)
    batch = ReceiveBatch(64, 2048)
    for start in range(0, len(arrivals), 64):
        part = arrivals[start:start + 64]
        for i, (data, source) in enumerate(part):
            batch.store(i, data, source)
        batch.count = len(part)
        pipeline.run(batch, len(part), 0.0)
    s = pipeline.statistics()
    assert {k: (v.received, v.lost) for k, v in s.senders.items()} == {
        ("127.0.0.1", 1): (95, 5), ("127.0.0.1", 2): (99, 1)}
    assert s.lost == 6


async def test_two_native_senders_keep_their_own_carry(ep):
    group, port = ep
    n = 300
    a = _split_sim(41, 5, 0).generate(n)
    b = _split_sim(42, 6, 0).generate(n)
    hits = []
    async with open_receiver(group, port, AstroPix4Readout, framing="native") as receiver:
        async with open_sender(group, port, framing="native") as sa, \
                open_sender(group, port, framing="native") as sb:
            for da, db in zip(a.datagrams(), b.datagrams()):
                await sa.send(da)
                await sb.send(db)
        while receiver.statistics().readouts < 2 * n or sum(map(len, hits)) < len(a.truth) + len(b.truth):
            with trio.move_on_after(2) as scope:
                hits.append(np.asarray((await receiver.receive_batch()).hits))
            if scope.cancelled_caught:
                break
        s = receiver.statistics()
    assert s.kernel_drops == 0 and s.lost == 0
    hits = np.concatenate(hits)
    _assert_hits_equal(hits[hits["chip_id"] == 5], a.truth, "sender A")
    _assert_hits_equal(hits[hits["chip_id"] == 6], b.truth, "sender B")


# -- a late readout of an evicted sender (issue 13, attack 2) -----------------------


async def test_receiver_a_late_readout_of_an_evicted_sender_is_not_counted_lost(ep):
    """The same through a receiver (max_senders=1): DAQ A's readout 97 is
    delayed past 98 and 99, DAQ B sends one readout in between (evicting A),
    then A's 97 and 100..102 arrive. Every readout was received; the
    receiver reported lost 3 and a restart."""
    group, port = ep
    a = DaqSimulator(7, start_ns=0, chip_id=1).generate(103).datagrams()
    b = DaqSimulator(8, start_ns=0, chip_id=2).generate(1).datagrams()
    order = [k for k in range(100) if k != 97]
    async with open_receiver(group, port, AstroPix4Readout, max_senders=1) as receiver:
        sa, sb = plain_sender(), plain_sender()
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
    assert s.reordered == 1 and s.evicted == 2, s
