"""Faults of the framing core found by attacking it (issue 7, parts 2 and 5).

* MCL payloads are objects, not only strings: what MCL's ``RawBroadcaster``
  and ``MessageBroadcaster`` publish (any msgpack object, dicts included),
  fragmented and not, with topics, both directions.
* Native reassembly is keyed by source address and sender id, and a sender
  that restarts with a fixed sender id is reassembled again.
* An MCL "array bomb" is refused without building it, and the limits never
  refuse what MCL produces.
* Reassembly memory is bounded including its per-fragment overhead.
"""

from __future__ import annotations

import re
import socket
import struct
import tracemalloc

import msgpack
import pytest
import trio
import trio.testing

from mcast_trio import open_receiver, open_sender
from mcast_trio._io import _groups
from mcast_trio._errors import MalformedFrame
from mcast_trio._protocol._mcl import MclDecoder, MclEncoder
from mcast_trio._protocol._message import Message
from mcast_trio._protocol._native import NATIVE_MAGIC, NativeDecoder, NativeEncoder, parse_header
from mcast_trio._protocol._reassembly import Reassembler, ReassemblyStats
from mcast_trio.testing import MemoryNetwork, isolation_problem, use_network

ADDR = ("127.0.0.1", 5000)
OTHER = ("127.0.0.1", 5001)
GROUP = "239.255.42.7"
PORT = 42007

# MCL's constants (acfr/mcl, mcl/network/udp.py): fragmentation threshold and
# chunk size, and the size its listener passes to recvfrom().
MCL_MTU = 60000
MCL_MTU_MAX = 65000


def mcl_publish(data, topic=None, mtu=MCL_MTU):
    """The datagrams MCL's ``RawBroadcaster.publish(data)`` sends (the msgpack
    version of acfr/mcl's ``mcl/network/udp.py``), reproduced with the msgpack
    package: MCL ran on Python 2, whose msgpack wrote ``str`` (written here as
    ``bytes``) with the raw family, i.e. ``use_bin_type=False``.

    ``[topic, data]`` when it packs to at most ``mtu`` bytes; else ``data`` is
    packed on its own and the packed bytes are sent in ``len // mtu + 1``
    chunks ``[topic, i, n, chunk]`` with 1-based ``i``.
    """
    single = msgpack.packb((topic, data), use_bin_type=False)
    if len(single) <= mtu:
        return [single]
    packed = msgpack.packb(data, use_bin_type=False)
    count = len(packed) // mtu + 1
    return [
        msgpack.packb((topic, i + 1, count, packed[i * mtu:(i + 1) * mtu]), use_bin_type=False)
        for i in range(count)
    ]


# What MCL publishes: Python 2 ``str`` values are bytes here; a
# MessageBroadcaster publishes dict messages (an MCL Message is a dict).
IMU = {b"name": b"ImuMessage", b"timestamp": 1438211281.25, b"x": [0.5, -0.25, 9.8125],
       b"valid": True, b"note": None, b"7": [b"k", {b"deep": [1, 2, {b"deeper": -3}]}]}
MCL_OBJECTS = [
    ("str", b"payload", 1),
    ("empty str", b"", 1),
    ("int", 5, 1),
    ("negative int", -70000, 1),
    ("uint64", 2**64 - 1, 1),
    ("float", 1.5, 1),
    ("nil", None, 1),
    ("bool", False, 1),
    ("list", [1, b"two", 3.0, None, [b"nested"]], 1),
    ("dict message", IMU, 1),
    ("large dict message", {b"name": b"ImageMessage", b"rows": list(range(20000)),
                            b"data": bytes(range(256)) * 200}, 2),
    ("large list of str", [b"x" * 100] * 1000, 2),
    ("large str", b"z" * 150_000, 3),
]
MCL_IDS = [case[0] for case in MCL_OBJECTS]


