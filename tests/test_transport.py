"""End-to-end tests of the transport: ``open_sender`` / ``open_receiver`` /
``serve_receiver`` over real multicast sockets.

Everything here sends real datagrams, so it runs only inside a private network
namespace (``/work/shared/tools/netns-run`` sets ``NETNS_RUN_INSIDE=1``;
another harness may set ``MCAST_TRIO_TEST_NETNS=1``) without a default route;
elsewhere the whole module is skipped with that reason. The skip depends only
on *where* we run, never on whether multicast happens to work.

Every test uses its own group and port. Waiting is always "until a condition
holds, with a deadline" (``trio.fail_after``), never a bare sleep.

Run::

    PYTHONPATH=/work/main /work/shared/tools/netns-run \\
        python -m pytest tests/test_transport.py -q
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import struct
from contextlib import aclosing
from functools import partial

import numpy as np
import pytest
import trio
import trio.testing

from mcast_trio.testing import isolation_problem, veth_problem
from mcast_trio import (
    HIT_DTYPE,
    AstroPix4Readout,
    Message,
    NativeEncoder,
    open_receiver,
    open_sender,
    serve_receiver,
)
from mcast_trio.sim import DaqSimulator


# ---------------------------------------------------------------------------
# Where are we? (mcast_trio.testing.isolation_problem)
# ---------------------------------------------------------------------------


_PROBLEM = isolation_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")

_VETH = None if _PROBLEM else veth_problem()
veth = pytest.mark.skipif(_VETH is not None, reason=_VETH or "")


# ---------------------------------------------------------------------------
# Groups, ports and helpers
# ---------------------------------------------------------------------------

_serial = itertools.count()
_BASE_PORT = 50000 + os.getpid() % 1000 * 5


def _fresh() -> tuple[int, int]:
    n = next(_serial)
    return n, _BASE_PORT + n


@pytest.fixture
def ep() -> tuple[str, int]:
    """A fresh IPv4 group and port for one test."""
    n, port = _fresh()
    return f"239.255.{81 + n // 250}.{n % 250 + 1}", port


@pytest.fixture
def ep6() -> tuple[str, int]:
    """A fresh IPv6 link-local scoped group (without interface) and port."""
    n, port = _fresh()
    return f"ff12::81:{n + 1:x}", port


def _igmp_groups() -> set[str]:
    """IPv4 groups joined in this namespace, dotted."""
    out = set()
    with open("/proc/net/igmp") as f:
        for line in f:
            fields = line.split()
            if line.startswith(("\t", " ")) and fields and len(fields[0]) == 8:
                out.add(socket.inet_ntoa(struct.pack("=I", int(fields[0], 16))))
    return out


def _link_local(ifname: str) -> str:
    with open("/proc/net/if_inet6") as f:
        for line in f:
            fields = line.split()
            if fields[5] == ifname and fields[0].startswith("fe80"):
                return socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0]))
    raise AssertionError(f"{ifname} has no link-local IPv6 address")


async def wait_until(predicate, what: str, timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout``."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.002)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def receive_n(rx, n: int, timeout: float = 5.0) -> list:
    """Exactly ``n`` items from ``rx.receive()``, within ``timeout``."""
    out: list = []
    with trio.move_on_after(timeout):
        while len(out) < n:
            out.append(await rx.receive())
        return out
    raise AssertionError(f"timed out: received {len(out)} of {n} items; "
                         f"statistics: {rx.statistics()}")


def plain_sender() -> socket.socket:
    """A stdlib UDP socket set up the astropix-analysis way for loopback multicast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def sim_readouts(n: int, seed: int = 1, start_id: int = 0, **kwargs) -> list[AstroPix4Readout]:
    return DaqSimulator(seed, start_ns=0, start_id=start_id, **kwargs).readouts(n)


def ids_of(items) -> list[int]:
    return [r.readout_id for r in items]


def assert_hits_equal(hits: np.ndarray, truth: np.ndarray) -> None:
    assert len(hits) == len(truth)
    for name in HIT_DTYPE.names:
        assert np.array_equal(hits[name], truth[name]), f"hit field {name!r} differs"


def only_sender(stats):
    assert len(stats.senders) == 1, stats.senders
    (key, sender), = stats.senders.items()
    return key, sender


# ---------------------------------------------------------------------------
# 1. IPv4 round trip
# ---------------------------------------------------------------------------