@pytest.mark.parametrize("topic", [None, b"imu"], ids=["nil topic", "topic"])
@pytest.mark.parametrize(("obj", "count"), [case[1:] for case in MCL_OBJECTS], ids=MCL_IDS)
def test_mcl_decoder_delivers_the_object_mcl_published(obj, count, topic):
    datagrams = mcl_publish(obj, topic)
    assert len(datagrams) == count
    assert all(len(d) <= MCL_MTU_MAX for d in datagrams)
    dec = MclDecoder()
    results = [dec.feed(d, ADDR, 0.0) for d in datagrams]
    assert results[:-1] == [None] * (count - 1)
    assert results[-1] == Message(topic, obj, ADDR)
    assert type(results[-1].payload) is type(obj)
    assert dec.stats == ReassemblyStats(completed=1 if count > 1 else 0)


def test_mcl_topic_filter_applies_to_object_payloads():
    dec = MclDecoder(topics=["imu"])
    assert [dec.feed(d, ADDR, 0.0) for d in mcl_publish(IMU, b"gps")] == [None]
    big = {b"rows": list(range(30000))}
    assert [dec.feed(d, ADDR, 0.0) for d in mcl_publish(big, b"gps")] == [None, None]
    assert dec.filtered == 3
    assert dec.feed(mcl_publish(IMU, b"imu")[0], ADDR, 0.0).payload == IMU


@pytest.mark.parametrize("topic", [None, "imu"], ids=["nil topic", "topic"])
@pytest.mark.parametrize(("obj", "count"), [case[1:] for case in MCL_OBJECTS], ids=MCL_IDS)
def test_mcl_encoder_writes_what_mcl_publishes(obj, count, topic):
    expected = mcl_publish(obj, None if topic is None else topic.encode())
    assert MclEncoder(topic).encode(obj) == expected
    assert MclEncoder().encode(obj, topic=topic) == expected
    assert len(expected) == count


def test_mcl_encoder_takes_bytes_like_as_a_byte_string():
    expected = mcl_publish(b"abc")
    assert MclEncoder().encode(bytearray(b"abc")) == expected
    assert MclEncoder().encode(memoryview(b"abc")) == expected
    # A Python 3 str goes as MCL's Python 2 str did: a raw string (UTF-8).
    assert MclEncoder().encode("abc") == expected


def test_mcl_tuples_come_back_as_lists():
    [datagram] = MclEncoder().encode((1, (2, b"3")))
    assert MclDecoder().feed(datagram, ADDR, 0.0).payload == [1, [2, b"3"]]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({1, 2}, "payload={1, 2} is not msgpack-serialisable"),
        ({b"k": object}, "payload={b'k': <class 'object'>} is not msgpack-serialisable"),
        (-(2**64), "payload=-18446744073709551616 is not msgpack-serialisable"),
    ],
)
def test_mcl_encoder_refuses_what_msgpack_cannot_pack(payload, message):
    with pytest.raises(TypeError, match="^" + re.escape(message)):
        MclEncoder().encode(payload)


@pytest.mark.parametrize("use_bin_type", [False, True])
@pytest.mark.parametrize("chunks", [2, 130, 300])
def test_largest_chunk_size_gives_datagrams_mcl_reads_whole(chunks, use_bin_type):
    # 300 chunks: index and count need 3-byte msgpack integers.
    enc = MclEncoder(chunk_size=64989, use_bin_type=use_bin_type)
    payload = bytes(64989 * chunks - 100)
    datagrams = enc.encode(payload)
    assert len(datagrams) == chunks
    assert max(map(len, datagrams)) <= MCL_MTU_MAX
    assert max(map(len, datagrams)) >= MCL_MTU_MAX - 4  # the bound is tight
    dec = MclDecoder(max_bytes=64 << 20)
    assert [dec.feed(d, ADDR, 0.0) for d in datagrams][-1] == Message(None, payload, ADDR)
    with pytest.raises(ValueError, match=r"^chunk_size=64990 is out of range; allowed: 64\.\.64989$"):
        MclEncoder(chunk_size=64990)


def test_topic_too_long_for_the_chunk_size_is_refused():
    enc = MclEncoder("t" * 20, chunk_size=64989)
    with pytest.raises(ValueError, match=r"^topic='t{20}': a chunk datagram would be 65016 bytes"):
        enc.encode(bytes(70_000))
    # ... while a chunk size that leaves room for it works.
    assert max(map(len, MclEncoder("t" * 20, chunk_size=64960).encode(bytes(70_000)))) <= MCL_MTU_MAX


_PROBLEM = isolation_problem()


@pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")
def test_mcl_listener_recvfrom_reads_the_largest_datagrams_whole():
    # What MCL's listener does: recvfrom(65000) on a UDP socket; over
    # loopback, inside the private network namespace.
    # 260 chunks: index and count are 3-byte msgpack integers, and the
    # datagrams of full chunks are exactly 65000 bytes.
    payload = bytes(range(256)) * (64989 * 260 // 256)
    datagrams = MclEncoder(chunk_size=64989).encode(payload)
    assert max(map(len, datagrams)) == MCL_MTU_MAX
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    received = []
    try:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5.0)
        for d in datagrams:
            tx.sendto(d, rx.getsockname())
            received.append(rx.recvfrom(MCL_MTU_MAX)[0])
    finally:
        rx.close()
        tx.close()
    assert received == datagrams
    dec = MclDecoder(max_bytes=64 << 20)
    assert [dec.feed(d, ADDR, 0.0) for d in received][-1].payload == payload


async def test_mcl_objects_through_sender_and_receiver():
    net = MemoryNetwork(seed=3)
    sent = [IMU, 5, [1, 2, 3], b"bytes", {b"rows": list(range(30000))}, None]
    with use_network(net):
        async with open_receiver(GROUP, PORT, framing="mcl", topics=["imu"]) as rx:
            async with open_sender(GROUP, PORT, framing="mcl", topic="imu") as tx:
                for obj in sent:
                    await tx.send(obj)
                await tx.send(IMU, topic="other")  # filtered out
            got = []
            with trio.fail_after(5):
                while len(got) < len(sent):
                    got.append(await rx.receive())
            stats = rx.statistics()
    assert [m.payload for m in got] == sent
    assert {m.topic for m in got} == {b"imu"}
    assert stats.malformed == 0


async def test_mcl_send_many_carries_numbers_as_numbers():
    # int has a to_bytes() method: it must still go as the msgpack number,
    # not as the bytes of int.to_bytes().
    net = MemoryNetwork(seed=4)
    sent = [5, 300, True, {"a": 1}, [2, 3]]
    with use_network(net):
        async with open_receiver(GROUP, PORT, framing="mcl") as rx:
            async with open_sender(GROUP, PORT, framing="mcl") as tx:
                await tx.send_many(sent)
            got = []
            with trio.fail_after(5):
                while len(got) < len(sent):
                    got.append((await rx.receive()).payload)
    # (a str goes as Python 2's str, as MCL sends it, and comes back as bytes)
    assert got == [5, 300, True, {b"a": 1}, [2, 3]]


async def test_mcl_object_payloads_to_a_readout_receiver_are_counted_not_fatal():
    # A readout receiver in MCL framing expects serialized readouts (bytes):
    # an object payload is a malformed datagram, counted, and the stream goes on.
    from mcast_trio import AstroPix4Readout
    from mcast_trio.sim import DaqSimulator

    readout = DaqSimulator(seed=1).readouts(1)[0]
    net = MemoryNetwork(seed=8)
    with use_network(net):
        async with open_receiver(GROUP, PORT, AstroPix4Readout, framing="mcl") as rx:
            async with open_sender(GROUP, PORT, framing="mcl") as tx:
                await tx.send(IMU)
                await tx.send(readout.to_bytes())
            with trio.fail_after(5):
                got = await rx.receive()
            stats = rx.statistics()
    assert got.to_bytes() == readout.to_bytes()
    assert stats.malformed == 1
    assert stats.last_error == "MCL payload is dict, expected a serialized readout (bytes)"