async def test_ipv4_round_trip_readouts_batches_and_truth(ep):
    group, port = ep
    sim = DaqSimulator(7, keep_truth=True, start_ns=0, mean_hits=3.0, split_fraction=0.3,
                       padding_fraction=0.2, readout_size=64)
    readouts = sim.readouts(600)
    truth = sim.truth
    assert len(truth) > 1000
    wire = [r.to_bytes() for r in readouts]
    async with open_receiver(group, port, AstroPix4Readout) as rx_items, \
            open_receiver(group, port, AstroPix4Readout) as rx_batches:
        async with open_sender(group, port) as tx:
            assert tx.framing == "auto"
            for r in readouts[:300]:
                await tx.send_readout(r)
            await tx.send_many(readouts[300:])
        tx_stats = tx.statistics()

        got = []
        with trio.fail_after(5):
            async for r in rx_items:
                assert isinstance(r, AstroPix4Readout)
                got.append(r)
                if len(got) == len(readouts):
                    break

        batches = []
        with trio.fail_after(5):
            async with aclosing(rx_batches.batches()) as it:
                async for b in it:
                    batches.append(b)
                    if sum(map(len, batches)) >= len(readouts):
                        break
        stats = rx_items.statistics()
        stats_b = rx_batches.statistics()

    # every readout, in order, byte for byte
    assert got == readouts
    assert [r.to_bytes() for r in got] == wire
    # the hits, carrying extra bytes from readout to readout, are the truth
    hits, extra = [], None
    for r in got:
        hits.append(r.decode(extra))
        extra = r.extra_bytes()
    assert_hits_equal(np.concatenate(hits), truth)
    # the batches decode to the same truth
    assert sum(map(len, batches)) == len(readouts)
    assert np.concatenate([b.readouts.readout_id for b in batches]).tolist() == list(range(600))
    assert all(not b.errors for b in batches)
    assert_hits_equal(np.concatenate([b.hits for b in batches]), truth)

    total = sum(map(len, wire))
    for s in (stats, stats_b):
        assert (s.datagrams, s.bytes, s.readouts, s.hits) == (600, total, 600, len(truth))
        assert (s.malformed, s.truncated, s.filtered, s.dropped, s.dropped_chunks) == (0, 0, 0, 0, 0)
        assert (s.lost, s.duplicates, s.reordered, s.restarts) == (0, 0, 0, 0)
        assert s.kernel_drops == 0 and s.last_error is None and s.reassembly is None
        key, sender = only_sender(s)
        assert key[0] == "127.0.0.1" and isinstance(key[1], int)
        assert (sender.received, sender.lost, sender.highest) == (600, 0, 599)
    assert (tx_stats.messages, tx_stats.datagrams, tx_stats.bytes) == (600, 600, total)
    assert (tx_stats.errors, tx_stats.unsent, tx_stats.queued) == (0, 0, 0)
    assert tx_stats.last_error is None


async def test_auto_framing_sends_serialized_readout_bytes_raw_and_others_native(ep):
    group, port = ep
    readouts = sim_readouts(5)
    async with open_receiver(group, port, framing="raw") as raw_rx:
        async with open_sender(group, port) as tx:
            await tx.send(readouts[0].to_bytes())      # bytes of a readout: raw
            tx.send_nowait(readouts[1].to_bytes())     # likewise
            await tx.send_many([readouts[2], readouts[3].to_bytes()])
            await tx.send(b"not a readout")            # native frame
            await tx.send(readouts[4].to_bytes(), topic="x")  # a topic: native
        got = await receive_n(raw_rx, 6)
    assert [m.payload for m in got[:4]] == [r.to_bytes() for r in readouts[:4]]
    assert got[4].payload.startswith(b"MCTR") and got[4].payload.endswith(b"not a readout")
    assert got[5].payload.startswith(b"MCTR") and got[5].payload.endswith(readouts[4].to_bytes())


# ---------------------------------------------------------------------------
# 2. IPv6 over the veth pair
# ---------------------------------------------------------------------------


@veth
async def test_ipv6_over_mc0_loop_and_across_the_veth(ep6):
    group, port = ep6
    readouts = sim_readouts(300, seed=2)
    big = (bytes(range(256)) * 23)[:5700]  # 5 fragments of <= 1452 bytes (4 of 1472)
    mc0 = _link_local("mc0")
    async with open_receiver(f"{group}%mc0", port, AstroPix4Readout) as near, \
            open_receiver(group, port, AstroPix4Readout, interface="mc1") as far, \
            open_receiver(group, port, interface="mc1", framing="native") as framed:
        assert near.group.interface_name == "mc0" and far.group.interface_name == "mc1"
        async with open_sender(group, port, interface="mc0") as tx:
            await tx.send_many(readouts[:150])
            for r in readouts[150:]:
                await tx.send_readout(r)
            await tx.send(big, topic="v6")
        got_near = await receive_n(near, 300)
        got_far = await receive_n(far, 300)
        # the far receiver also got the framed message (not a readout: malformed there)
        await wait_until(lambda: far.statistics().malformed == 5, "5 malformed fragments")
        message = await receive_n(framed, 1)
        stats = [near.statistics(), far.statistics(), framed.statistics()]
    assert got_near == readouts and got_far == readouts
    for s in stats[:2]:
        key, sender = only_sender(s)
        assert key[0] == mc0 and len(key) == 4
        assert (sender.received, sender.lost, s.lost, s.duplicates) == (300, 0, 0, 0)
    assert message[0].payload == big and message[0].topic == b"v6"
    assert message[0].address[0] == mc0
    s = stats[2]
    assert s.messages == 1 and s.reassembly.completed == 1
    # 300 raw readouts reached the framed receiver too: malformed frames there
    assert s.malformed == 300
    assert tx.statistics().datagrams == 305  # 1452-byte datagrams over IPv6
    readout_bytes = sum(len(r.to_bytes()) for r in readouts)
    assert s.bytes - readout_bytes == tx.statistics().bytes - readout_bytes == 5700 + 5 * 32


# ---------------------------------------------------------------------------
# 3. Several receivers
# ---------------------------------------------------------------------------


async def test_several_receivers_on_one_group_all_get_everything(ep):
    group, port = ep
    readouts = sim_readouts(400, seed=3)
    async with open_receiver(group, port, AstroPix4Readout) as a, \
            open_receiver(group, port, AstroPix4Readout, batch_size=7) as b, \
            open_receiver(group, port, AstroPix4Readout, overflow="drop_newest") as c, \
            open_receiver(group, port, framing="raw") as d:
        async with open_sender(group, port) as tx:
            for k in range(0, 400, 50):
                await tx.send_many(readouts[k:k + 50])
        results = [await receive_n(rx, 400) for rx in (a, b, c, d)]
        stats = [rx.statistics() for rx in (a, b, c, d)]
    for got in results[:3]:
        assert got == readouts
    assert [m.payload for m in results[3]] == [r.to_bytes() for r in readouts]
    for s in stats:
        assert s.datagrams == 400 and s.dropped == 0 and s.kernel_drops == 0
    for s in stats[:3]:
        assert s.readouts == 400 and s.lost == 0