# ============================================================== native: address and restarts


def fragmented(encoder, payloads):
    return [encoder.encode(p) for p in payloads]


def payloads(seed, n=6, size=1500):
    return [bytes((i * 31 + seed * 7 + k) % 251 for i in range(size)) for k in range(n)]


@pytest.mark.parametrize("same_bytes", [False, True], ids=["different data", "identical data"])
def test_two_senders_with_one_sender_id_are_kept_apart(same_bytes):
    pa = payloads(1)
    pb = pa if same_bytes else payloads(2)
    a = fragmented(NativeEncoder(sender_id=42, max_datagram=512), pa)
    b = fragmented(NativeEncoder(sender_id=42, max_datagram=512), pb)
    dec = NativeDecoder()
    got = []
    for ma, mb in zip(a, b):
        for da, db in zip(ma, mb):  # interleaved: the same key in flight twice
            got.append(dec.feed(da, ADDR, 0.0))
            got.append(dec.feed(db, OTHER, 0.0))
    delivered = [(m.address, m.payload) for m in got if m is not None]
    assert sorted(delivered) == sorted([(ADDR, p) for p in pa] + [(OTHER, p) for p in pb])
    assert dec.stats == ReassemblyStats(completed=12)


def test_restarted_sender_with_fixed_sender_id_is_reassembled_again():
    run1, run2 = payloads(1), payloads(2)
    dec = NativeDecoder()
    first = fragmented(NativeEncoder(sender_id=42, max_datagram=512), run1)
    got1 = [dec.feed(d, ADDR, 0.0) for m in first for d in m]
    # The DAQ restarts: same id, same address, sequence numbers from 0 again.
    second = fragmented(NativeEncoder(sender_id=42, max_datagram=512), run2)
    got2 = [dec.feed(d, ADDR, 1.0) for m in second for d in m]
    assert [m.payload for m in got1 if m] == run1
    assert [m.payload for m in got2 if m] == run2
    assert [m.sequence for m in got2 if m] == list(range(6))
    assert dec.stats == ReassemblyStats(completed=12)


def test_restart_drops_the_incomplete_message_of_the_first_run():
    # Run 1 ends with message 3 missing its last fragment; run 2's message 3
    # (same key, same size) must not be completed by run 1's fragments.
    run1, run2 = payloads(1, n=4), payloads(2, n=4)
    first = fragmented(NativeEncoder(sender_id=42, max_datagram=512), run1)
    first[3] = first[3][:-1]
    second = fragmented(NativeEncoder(sender_id=42, max_datagram=512), run2)
    dec = NativeDecoder()
    got = [dec.feed(d, ADDR, 0.0) for m in first + second for d in m]
    assert [m.payload for m in got if m] == run1[:3] + run2
    assert dec.stats == ReassemblyStats(completed=7, superseded=1)


def test_restart_after_a_short_run_is_reported():
    # Found from the bytes (the new run's message 0 differs from the old
    # one), not from the sequence numbers (0..5 again look like duplicates).
    restarts = []
    dec = NativeDecoder(on_restart=lambda address, sender_id: restarts.append((address, sender_id)))
    for run in (payloads(1), payloads(2)):
        encoder = NativeEncoder(sender_id=42, max_datagram=512)
        got = [dec.feed(d, ADDR, 0.0) for m in fragmented(encoder, run) for d in m]
        assert [m.payload for m in got if m] == run
    assert restarts == [(ADDR, 42)]
    # A sender whose first run is replayed byte for byte within the window of
    # recently completed messages is indistinguishable from duplicates (the
    # documented limit): nothing delivered again, no restart.
    encoder = NativeEncoder(sender_id=42, max_datagram=512)
    got = [dec.feed(d, ADDR, 0.0) for m in fragmented(encoder, payloads(2)) for d in m]
    assert not any(got) and restarts == [(ADDR, 42)]


def test_restart_after_a_long_run_drops_an_old_incomplete_message():
    # The path through the sequence tracker: run 1 is long (1100 messages,
    # more than the tracker's window of 1024 and than the 256 completed
    # messages the reassembler remembers), and its message 5 is still
    # incomplete (fragment 0 lost) when the sender restarts. Run 2's message
    # 0 goes back 1099 ids: a restart, so the old message 5 is dropped.
    # Nothing else could tell: run 2's messages 0..4 reuse keys nobody
    # remembers, and its message 5 would otherwise be completed with run 1's
    # fragment 1.
    run1, run2 = payloads(1, n=1100, size=600), payloads(2, n=6, size=600)
    first = fragmented(NativeEncoder(sender_id=42, max_datagram=512), run1)
    assert all(len(m) == 2 for m in first)
    first[5] = first[5][1:]
    second = fragmented(NativeEncoder(sender_id=42, max_datagram=512), run2)
    restarts = []
    dec = NativeDecoder(on_restart=lambda address, sender_id: restarts.append((address, sender_id)))
    got = [dec.feed(d, ADDR, 0.0) for m in first + second for d in m]
    assert [m.payload for m in got if m] == run1[:5] + run1[6:] + run2
    assert restarts == [(ADDR, 42)]
    assert dec.stats == ReassemblyStats(completed=1099 + 6, superseded=1)


def test_restart_seen_on_a_single_fragment_message():
    # As above, but run 2 starts with single-fragment messages 0..4: they
    # bypass the buffers, yet their sequence numbers show the restart, which
    # must drop run 1's incomplete message 5 before run 2's message 5 (two
    # fragments) reuses its key.
    run1 = payloads(1, n=1100, size=600)
    run2 = payloads(2, n=5, size=100) + payloads(3, n=1, size=600)
    first = fragmented(NativeEncoder(sender_id=42, max_datagram=512), run1)
    first[5] = first[5][1:]
    second = fragmented(NativeEncoder(sender_id=42, max_datagram=512), run2)
    assert [len(m) for m in second] == [1, 1, 1, 1, 1, 2]
    restarts = []
    dec = NativeDecoder(on_restart=lambda address, sender_id: restarts.append((address, sender_id)))
    got = [dec.feed(d, ADDR, 0.0) for m in first + second for d in m]
    assert [m.payload for m in got if m] == run1[:5] + run1[6:] + run2
    assert restarts == [(ADDR, 42)]
    assert dec.stats == ReassemblyStats(completed=1099 + 1, superseded=1)


def test_reassembler_without_address_keeps_working():
    r = Reassembler()
    datagrams = NativeEncoder(sender_id=1, max_datagram=512).encode(bytes(1000))
    out = [r.feed(parse_header(d), d[parse_header(d).payload_offset:], 0.0) for d in datagrams]
    assert out[-1] == bytes(1000)


async def test_two_senders_with_one_sender_id_end_to_end():
    net = MemoryNetwork(seed=5)
    pa, pb = payloads(1, n=20), payloads(2, n=20)
    with use_network(net):
        async with open_receiver(GROUP, PORT, framing="native", queue_size=1024) as rx:
            async with open_sender(GROUP, PORT, framing="native", sender_id=7, max_datagram=512) as a, \
                    open_sender(GROUP, PORT, framing="native", sender_id=7, max_datagram=512) as b:
                for x, y in zip(pa, pb):
                    await a.send(x)
                    await b.send(y)
            got = []
            with trio.fail_after(5):
                while len(got) < 40:
                    got.append(await rx.receive())
            stats = rx.statistics()
    assert sorted(m.payload for m in got) == sorted(pa + pb)
    assert stats.lost == 0 and stats.restarts == 0
    assert stats.reassembly.duplicate_fragments == 0 and stats.reassembly.inconsistent == 0
    assert len(stats.senders) == 2
    assert all(s.received == 20 and s.lost == 0 for s in stats.senders.values())