# ---------------------------------------------------------------------------
# 4. Joining and leaving while a sender runs
# ---------------------------------------------------------------------------


async def test_receivers_join_and_leave_while_a_sender_runs(ep):
    group, port = ep
    total = 400
    readouts = sim_readouts(total, seed=4, mean_hits=1.0)
    done = trio.Event()
    sender_stats = []

    async def run_sender(task_status=trio.TASK_STATUS_IGNORED):
        async with open_sender(group, port) as tx:
            task_status.started(tx)
            for r in readouts:
                await tx.send_readout(r)
                await trio.sleep(0.0005)  # pacing: a DAQ sends at its own rate
        sender_stats.append(tx.statistics())
        done.set()

    everything = []

    async def consume_everything(rx):
        # paced readouts arrive one per receive batch: keep the queue short
        everything.extend(await receive_n(rx, total, timeout=10))

    async with open_receiver(group, port, AstroPix4Readout) as whole:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume_everything, whole)
            tx = await nursery.start(run_sender)
            await wait_until(lambda: tx.statistics().datagrams >= 30, "the sender to get going")
            async with open_receiver(group, port, AstroPix4Readout) as late:
                second = await receive_n(late, 40)
                late_stats = late.statistics()
            assert group in _igmp_groups()  # `whole` is still a member
            async with open_receiver(group, port, AstroPix4Readout) as third_rx:
                third = await receive_n(third_rx, 40)
                third_stats = third_rx.statistics()
            assert not done.is_set(), "the sender finished too early for this test"
            await done.wait()
        whole_stats = whole.statistics()
    assert group not in _igmp_groups()

    assert everything == readouts
    assert whole_stats.lost == 0 and whole_stats.readouts == total
    first = second[0].readout_id
    assert first > 0
    assert ids_of(second) == list(range(first, first + 40))
    assert late_stats.lost == 0 and late_stats.restarts == 0
    assert only_sender(late_stats)[1].received >= 40
    start = third[0].readout_id
    assert start > second[-1].readout_id
    assert ids_of(third) == list(range(start, start + 40))
    assert third_stats.lost == 0
    (stats,) = sender_stats
    assert (stats.datagrams, stats.errors, stats.unsent, stats.queued) == (total, 0, 0, 0)


# ---------------------------------------------------------------------------
# 5. Large messages: native fragmentation and MCL chunking
# ---------------------------------------------------------------------------


async def test_native_framing_fragments_and_reassembles_large_messages(ep):
    group, port = ep
    rng = np.random.default_rng(5)
    payloads = [rng.integers(0, 256, size, dtype=np.uint8).tobytes()
                for size in (200_000, 1, 0, 199_999, 65_536, 200_000)]
    async with open_receiver(group, port, framing="native") as rx:
        async with open_sender(group, port, framing="native", topic="big",
                               sender_id=0x1234) as tx:
            for p in payloads[:3]:
                await tx.send(p)
            await tx.send_many(payloads[3:], topic="other")
        got = await receive_n(rx, len(payloads))
        stats = rx.statistics()
    assert [m.payload for m in got] == payloads
    assert [m.topic for m in got] == [b"big"] * 3 + [b"other"] * 3
    assert [m.sequence for m in got] == list(range(6))
    assert {m.sender_id for m in got} == {0x1234}
    # 1472-byte datagrams over IPv4: 30-byte header, the topic, the rest payload
    fragments = sum(max(1, -(-len(p) // (1472 - 30 - (3 if i < 3 else 5))))
                    for i, p in enumerate(payloads))
    assert tx.statistics().datagrams == stats.datagrams == fragments
    # reassembly counts the messages of more than one fragment
    assert stats.reassembly.completed == 4 and stats.messages == 6
    assert stats.reassembly.pending == 0 and stats.reassembly.expired == 0
    assert stats.malformed == 0 and stats.lost == 0
    (key, sender), = stats.senders.items()
    assert key[0] == "127.0.0.1" and key[2] == 0x1234 and sender.received == 6


async def test_mcl_framing_chunks_and_reassembles_large_messages(ep):
    pytest.importorskip("msgpack", reason="MCL framing needs the optional msgpack package")
    group, port = ep
    rng = np.random.default_rng(6)
    payloads = [rng.integers(0, 256, size, dtype=np.uint8).tobytes()
                for size in (150_000, 10, 60_001, 120_000)]
    async with open_receiver(group, port, framing="mcl") as rx:
        async with open_sender(group, port, framing="mcl", topic="astro") as tx:
            for p in payloads:
                await tx.send(p)
        got = await receive_n(rx, len(payloads))
        stats = rx.statistics()
    assert [m.payload for m in got] == payloads
    assert [m.topic for m in got] == [b"astro"] * 4
    tx_stats = tx.statistics()
    assert tx_stats.datagrams == stats.datagrams == 3 + 1 + 2 + 3
    assert tx_stats.bytes > 330_000 and tx_stats.errors == 0
    assert stats.reassembly.completed == 3 and stats.malformed == 0 and stats.messages == 4


# ---------------------------------------------------------------------------
# 6. Topics and filters
# ---------------------------------------------------------------------------


async def test_topics_callable_and_regex_filters_count_what_they_reject(ep):
    group, port = ep
    sent = [("abc"[i % 3], (b"drop-%d" if i % 4 == 0 else b"keep-%d") % i) for i in range(30)]
    seen_addresses = []

    def keep_even(payload, address):
        seen_addresses.append(address)
        return int(payload.split(b"-")[1]) % 2 == 0

    async with open_receiver(group, port, topics=["a", "c"]) as by_topic, \
            open_receiver(group, port, filter=keep_even) as by_callable, \
            open_receiver(group, port, filter=r"^keep-\d+$") as by_regex, \
            open_receiver(group, port, topics="b", filter=re.compile(rb"1")) as both:
        async with open_sender(group, port, framing="native") as tx:
            for topic, payload in sent:
                await tx.send(payload, topic=topic)
        expect_topic = [(t, p) for t, p in sent if t in ("a", "c")]
        expect_callable = [(t, p) for t, p in sent if int(p.split(b"-")[1]) % 2 == 0]
        expect_regex = [(t, p) for t, p in sent if p.startswith(b"keep-")]
        expect_both = [(t, p) for t, p in sent if t == "b" and b"1" in p]
        results = []
        for rx, expected in ((by_topic, expect_topic), (by_callable, expect_callable),
                             (by_regex, expect_regex), (both, expect_both)):
            await wait_until(lambda: rx.statistics().datagrams == len(sent), "all datagrams")
            got = await receive_n(rx, len(expected))
            results.append(([(m.topic.decode(), m.payload) for m in got], expected,
                            rx.statistics()))
    for got, expected, stats in results:
        assert got == expected
        assert stats.filtered == len(sent) - len(expected)
        assert stats.messages == len(expected)
        # rejected messages were received: they are not losses
        assert (stats.lost, stats.duplicates, stats.restarts) == (0, 0, 0)
        assert only_sender(stats)[1].received == len(sent)
    assert all(a[0] == "127.0.0.1" for a in seen_addresses) and len(seen_addresses) == 30


async def test_filters_in_readout_mode_see_bytes_and_the_source(ep):
    group, port = ep
    readouts = sim_readouts(60, seed=8)
    calls = []

    def not_multiple_of_3(payload, address):
        calls.append((type(payload), address))
        assert payload.startswith(b"\xfe\xdc\xba")  # the payload is bytes
        return int.from_bytes(payload[3:7], "little") % 3 != 0

    async with open_receiver(group, port, AstroPix4Readout, filter=not_multiple_of_3) as rx, \
            open_receiver(group, port, AstroPix4Readout,
                          filter=re.compile(b"\\A\xfe\xdc\xba[\x00-\x09]\x00\x00\x00",
                                            re.DOTALL)) as rx_re:
        async with open_sender(group, port) as tx:
            await tx.send_many(readouts)
        keep = [r for r in readouts if r.readout_id % 3]
        got = await receive_n(rx, len(keep))
        got_re = await receive_n(rx_re, 10)
        await wait_until(lambda: rx_re.statistics().datagrams == 60, "all datagrams")
        stats, stats_re = rx.statistics(), rx_re.statistics()
    assert got == keep and got_re == readouts[:10]
    assert stats.filtered == 20 and stats.readouts == 40
    assert stats_re.filtered == 50 and stats_re.readouts == 10
    assert {c[0] for c in calls} == {bytes}
    assert {c[1][0] for c in calls} == {"127.0.0.1"}
    # rejected readouts were received: they are not losses
    assert stats.lost == 0 and stats_re.lost == 0
    assert only_sender(stats)[1].received == 60 and only_sender(stats_re)[1].received == 60


# ---------------------------------------------------------------------------
# 7. Interoperability with plain socket code
# ---------------------------------------------------------------------------


async def test_plain_stdlib_receiver_gets_exactly_to_bytes(ep):
    """astropix-analysis' receiver: bind ('', port), IP_ADD_MEMBERSHIP."""
    group, port = ep
    readouts = sim_readouts(20, seed=9)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.bind(("", port))
        mreq = socket.inet_aton(group) + socket.inet_aton("127.0.0.1")
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        tsock = trio.socket.from_stdlib_socket(sock)
        async with open_sender(group, port) as tx:
            for r in readouts:
                await tx.send_readout(r)
        got = []
        with trio.fail_after(5):
            for _ in readouts:
                got.append(await tsock.recv(65536))
    finally:
        sock.close()
    assert got == [r.to_bytes() for r in readouts]
    assert [AstroPix4Readout.from_bytes(d) for d in got] == readouts


async def test_plain_stdlib_sender_to_readout_and_raw_receivers(ep):
    """astropix-analysis' sender (and Lowe's ``multicast``): sendto the group."""
    group, port = ep
    readouts = sim_readouts(25, seed=10)
    lowe = [b"hello", b"\x00" * 3, "naïve unicode".encode(), b"x" * 9000]
    sock = plain_sender()
    try:
        async with open_receiver(group, port, readout_class=AstroPix4Readout) as rx, \
                open_receiver(group, port, framing="raw") as raw:
            for r in readouts:
                sock.sendto(r.to_bytes(), (group, port))
            for data in lowe:
                sock.sendto(data, (group, port))
            got = await receive_n(rx, 25)
            messages = await receive_n(raw, 25 + len(lowe))
            await wait_until(lambda: rx.statistics().datagrams == 29, "all datagrams")
            stats = rx.statistics()
    finally:
        address = sock.getsockname()
        sock.close()
    assert got == readouts
    assert stats.malformed == 4 and stats.readouts == 25
    assert all(isinstance(m, Message) for m in messages)
    assert [m.payload for m in messages] == [r.to_bytes() for r in readouts] + lowe
    assert {m.address for m in messages} == {address}
    assert {m.topic for m in messages} == {None}


# ---------------------------------------------------------------------------
# 8. Overflow policies with a slow consumer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
async def test_drop_policies_keep_draining_and_count_every_drop(ep, policy):
    group, port = ep
    n = 600
    readouts = sim_readouts(n + 1, seed=11, mean_hits=1.0)
    async with open_receiver(group, port, AstroPix4Readout, queue_size=1, overflow=policy,
                             batch_size=16) as rx:
        async with open_sender(group, port) as tx:
            for k in range(0, n, 100):
                await tx.send_many(readouts[k:k + 100])
        # The consumer sleeps; the receive task still drains the socket.
        await wait_until(lambda: rx.statistics().datagrams == n, f"{n} datagrams drained")
        stats = rx.statistics()
        delivered = n - stats.dropped
        assert 1 <= delivered <= 16
        got = await receive_n(rx, delivered)
        # Nothing else was queued: the next item is a readout sent now.
        async with open_sender(group, port) as tx2:
            await tx2.send_readout(readouts[n])
        (after,) = await receive_n(rx, 1)
    assert after == readouts[n]
    assert stats.kernel_drops == 0 and stats.readouts == n
    assert stats.dropped_chunks >= 1
    assert delivered + stats.dropped == n
    if policy == "drop_newest":
        assert got == readouts[:delivered]
    else:
        assert got == readouts[n - delivered:n]
    # the receiver still accounts for the sender's stream: nothing was lost
    assert stats.lost == 0


async def test_drop_policy_with_serve_receiver_and_a_channel_of_one(ep):
    group, port = ep
    readouts = sim_readouts(50, seed=12)
    send, receive = trio.open_memory_channel(1)
    async with trio.open_nursery() as nursery:
        service = await nursery.start(partial(serve_receiver, group, port, send, AstroPix4Readout,
                                              overflow="drop_newest", batch_size=1))
        async with open_sender(group, port) as tx:
            await tx.send_many(readouts)
        await wait_until(lambda: service.statistics().datagrams == 50, "50 datagrams")
        stats = service.statistics()
        receive.receive_nowait()  # the one chunk kept
        with pytest.raises(trio.WouldBlock):
            receive.receive_nowait()
        nursery.cancel_scope.cancel()
    # one chunk of one readout was kept, 49 chunks of one readout dropped
    assert (stats.dropped, stats.dropped_chunks) == (49, 49)
    # serve_receiver closed the channel when cancelled
    with pytest.raises(trio.EndOfChannel):
        receive.receive_nowait()


async def test_block_policy_drops_nothing_itself_losses_show_as_kernel_drops(ep):
    group, port = ep
    n = 300
    readouts = sim_readouts(n + 1, seed=13, mean_hits=1.0)
    got = []
    async with open_receiver(group, port, AstroPix4Readout, queue_size=1, overflow="block",
                             batch_size=4, rcvbuf=8192) as rx:
        async with open_sender(group, port) as tx:
            await tx.send_many(readouts[:n])
            await wait_until(lambda: tx.statistics().datagrams == n, "the sender")
            assert tx.statistics().errors == 0

            async def consume():
                async for r in rx:
                    got.append(r)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                # Every task blocked: the consumer waits for the channel and
                # the receive task for a readable socket (it drained it).
                await trio.testing.wait_all_tasks_blocked()
                before = len(got)
                # The socket has room now: this one carries the drop count.
                await tx.send_readout(readouts[n])
                await wait_until(lambda: got and got[-1] == readouts[n], "the last readout")
                nursery.cancel_scope.cancel()
        stats = rx.statistics()
    assert stats.dropped == 0 and stats.dropped_chunks == 0
    ids = ids_of(got[:before])
    assert ids == sorted(set(ids)) and len(got) == before + 1
    assert stats.kernel_drops is not None and stats.kernel_drops > 0, (
        "the socket never overflowed: the test did not exercise the block policy")
    assert before + stats.kernel_drops == n
    assert stats.lost == stats.kernel_drops
    assert stats.datagrams == before + 1


# ---------------------------------------------------------------------------
# 9. Malformed and oversized datagrams
# ---------------------------------------------------------------------------


async def test_malformed_truncated_and_oversized_datagrams_are_counted(ep):
    group, port = ep
    readouts = sim_readouts(8, seed=14)
    huge = AstroPix4Readout(b"\xbc" * 3981, 1000, 5).to_bytes()
    assert len(huge) == 4000
    short = sim_readouts(1, seed=15, start_id=500)[0].to_bytes()
    cut = readouts[0].to_bytes() + b"\xbc\xbc"
    sequence = [
        readouts[0].to_bytes(),
        b"garbage, not a readout",        # bad header
        readouts[1].to_bytes(),
        b"\xfe\xdc\xba\x01",              # too short
        readouts[2].to_bytes(),
        huge,                             # larger than max_datagram_size
        readouts[3].to_bytes(),
        readouts[4].to_bytes(),
        short[:-4],                       # a readout cut short
        readouts[5].to_bytes(),
        huge,
        readouts[6].to_bytes(),
        cut,                              # length field disagrees (too long)
        readouts[7].to_bytes(),
    ]
    sock = plain_sender()
    try:
        async with open_receiver(group, port, AstroPix4Readout, max_datagram_size=1024,
                                 batch_size=3) as rx:
            for data in sequence:
                sock.sendto(data, (group, port))
            got = await receive_n(rx, 8)
            await wait_until(lambda: rx.statistics().datagrams == len(sequence), "all datagrams")
            stats = rx.statistics()
    finally:
        sock.close()
    assert got == readouts
    assert (stats.malformed, stats.truncated, stats.readouts) == (4, 2, 8)
    assert stats.lost == 0 and stats.duplicates == 0 and stats.restarts == 0
    assert "length field at offset 15" in stats.last_error
    assert stats.bytes == sum(min(len(d), 1024) for d in sequence)


async def test_last_error_names_an_oversized_datagram(ep):
    group, port = ep
    readouts = sim_readouts(2, seed=24)
    sock = plain_sender()
    try:
        async with open_receiver(group, port, AstroPix4Readout, max_datagram_size=1024) as rx:
            sock.sendto(readouts[0].to_bytes(), (group, port))
            sock.sendto(b"\xfe\xdc\xba" + b"x" * 3997, (group, port))
            sock.sendto(readouts[1].to_bytes(), (group, port))
            assert await receive_n(rx, 2) == readouts
            stats = rx.statistics()
    finally:
        sock.close()
    assert (stats.truncated, stats.malformed, stats.bytes) == (1, 0, 1024 + sum(
        len(r.to_bytes()) for r in readouts))
    assert "max_datagram_size=1024" in stats.last_error and "truncated" in stats.last_error


async def test_last_error_names_a_bad_header(ep):
    group, port = ep
    readouts = sim_readouts(2, seed=16)
    sock = plain_sender()
    try:
        async with open_receiver(group, port, AstroPix4Readout) as rx:
            sock.sendto(readouts[0].to_bytes(), (group, port))
            sock.sendto(b"\x01\x02\x03 this is not a readout header", (group, port))
            sock.sendto(readouts[1].to_bytes(), (group, port))
            assert await receive_n(rx, 2) == readouts
            stats = rx.statistics()
    finally:
        sock.close()
    assert stats.malformed == 1
    assert "bad readout header 01 02 03" in stats.last_error


# ---------------------------------------------------------------------------
# 10. Loss accounting, raw readouts
# ---------------------------------------------------------------------------


async def test_raw_loss_duplicates_reordering_and_restarts_are_exact(ep):
    group, port = ep
    pool = {r.readout_id: r.to_bytes() for r in sim_readouts(100, seed=17)}
    order = [i for i in range(100) if i not in (10, 20, 21, 41)]
    order.insert(order.index(42) + 1, 41)        # 41 arrives after 42
    order.insert(order.index(30), 30)            # 30 twice
    order.insert(order.index(60), 60)            # 60 three times
    order.insert(order.index(60), 60)
    restart = list(range(4990, 5001)) + list(range(10))
    restart_pool = {r.readout_id: r.to_bytes()
                    for r in sim_readouts(11, seed=18, start_id=4990) + sim_readouts(10, seed=19)}
    first, second = plain_sender(), plain_sender()
    try:
        async with open_receiver(group, port, AstroPix4Readout) as rx:
            for i in order:
                first.sendto(pool[i], (group, port))
            for i in restart:
                second.sendto(restart_pool[i], (group, port))
            got = await receive_n(rx, len(order) + len(restart))
            stats = rx.statistics()
        key1 = ("127.0.0.1", first.getsockname()[1])
        key2 = ("127.0.0.1", second.getsockname()[1])
    finally:
        first.close()
        second.close()
    assert ids_of(got) == order + restart     # everything is delivered, as it came
    s1, s2 = stats.senders[key1], stats.senders[key2]
    assert (s1.received, s1.lost, s1.duplicates, s1.reordered, s1.restarts) == (97, 3, 3, 1, 0)
    assert s1.highest == 99
    assert (s2.received, s2.lost, s2.duplicates, s2.reordered, s2.restarts) == (21, 0, 0, 0, 1)
    assert s2.highest == 9
    assert (stats.lost, stats.duplicates, stats.reordered, stats.restarts) == (3, 3, 1, 1)


# ---------------------------------------------------------------------------
# 11. Loss accounting, native framing
# ---------------------------------------------------------------------------


async def test_native_sequence_gaps_are_counted_per_sender_id(ep):
    group, port = ep
    one = NativeEncoder(sender_id=0xA1, topic="t")
    two = NativeEncoder(sender_id=0xB2, topic="t", first_sequence=2**32 - 3)
    messages_one = [one.encode(b"one-%d" % i) for i in range(50)]
    big = one.encode(b"z" * 3000)                 # sequence 50: 3 fragments
    messages_one.append(big)
    messages_one.append(one.encode(b"one-51"))
    assert len(big) == 3
    messages_two = [two.encode(b"two-%d" % i) for i in range(8)]  # wraps 2**32 -> 0
    sent_one = [m for i, m in enumerate(messages_one) if i not in (5, 6, 30)]
    datagrams = [d for m in sent_one for d in m]
    datagrams.remove(big[1])                     # message 50 never completes
    sock = plain_sender()
    try:
        async with open_receiver(group, port, reassembly_timeout=60.0) as rx:
            for d in datagrams[:20]:
                sock.sendto(d, (group, port))
            for m in messages_two:
                sock.sendto(m[0], (group, port))
            for d in datagrams[20:]:
                sock.sendto(d, (group, port))
            got = await receive_n(rx, 48 + 8)
            stats = rx.statistics()
        host, sport = "127.0.0.1", sock.getsockname()[1]
    finally:
        sock.close()
    assert len(stats.senders) == 2
    s1 = stats.senders[(host, sport, 0xA1)]
    s2 = stats.senders[(host, sport, 0xB2)]
    assert (s1.received, s1.lost, s1.duplicates, s1.reordered) == (48, 4, 0, 0)
    assert s1.highest == 51
    assert (s2.received, s2.lost, s2.restarts) == (8, 0, 0) and s2.highest == 4
    assert stats.lost == 4
    from_one = [m for m in got if m.sender_id == 0xA1]
    assert [m.sequence for m in from_one] == [i for i in range(52) if i not in (5, 6, 30, 50)]
    assert [m.payload for m in got if m.sender_id == 0xB2] == [b"two-%d" % i for i in range(8)]
    # message 50 waits for its missing fragment; no multi-fragment message completed
    assert (stats.reassembly.pending, stats.reassembly.completed) == (1, 0)


# ---------------------------------------------------------------------------
# 12. The sender
# ---------------------------------------------------------------------------


async def test_send_nowait_raises_would_block_when_the_queue_is_full(ep):
    group, port = ep
    readouts = sim_readouts(3, seed=20)
    async with open_receiver(group, port, AstroPix4Readout) as rx:
        async with open_sender(group, port, queue_size=1) as tx:
            # No checkpoint: the sender task cannot run in between.
            tx.send_nowait(readouts[0].to_bytes())   # handed to the waiting task
            tx.send_nowait(readouts[1].to_bytes())   # fills the queue of one
            with pytest.raises(trio.WouldBlock):
                tx.send_nowait(readouts[2].to_bytes())
            assert tx.statistics().messages == 2
            assert tx.statistics().queued == 2
        stats = tx.statistics()
        assert await receive_n(rx, 2) == readouts[:2]
        async with open_sender(group, port) as tx3:
            await tx3.send_readout(readouts[2])
        assert await receive_n(rx, 1) == readouts[2:]
    assert (stats.messages, stats.datagrams, stats.queued, stats.unsent) == (2, 2, 0, 0)
    with pytest.raises(trio.ClosedResourceError):
        tx.send_nowait(b"closed")


async def test_order_is_preserved_for_ten_thousand_datagrams(ep):
    group, port = ep
    n = 10_000
    wire = DaqSimulator(21, start_ns=0, mean_hits=0.5).datagrams(n)
    async with open_receiver(group, port, AstroPix4Readout, rcvbuf=4 << 20, batch_size=256) as rx:
        async with trio.open_nursery() as nursery:
            async def send_all():
                async with open_sender(group, port, queue_size=16) as tx:
                    k = 0
                    for size in itertools.cycle((1, 700, 3, 1500, 1, 2)):
                        if k >= n:
                            break
                        part = wire[k:k + size]
                        if size == 1:
                            await tx.send(part[0])
                        else:
                            await tx.send_many(part)
                        k += len(part)
                nursery_results.append(tx.statistics())

            nursery_results = []
            nursery.start_soon(send_all)
            got = await receive_n(rx, n, timeout=20)
        stats = rx.statistics()
    ids = ids_of(got)
    assert ids == list(range(n))
    assert [r.to_bytes() for r in got[::997]] == wire[::997]
    (tx_stats,) = nursery_results
    assert (tx_stats.messages, tx_stats.datagrams, tx_stats.errors, tx_stats.unsent) == (n, n, 0, 0)
    assert tx_stats.syscalls < n  # batched
    assert stats.lost == 0 and stats.kernel_drops == 0


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(framing="x"), ["framing='x'", "'raw'"]),
        (dict(queue_size=0), ["queue_size=0"]),
        (dict(queue_size=True), ["queue_size=True"]),
        (dict(port=0), ["port=0", "1..65535"]),
        (dict(port=70000), ["port=70000", "1..65535"]),
        (dict(group="0.0.0.0"), ["group='0.0.0.0'", "not a multicast address"]),
        (dict(group="not-an-address"), ["group='not-an-address'"]),
        (dict(ttl=300), ["ttl=300", "0..255"]),
        (dict(ttl=-1), ["ttl=-1"]),
        (dict(framing="raw", max_datagram=70000), ["max_datagram=70000"]),
        (dict(interface="nosuch0"), ["interface='nosuch0'"]),
    ],
)
async def test_sender_argument_validation_names_the_argument(ep, kwargs, fragments):
    group, port = ep
    args = dict(group=group, port=port) | kwargs
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError) as info:
        async with open_sender(**args):
            pytest.fail("open_sender accepted a bad argument")
    for fragment in fragments:
        assert fragment in str(info.value)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(framing="x"), ["framing='x'"]),
        (dict(overflow="never"), ["overflow='never'", "'drop_oldest'"]),
        (dict(queue_size=0), ["queue_size=0"]),
        (dict(batch_size=0), ["batch_size=0"]),
        (dict(max_datagram_size=10), ["max_datagram_size=10"]),
        (dict(port=0), ["port=0"]),
        (dict(group="0.0.0.0"), ["group='0.0.0.0'"]),
        (dict(framing="raw", topics=["a"]), ["topics="]),
        (dict(filter="(unclosed"), ["filter='(unclosed'"]),
    ],
)
async def test_receiver_argument_validation_names_the_argument(ep, kwargs, fragments):
    group, port = ep
    args = dict(group=group, port=port) | kwargs
    with pytest.raises(ValueError) as info:
        async with open_receiver(**args):
            pytest.fail("open_receiver accepted a bad argument")
    for fragment in fragments:
        assert fragment in str(info.value)
    assert group not in _igmp_groups()