async def _two_runs(seed, run1, run2, **options):
    """Send ``run1`` then ``run2`` from one memory-network endpoint with
    sender_id 7 (a DAQ that restarts with a fixed id and address) to a native
    receiver; return what it delivered, its statistics and the source."""
    net = MemoryNetwork(seed=seed)
    got = []
    with use_network(net):
        async with open_receiver(GROUP, PORT, framing="native", **options) as rx:
            endpoint = net.open_sender(_groups.resolve_group(GROUP, PORT))
            try:
                for run in (run1, run2):
                    encoder = NativeEncoder(sender_id=7, max_datagram=512)
                    for k, p in enumerate(run):
                        endpoint.send_batch(encoder.encode(p))
                        if k % 64 == 63:
                            await trio.testing.wait_all_tasks_blocked()
                    await trio.testing.wait_all_tasks_blocked()
                with trio.fail_after(5):
                    while len(got) < len(run1) + len(run2):
                        got.append(await rx.receive())
            finally:
                endpoint.close()
            return got, rx.statistics(), endpoint.source


async def test_restarted_sender_end_to_end():
    # A DAQ with a fixed sender_id and a fixed source address (one endpoint of
    # the memory network) that restarts: its numbering starts over. Its first
    # run is longer than the receiver's loss window (the tracker alone could
    # tell this restart); for a short run, where only the reassembler can,
    # see test_restart_after_a_short_run_end_to_end.
    run1, run2 = payloads(1, n=1100, size=600), payloads(2, n=10, size=600)
    # Room to remember every message of the first run as completed.
    got, stats, source = await _two_runs(6, run1, run2, queue_size=4096, max_pending_messages=2048)
    assert [m.payload for m in got] == run1 + run2
    ((key, sender),) = stats.senders.items()
    assert key == (*source, 7)
    assert (sender.received, sender.lost, sender.duplicates, sender.restarts) == (1110, 0, 0, 1)
    assert stats.reassembly.duplicate_fragments == 0 and stats.kernel_drops in (0, None)


async def test_restart_after_a_short_run_end_to_end():
    # The reassembler sees the restart (run 2's messages differ from run 1's
    # under the same keys) and tells the receiver, whose per-sender loss
    # accounting starts over: 20 received, no duplicates, one restart.
    run1, run2 = payloads(1, n=10, size=600), payloads(2, n=10, size=600)
    got, stats, source = await _two_runs(6, run1, run2)
    assert [m.payload for m in got] == run1 + run2
    ((key, sender),) = stats.senders.items()
    assert key == (*source, 7)
    assert (sender.received, sender.lost, sender.duplicates, sender.restarts) == (20, 0, 0, 1)
    assert (stats.duplicates, stats.restarts) == (0, 1)
    assert stats.reassembly.duplicate_fragments == 0


async def test_restart_in_a_mixed_stream_is_counted_once():
    # Single- and multi-fragment messages from one sender: a restart after a
    # long run, seen first on a single-fragment message by the receiver's
    # tracker and by the reassembler alike, is one restart, not two.
    run1 = [p[:100] if k % 2 else p for k, p in enumerate(payloads(1, n=1100, size=600))]
    run2 = payloads(2, n=1, size=100) + payloads(3, n=1, size=600)
    got, stats, _ = await _two_runs(8, run1, run2, queue_size=4096)
    assert [m.payload for m in got] == run1 + run2
    ((sender),) = stats.senders.values()
    assert (sender.received, sender.lost, sender.duplicates, sender.restarts) == (1102, 0, 0, 1)


# ============================================================== MCL array bomb

BOMB = b"\x92\xc0\xdc\xfe\x00" + b"\x90" * 65024  # [nil, [[], [], ... 65024 times]]


def _peak_while(call) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_mcl_array_bomb_is_refused_without_being_built():
    dec = MclDecoder()

    def feed():
        with pytest.raises(MalformedFrame, match="^offset 65000: datagram is 65029 bytes; MCL sends"):
            dec.feed(BOMB, ADDR, 0.0)

    # Building it would allocate 65024 lists (several MB); refusing it, nothing.
    assert _peak_while(feed) < 64 << 10


async def test_mcl_array_bomb_is_counted_and_the_stream_goes_on():
    net = MemoryNetwork(seed=7)
    with use_network(net):
        async with open_receiver(GROUP, PORT, framing="mcl") as rx:
            endpoint = net.open_sender(_groups.resolve_group(GROUP, PORT))
            try:
                endpoint.send_batch([BOMB] * 20 + mcl_publish(IMU, b"imu"))
                with trio.fail_after(5):
                    message = await rx.receive()
            finally:
                endpoint.close()
            stats = rx.statistics()
    assert message.payload == IMU
    assert stats.malformed == 20 and "65029 bytes" in stats.last_error


@pytest.mark.parametrize(
    "obj",
    [
        # At most one container per 8 bytes (or 512): the densest allowed.
        pytest.param([[]] * 510, id="512 containers in a small datagram"),  # with the frame and the payload arrays
        pytest.param([[0] * 8] * ((MCL_MTU - 8) // 9), id="densest array of arrays"),
        pytest.param([{b"x": 1.5, b"y": -2}] * 3_000, id="list of records"),
        pytest.param([None] * (MCL_MTU - 8), id="densest array of nil"),
        pytest.param({bytes([k]): None for k in range(256)}, id="densest map"),
        pytest.param({b"%d" % i: i for i in range(6_500)}, id="large map"),
        pytest.param([b""] * 59_000, id="many empty strings"),
        pytest.param(b"s" * (MCL_MTU - 7), id="longest str"),
        pytest.param(-1, id="smallest object"),
    ],
)
def test_mcl_limits_never_refuse_what_mcl_sends_in_one_datagram(obj):
    [datagram] = mcl_publish(obj)
    assert len(datagram) <= MCL_MTU
    assert MclDecoder().feed(datagram, ADDR, 0.0).payload == obj


def test_mcl_limits_never_refuse_nesting_mcl_can_pack():
    # Python 2 msgpack packs at most 511 levels (its default recursion limit).
    obj: list = []
    for _ in range(510):
        obj = [obj]
    [datagram] = mcl_publish(obj)
    assert MclDecoder().feed(datagram, ADDR, 0.0).payload == obj


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param([[0] * 8] * 200_000, id="chunked array of arrays"),
        pytest.param({b"%d" % i: [i, 2 * i, i / 2] for i in range(40_000)}, id="chunked map"),
        pytest.param([{b"t": float(i), b"id": i, b"name": b"chip"} for i in range(100_000)],
                     id="chunked list of records"),
    ],
)
def test_mcl_limits_never_refuse_what_mcl_sends_in_chunks(obj):
    datagrams = mcl_publish(obj)
    assert len(datagrams) > 1
    dec = MclDecoder()
    assert [dec.feed(d, ADDR, 0.0) for d in datagrams][-1].payload == obj


def test_mcl_reassembled_payload_is_bounded_by_its_size():
    # A reassembled message claiming an array longer than its bytes could
    # hold is refused before anything is built.
    packed = b"\xdd\x7f\xff\xff\xff" + b"\x90" * 100  # array32 of 2**31 - 1 items
    dec = MclDecoder()
    chunks = [msgpack.packb([b"t", 1, 2, packed[:50]]), msgpack.packb([b"t", 2, 2, packed[50:]])]
    assert [dec.feed(d, ADDR, 0.0) for d in chunks] == [None, None]
    assert dec.stats == ReassemblyStats(inconsistent=1)