async def test_block_policy_survives_a_consumer_that_closes_its_channel(ep):
    group, port = ep
    readouts = sim_readouts(5, seed=22)
    send, receive = trio.open_memory_channel(1)
    async with trio.open_nursery() as nursery:
        service = await nursery.start(partial(serve_receiver, group, port, send, AstroPix4Readout,
                                              overflow="block", batch_size=1))
        async with open_sender(group, port) as tx:
            await tx.send_many(readouts[:3])
            # one chunk in the channel, the receive task blocked on the next
            await trio.testing.wait_all_tasks_blocked()
            assert service.statistics().datagrams == 2
            receive.close()  # the consumer goes away
            await tx.send_many(readouts[3:])
            await wait_until(lambda: service.statistics().datagrams == 5, "5 datagrams")
        stats = service.statistics()
        assert group in _igmp_groups()  # still running
        nursery.cancel_scope.cancel()
    # the chunk the receive task was blocked on and every later one were
    # thrown away and counted (the one already in the channel was delivered)
    assert (stats.dropped, stats.dropped_chunks) == (4, 4)
    assert group not in _igmp_groups()


async def test_native_framed_readouts_decode_like_raw_ones(ep):
    group, port = ep
    sim = DaqSimulator(23, keep_truth=True, start_ns=0, split_fraction=0.5, mean_hits=4.0)
    readouts = sim.readouts(200)
    async with open_receiver(group, port, AstroPix4Readout, framing="native") as rx, \
            open_receiver(group, port, AstroPix4Readout, framing="native") as rx_b:
        async with open_sender(group, port, framing="native", topic="apx", sender_id=7) as tx:
            await tx.send_many(readouts[:100])
            for r in readouts[100:]:
                await tx.send_readout(r)
        got = await receive_n(rx, 200)
        batches = []
        with trio.fail_after(5):
            while sum(map(len, batches)) < 200:
                batches.append(await rx_b.receive_batch())
        stats = rx.statistics()
    assert got == readouts
    assert_hits_equal(np.concatenate([b.hits for b in batches]), sim.truth)
    assert (stats.messages, stats.readouts, stats.hits, stats.lost) == (200, 200, len(sim.truth), 0)
    assert list(stats.senders)[0][2] == 7