# ============================================================== reassembly memory


def one_byte_fragments(messages: int, per_message: int, count: int = 60_000) -> list[bytes]:
    """Native datagrams carrying 1-byte fragments of ``messages`` messages of
    ``count`` bytes, ``per_message`` fragments each (never complete)."""
    out = []
    for seq in range(messages):
        for index in range(per_message):
            header = struct.pack("<4sBBBxQIIHHH", NATIVE_MAGIC, 1, 0, 0, 9, seq, count, index, count, 1)
            out.append(header + bytes([index % 256]))
    return out


def _feed_native(dec, datagrams):
    for d in datagrams:
        dec.feed(d, ("127.0.0.1", 40000), 0.0)


def test_bytes_buffered_is_not_less_than_the_memory_held():
    datagrams = one_byte_fragments(4, 2500)
    dec = NativeDecoder(max_bytes=1 << 30)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _feed_native(dec, datagrams)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    stats = dec.stats
    assert stats.pending == 4
    assert held > 10_000  # 10,000 payload bytes held, in far more memory
    assert stats.bytes_buffered >= held


def test_memory_stays_within_max_bytes_for_one_byte_fragments():
    # 20,000 1-byte fragments of 4 messages of 6000 (each of which would fit):
    # without the overhead counted they would take twice the bound.
    bound = 1 << 20
    datagrams = one_byte_fragments(4, 5000, count=6000)
    dec = NativeDecoder(max_bytes=bound)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _feed_native(dec, datagrams)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    slack = 64 << 10  # the decoder's fixed state: restart table, recent keys
    assert current - before <= bound + slack
    assert peak - before <= bound + slack
    stats = dec.stats
    assert stats.bytes_buffered <= bound
    assert stats.evicted > 0  # the bound was reached


def test_mcl_memory_stays_within_max_bytes_for_one_byte_chunks():
    bound = 1 << 20
    # 22,500 1-byte chunks of 5 messages of 5000 chunks (each of which would fit).
    datagrams = [msgpack.packb([b"t%d" % m, i + 1, 5000, b"x"]) for m in range(5) for i in range(4500)]
    dec = MclDecoder(max_bytes=bound)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for d in datagrams:
            dec.feed(d, ADDR, 0.0)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - before <= bound + (64 << 10)
    assert dec.stats.bytes_buffered <= bound and dec.stats.evicted > 0


def test_mcl_declared_length_beyond_the_datagram_is_refused_without_building():
    # A datagram within 65000 bytes (so not refused on size) whose array
    # declares 65536 elements, more than its 64997 bytes can hold: the
    # unpacking limits derived from the datagram size refuse it at the
    # header. With msgpack limits of 2**31-1 it would build 64990 lists
    # (about 4 MB, milliseconds) before finding the input incomplete.
    bomb = b"\x92\xc0\xdd\x00\x01\x00\x00" + b"\x90" * 64990
    assert len(bomb) <= MCL_MTU_MAX
    dec = MclDecoder()

    def feed():
        with pytest.raises(MalformedFrame, match="65536 exceeds max_array_len"):
            dec.feed(bomb, ADDR, 0.0)

    assert _peak_while(feed) < 64 << 10
    # The same holds inside a reassembled chunked message.
    inner = b"\xdd\x00\x01\x00\x00" + b"\x90" * 64990
    chunks = [msgpack.packb([b"t", i + 1, 2, part], use_bin_type=False)
              for i, part in enumerate((inner[:40000], inner[40000:]))]
    assert dec.feed(chunks[0], ADDR, 0.0) is None

    def feed_last():
        assert dec.feed(chunks[1], ADDR, 0.0) is None

    assert _peak_while(feed_last) < 256 << 10
    assert dec.stats.inconsistent == 1