async def test_flush_waits_until_everything_queued_so_far_was_sent(ep):
    group, port = ep
    readouts = sim_readouts(200, seed=25)
    async with open_receiver(group, port, AstroPix4Readout) as rx:
        async with open_sender(group, port, queue_size=500) as tx:
            await tx.flush()  # nothing queued: returns at once
            for r in readouts:
                tx.send_nowait(r.to_bytes())
            assert tx.statistics().queued == 200
            with trio.fail_after(5):
                await tx.flush()
            stats = tx.statistics()
            assert (stats.datagrams, stats.queued) == (200, 0)
            assert await receive_n(rx, 200) == readouts


async def test_flush_returns_while_another_task_keeps_sending(ep):
    group, port = ep
    readouts = sim_readouts(1, seed=26)
    async with open_sender(group, port, queue_size=4) as tx:
        async with trio.open_nursery() as nursery:
            async def stream():
                while True:  # a DAQ that never pauses
                    await tx.send_many([readouts[0]] * 50)

            nursery.start_soon(stream)
            await wait_until(lambda: tx.statistics().datagrams > 500, "the stream")
            tx.send_nowait(readouts[0].to_bytes())
            target = tx.statistics()
            with trio.fail_after(5):
                await tx.flush()
            after = tx.statistics()
            # everything queued before flush() was called has left
            assert after.datagrams >= target.datagrams + target.queued
            nursery.cancel_scope.cancel()


async def test_flush_in_another_task_wakes_when_the_sender_is_cancelled(ep):
    group, port = ep
    wire = DaqSimulator(27, start_ns=0).datagrams(3000)
    # trio runs the flusher and the sender task in random order: repeat
    for attempt in range(8):
        outcome = []
        async with trio.open_nursery() as outer:
            with trio.CancelScope() as scope:
                async with open_sender(group, port, queue_size=3000) as tx:
                    for data in wire:
                        tx.send_nowait(data)

                    async def flusher():
                        with trio.move_on_after(2) as timeout:
                            await tx.flush()
                        outcome.append("timed out" if timeout.cancelled_caught else "returned")

                    outer.start_soon(flusher)
                    scope.cancel()
        assert outcome == ["returned"], f"attempt {attempt}: flush() hung after the cancellation"
        stats = tx.statistics()
        assert stats.unsent > 0 and stats.queued == 0 and stats.datagrams + stats.unsent == 3000


async def test_receive_after_leaving_the_receiver_raises_closed(ep):
    group, port = ep
    readouts = sim_readouts(2, seed=28)
    async with open_receiver(group, port, AstroPix4Readout) as rx:
        async with open_sender(group, port) as tx:
            await tx.send_many(readouts)
        assert await receive_n(rx, 1) == readouts[:1]
    assert group not in _igmp_groups()
    # the readout still pending in the receiver is returned, then it is closed
    assert await rx.receive() == readouts[1]
    with pytest.raises(trio.ClosedResourceError):
        await rx.receive()
    assert [r async for r in rx] == []
