"""MCL array bombs and the receiver's memory (issue 13, points 4 and 14),
each with a test that failed before its fix, over real sockets:

* the densest datagram MCL's size limit lets through (``[nil, [[]] *
  64990]``, 64,995 bytes) at 150 per second: refused after building at most
  one container per 8 bytes, counted as malformed, never delivered; a
  100 ms ticker keeps its ticks and the receiving process's memory stays
  small (it used to keep 55 % of its ticks, with 0.9 s stalls, at 1.3 GB);
* one chunked message of 542 valid 60 kB chunks reassembling into 32
  million empty lists, in message and in readout mode: refused in its first
  64 KiB slice (it used to stall the loop 6.4 s and 7.9 s at 2.4 GB);
* legitimate large MCL messages (megabytes of bytes, a list of 100,000
  records) still go through, the large ones unpacked in slices with the
  loop running between them;
* the consumer's channel is bounded in bytes (``max_queue_bytes``) as well
  as in items, what it drops counted in ``dropped``/``dropped_chunks``;
* MCL reassembly charges each incomplete message's topic to
  ``max_reassembly_bytes`` (60 kB topics under a 1 MiB bound used to hold
  15.5 MB).
* and the attacks on those bounds (a second tester's): maps of colliding
  keys (a hash flood), payloads the byte estimate undercounted, topics not
  charged to ``max_queue_bytes``, one receive batch as one unbounded item,
  a channel shared by two receivers, reassembly bounds one sender could
  take from all, ``drop_oldest`` into an unbuffered channel, ``block``
  polling for room in bytes, and the tools on deeply nested payloads and
  non-finite floats.

The attacks whose memory is measured run in a child process
(``python tests/test_mcl_bombs.py SCENARIO ...``) that reports its own peak
RSS (``VmHWM``) against its RSS before the attack, so that the rest of
the test run does not blur the figure. Everything runs only inside a private
network namespace (``tools/netns-run``); elsewhere the module is skipped
with that reason.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest
import trio

msgpack = pytest.importorskip("msgpack", reason="framing='mcl' needs the optional msgpack package")

from mcast_trio import (  # noqa: E402
    AstroPix4Readout,
    MalformedFrame,
    MclDecoder,
    MclEncoder,
    open_receiver,
    open_sender,
)
from mcast_trio.sim import DaqSimulator  # noqa: E402
from mcast_trio.testing import isolation_problem, joined_ipv4_groups  # noqa: E402

#: Where the mcast_trio under test comes from (installed, or a source tree
#: on PYTHONPATH): child processes import the same one.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["mcast_trio"].__file__)))

_PROBLEM = isolation_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")

_serial = itertools.count()
_BASE_PORT = 47000 + os.getpid() % 1000 * 3
MiB = 1 << 20

#: The densest datagram within MCL's 65000 bytes: [nil, [[], [], ...]].
_N = 64990
BOMB = b"\x92\xc0\xdc" + _N.to_bytes(2, "big") + b"\x90" * _N
assert len(BOMB) == 64995


@pytest.fixture
def ep() -> tuple[str, int]:
    """A fresh IPv4 group and port for one test."""
    n = next(_serial)
    return f"239.255.73.{n % 250 + 1}", _BASE_PORT + n


def plain_sender() -> socket.socket:
    """A stdlib UDP socket sending loopback multicast (hostile datagrams)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
    sock.bind(("127.0.0.1", 0))
    return sock


def chunked_bomb() -> list[bytes]:
    """542 valid MCL chunks (60,000 bytes each but the last) of one message
    that unpacks to an array of 32.5 million empty lists."""
    count = 542
    size = (count - 1) * 60000 + 30000  # n = size // 60000 + 1 = 542, as MCL counts
    packed = b"\xdd" + (size - 5).to_bytes(4, "big") + b"\x90" * (size - 5)
    chunks = [packed[i * 60000:(i + 1) * 60000] for i in range(count)]
    return [msgpack.packb([None, i + 1, count, chunk], use_bin_type=False)
            for i, chunk in enumerate(chunks)]


def _rss_kib(field: str = "VmRSS") -> int:
    """This process's resident memory now (``VmRSS``) or at its peak
    (``VmHWM``: the high-water mark of this process image; ``ru_maxrss``
    would include the parent's, inherited through fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


async def _wait_until(predicate, what: str, timeout: float) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.005)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class _Ticker:
    """A task ticking every 100 ms; :meth:`kept` is the share of the ticks
    due in its window that it made."""

    def __init__(self) -> None:
        self.ticks = 0
        self.gaps: list[float] = []
        self.start = self.end = 0.0

    async def run(self) -> None:
        self.start = last = time.perf_counter()
        try:
            while True:
                await trio.sleep(0.1)
                now = time.perf_counter()
                self.ticks += 1
                self.gaps.append(now - last)
                last = now
        finally:
            self.end = time.perf_counter()

    def kept(self) -> float:
        return self.ticks / ((self.end - self.start) / 0.1)


def _send_paced(sock, datagrams, address, per_second: float | None = None, burst: int = 8) -> None:
    """Send from a worker thread: ``per_second`` datagrams a second, or in
    bursts of ``burst`` with a short pause (so that a draining receiver
    never overflows its buffer)."""
    start = time.perf_counter()
    for k, data in enumerate(datagrams):
        sock.sendto(data, address)
        if per_second is not None:
            delay = start + (k + 1) / per_second - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        elif k % burst == burst - 1:
            time.sleep(0.002)


# ---------------------------------------------------------------------------
# The attacks, each in a child process that reports its peak memory
# ---------------------------------------------------------------------------

async def _scenario_flood(group: str, port: int) -> dict:
    """150 densest datagrams a second for 2 s, each followed by a legitimate
    message; a consumer that takes what comes."""
    bombs = 300
    legit = [msgpack.packb([b"imu", b"message %d" % k]) for k in range(bombs)]
    datagrams = [d for pair in zip([BOMB] * bombs, legit) for d in pair]
    got: list[bytes] = []
    ticker = _Ticker()
    sock = plain_sender()
    try:
        async with open_receiver(group, port, framing="mcl") as rx:
            async def consume():
                async for message in rx:
                    if type(message.payload) is bytes:
                        got.append(message.payload)

            base = _rss_kib()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                nursery.start_soon(ticker.run)
                await trio.to_thread.run_sync(_send_paced, sock, datagrams, (group, port), 2 * 150)
                await _wait_until(lambda: rx.statistics().messages + rx.statistics().malformed
                                  + (rx.statistics().kernel_drops or 0) >= len(datagrams),
                                  "every datagram handled", 60)
                await _wait_until(lambda: len(got) >= rx.statistics().messages, "the consumer", 10)
                nursery.cancel_scope.cancel()
            stats = rx.statistics()
    finally:
        sock.close()
    return dict(kept=ticker.kept(), worst_gap=max(ticker.gaps), base_kib=base,
                peak_kib=_rss_kib("VmHWM"),
                malformed=stats.malformed, messages=stats.messages, kernel_drops=stats.kernel_drops,
                last_error=stats.last_error, got=len(got), in_order=got == [b"message %d" % k for k in range(bombs)])


async def _scenario_chunked(group: str, port: int, mode: str) -> dict:
    """One chunked message of 542 chunks reassembling into 32.5 million empty
    lists, then a legitimate message; message mode, or readout mode as
    ``mcast-trio record --framing mcl`` runs."""
    bomb = chunked_bomb()
    if mode == "readouts":
        readout = DaqSimulator(5, start_ns=0, mean_hits=2.0).readouts(1)[0].to_bytes()
        options = dict(readout_class=AstroPix4Readout)
    else:
        readout = b"after the bomb"
        options = {}
    after = MclEncoder(b"apx").encode(readout)
    got: list = []
    ticker = _Ticker()
    sock = plain_sender()
    try:
        async with open_receiver(group, port, framing="mcl", **options) as rx:
            async def consume():
                async for item in rx:
                    got.append(item.to_bytes() if mode == "readouts" else item.payload)

            base = _rss_kib()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                nursery.start_soon(ticker.run)
                await trio.sleep(0.3)
                await trio.to_thread.run_sync(_send_paced, sock, bomb + after, (group, port))
                await _wait_until(lambda: len(got) >= 1 or (rx.statistics().kernel_drops or 0) > 0,
                                  "the message after the bomb", 60)
                await trio.sleep(0.3)
                nursery.cancel_scope.cancel()
            stats = rx.statistics()
    finally:
        sock.close()
    return dict(kept=ticker.kept(), worst_gap=max(ticker.gaps), base_kib=base,
                peak_kib=_rss_kib("VmHWM"),
                malformed=stats.malformed, kernel_drops=stats.kernel_drops, last_error=stats.last_error,
                delivered_after=got == [readout], reassembly_bytes=stats.reassembly.bytes_buffered,
                datagrams=stats.datagrams, sent=len(bomb) + len(after))


_SCENARIOS = {
    "flood": _scenario_flood,
    "chunked": _scenario_chunked,
}


def _run_child(ep, name: str, *args: str) -> dict:
    group, port = ep
    done = subprocess.run([sys.executable, __file__, name, group, str(port), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Point 4: array bombs
# ---------------------------------------------------------------------------

def test_densest_datagrams_at_150_per_second_are_refused_and_the_loop_keeps_ticking(ep):
    r = _run_child(ep, "flood")
    assert r["kernel_drops"] == 0, r
    # Every bomb counted as malformed, with the bound in the reason; every
    # legitimate message delivered, in order.
    assert r["malformed"] == 300 and r["messages"] == 300, r
    assert "arrays, maps and ext objects" in r["last_error"] and "one per 8 bytes" in r["last_error"]
    assert r["got"] == 300 and r["in_order"], r
    assert r["kept"] >= 0.8, f"the 100 ms ticker kept {r['kept']:.0%} of its ticks: {r}"
    growth_mib = (r["peak_kib"] - r["base_kib"]) / 1024
    assert growth_mib < 100, f"peak RSS grew {growth_mib:.0f} MiB during the flood: {r}"


@pytest.mark.parametrize("mode", ["messages", "readouts"])
def test_a_chunked_bomb_is_refused_in_its_first_slice(ep, mode):
    r = _run_child(ep, "chunked", mode)
    # Every chunk arrived (else the bomb never completed and nothing was shown).
    assert r["kernel_drops"] == 0 and r["datagrams"] == r["sent"], r
    assert r["malformed"] == 1, r
    assert "in its first 65536 of 32490000 bytes" in r["last_error"], r
    assert r["delivered_after"], r
    assert r["reassembly_bytes"] == 0, r
    assert r["kept"] >= 0.8, f"the 100 ms ticker kept {r['kept']:.0%} of its ticks: {r}"
    assert r["worst_gap"] < 0.3, r
    growth_mib = (r["peak_kib"] - r["base_kib"]) / 1024
    # The chunks held for reassembly (32.5 MB) and their join, nothing more.
    assert growth_mib < 150, f"peak RSS grew {growth_mib:.0f} MiB: {r}"


async def test_legitimate_large_mcl_messages_go_through_without_stalling_the_loop(ep):
    group, port = ep
    blob = os.urandom(4 * MiB)
    records = [{"timestamp": 1.7e9 + k / 1000, "id": k, "chip": k % 4, "name": "astropix",
                "hits": [k % 35, (k * 7) % 35]} for k in range(100_000)]
    small = {"kind": "status", "ok": True}
    got: list = []
    ticker = _Ticker()
    heartbeat: list[tuple[float, float]] = []  # (start, gap)
    receiving: list[tuple[float, float]] = []  # (sent, received) of each message

    async def beat():
        last = time.perf_counter()
        while True:
            await trio.sleep(0.002)
            now = time.perf_counter()
            heartbeat.append((last, now - last))
            last = now

    # A full collection walks every object of the process (after the rest of
    # the suite, a few hundred milliseconds by itself): freeze what exists,
    # so that the gaps measured are the receive path's.
    gc.collect()
    gc.freeze()
    try:
        await _receive_large(group, port, [blob, records, small], got, ticker, beat, receiving)
    finally:
        gc.unfreeze()
    stats = got.pop()

    assert stats.kernel_drops == 0 and stats.malformed == 0
    assert got[0] == blob
    # msgpack's raw family carries no encoding: strings come back as bytes.
    assert len(got[1]) == 100_000 and got[1][12345] == {
        b"timestamp": 1.7e9 + 12.345, b"id": 12345, b"chip": 1, b"name": b"astropix",
        b"hits": [12345 % 35, 12345 * 7 % 35]}
    assert got[2] == {b"kind": b"status", b"ok": True}
    # The records (5 MB of msgpack, 100,000 dicts) were unpacked in 64 KiB
    # slices: the loop ran between them (in one go: about 100 ms).
    gaps = [gap for start, gap in heartbeat if any(a <= start and start + gap <= b for a, b in receiving)]
    assert len(gaps) > 10
    assert max(gaps) < 0.06, f"the heartbeat waited {max(gaps) * 1000:.0f} ms"


async def _receive_large(group, port, payloads, got, ticker, beat, receiving) -> None:
    async with open_receiver(group, port, framing="mcl") as rx:
        async with open_sender(group, port, framing="mcl", topic="apx") as tx:
            async def consume():
                async for message in rx:
                    got.append(message.payload)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                nursery.start_soon(ticker.run)
                nursery.start_soon(beat)
                for k, payload in enumerate(payloads):
                    # Encoding 100,000 records takes the sender's task (this
                    # one) a while: only the receiving is measured.
                    await tx.send(payload)
                    sent = time.perf_counter()
                    await _wait_until(lambda: len(got) > k, f"message {k}", 20)
                    receiving.append((sent, time.perf_counter()))
                nursery.cancel_scope.cancel()
        got.append(rx.statistics())


@pytest.mark.parametrize(
    ("datagram", "limit"),
    [
        pytest.param(BOMB, 8124, id="empty arrays"),
        pytest.param(b"\x92\xc0\xde" + (16000).to_bytes(2, "big")
                     + b"".join(b"\xa2" + i.to_bytes(2, "big") + b"\x80" for i in range(16000)),
                     8000, id="empty maps"),
        # An ext object is built by Python code (msgpack.ExtType): it counts 8.
        pytest.param(b"\x92\xc0\xdc" + (21000).to_bytes(2, "big") + b"\xc7\x00\x01" * 21000,
                     7875, id="empty ext objects"),
    ],
)
def test_dense_datagrams_are_refused_naming_the_bound(datagram, limit):
    dec = MclDecoder()
    with pytest.raises(MalformedFrame, match=rf"^offset 0: datagram builds more than {limit} arrays"):
        dec.feed(datagram, ("127.0.0.1", 1), 0.0)


def test_timestamps_come_out_as_nanoseconds():
    # 10,830 msgpack timestamps in one datagram: ints, built in C, not one
    # Python Timestamp object (about 0.4 us of Python each) per 6 bytes.
    n = 10830
    datagram = b"\x92\xc0\xdc" + n.to_bytes(2, "big") + b"\xd6\xff\x00\x00\x00\x01" * n
    assert MclDecoder().feed(datagram, ("127.0.0.1", 1), 0.0).payload == [10**9] * n


def test_large_records_are_unpacked_in_slices():
    # Sans-I/O: feed_paced hands the completing chunk's message back as a
    # generator that yields between 64 KiB slices.
    records = [{b"t": float(k), b"id": k} for k in range(50_000)]
    datagrams = MclEncoder(b"apx").encode(records)
    dec = MclDecoder()
    assert [dec.feed_paced(d, ("127.0.0.1", 1), 0.0) for d in datagrams[:-1]] == [None] * (len(datagrams) - 1)
    steps = dec.feed_paced(datagrams[-1], ("127.0.0.1", 1), 0.0)
    slices = 1
    with pytest.raises(StopIteration) as stop:
        while True:
            next(steps)
            slices += 1
    assert stop.value.value.payload == records
    assert slices == -(-len(msgpack.packb(records, use_bin_type=False)) // 65536)


# ---------------------------------------------------------------------------
# Point 4: the consumer's channel is bounded in bytes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("overflow", ["drop_oldest", "drop_newest"])
async def test_a_stalled_consumer_holds_at_most_max_queue_bytes(ep, overflow):
    # 60 messages of 1 MiB each (18 chunks) to a consumer that does not read:
    # at most 8 MiB of them are queued, the rest dropped and counted.
    group, port = ep
    count = 60
    payloads = [bytes([k]) * MiB for k in range(count)]
    encoder = MclEncoder(b"big")
    sock = plain_sender()
    try:
        async with open_receiver(group, port, framing="mcl", max_queue_bytes=8 * MiB, overflow=overflow) as rx:
            datagrams = [d for p in payloads for d in encoder.encode(p)]
            await trio.to_thread.run_sync(_send_paced, sock, datagrams, (group, port))
            await _wait_until(lambda: rx.statistics().messages >= count or rx.statistics().kernel_drops,
                              "every message", 30)
            stats = rx.statistics()
            got = []
            with trio.move_on_after(0.5):
                async for message in rx:
                    got.append(message.payload[0])
    finally:
        sock.close()
    assert stats.kernel_drops == 0 and stats.messages == count
    # What was queued fits the bound (one message may be alone beyond it).
    assert 1 <= len(got) <= 8
    assert stats.dropped == count - len(got) and 1 <= stats.dropped_chunks <= stats.dropped
    if overflow == "drop_oldest":
        assert got == list(range(count - len(got), count))
    else:
        assert got == list(range(len(got)))


async def test_a_stalled_consumer_of_readouts_is_bounded_in_bytes(ep):
    # Raw readouts: 2,000 readouts of about 1 kB, queue_size far from full,
    # max_queue_bytes=256 KiB: the bound in bytes decides.
    group, port = ep
    readouts = DaqSimulator(11, start_ns=0, mean_hits=200.0).readouts(2000)
    datagrams = [r.to_bytes() for r in readouts]
    sock = plain_sender()
    try:
        async with open_receiver(group, port, AstroPix4Readout, max_queue_bytes=256 << 10,
                                 overflow="drop_newest") as rx:
            await trio.to_thread.run_sync(_send_paced, sock, datagrams, (group, port))
            await _wait_until(lambda: rx.statistics().readouts >= len(datagrams) or rx.statistics().kernel_drops,
                              "every readout", 30)
            stats = rx.statistics()
            got = []
            with trio.move_on_after(0.5):
                async for readout in rx:
                    got.append(readout.to_bytes())
    finally:
        sock.close()
    assert stats.kernel_drops == 0 and stats.readouts == len(datagrams)
    assert stats.dropped > 0 and stats.dropped + len(got) == len(datagrams)
    # In order, the newest dropped when they did not fit (a smaller chunk
    # after a dropped one may fit).
    assert got == [d for d in datagrams if d in set(got)]
    held = sum(map(len, got))
    assert held <= 256 << 10


async def test_block_waits_for_room_in_bytes(ep):
    # overflow="block": a consumer that stalls, then reads; nothing dropped,
    # and no more than the bound queued while it stalled.
    group, port = ep
    payloads = [bytes([k]) * 100_000 for k in range(20)]
    encoder = MclEncoder(b"t")
    sock = plain_sender()
    try:
        async with open_receiver(group, port, framing="mcl", max_queue_bytes=300_000,
                                 overflow="block") as rx:
            datagrams = [d for p in payloads for d in encoder.encode(p)]
            await trio.to_thread.run_sync(_send_paced, sock, datagrams, (group, port))
            await trio.sleep(0.3)
            stalled = rx.statistics()
            got = []
            with trio.fail_after(10):
                while len(got) < len(payloads):
                    got.append((await rx.receive()).payload)
            stats = rx.statistics()
    finally:
        sock.close()
    # The task waited for room in bytes (items are far from the queue_size
    # of 256): it had not taken in every message while the consumer stalled.
    assert stalled.messages < len(payloads), stalled
    assert got == payloads
    assert stats.dropped == 0 and stats.kernel_drops == 0 and stats.messages == len(payloads)


async def test_max_queue_bytes_is_validated_before_anything_opens(ep):
    group, port = ep
    for value, kind, allowed in [(0, ValueError, "out of range"), (-1, ValueError, "out of range"),
                                 (1 << 41, ValueError, "out of range"), (1.5, TypeError, "integer"),
                                 (True, TypeError, "integer"), ("1M", TypeError, "integer")]:
        with pytest.raises(kind, match=rf"^max_queue_bytes={value!r} .*{allowed}"):
            async with open_receiver(group, port, framing="mcl", max_queue_bytes=value):
                pytest.fail(f"open_receiver accepted max_queue_bytes={value!r}")
    assert group not in joined_ipv4_groups()


# ---------------------------------------------------------------------------
# Point 14: the topic is charged to max_reassembly_bytes
# ---------------------------------------------------------------------------

async def test_mcl_reassembly_charges_the_topic(ep):
    # 200 incomplete messages, each with its own 60 kB topic and a 1-byte
    # first chunk, under a 1 MiB bound: the topics held fit in the bound.
    group, port = ep
    bound = MiB
    topics = [b"%05d" % k + b"t" * 59995 for k in range(200)]
    datagrams = [msgpack.packb([t, 1, 2, b"x"], use_bin_type=False) for t in topics]
    sock = plain_sender()
    try:
        async with open_receiver(group, port, framing="mcl", max_reassembly_bytes=bound) as rx:
            await trio.to_thread.run_sync(_send_paced, sock, datagrams, (group, port))
            await _wait_until(lambda: rx.statistics().datagrams >= len(datagrams) or rx.statistics().kernel_drops,
                              "every chunk", 20)
            stats = rx.statistics()
    finally:
        sock.close()
    r = stats.reassembly
    assert stats.kernel_drops == 0 and stats.malformed == 0
    assert r.pending * 60000 <= r.bytes_buffered <= bound, r
    assert r.evicted == len(datagrams) - r.pending, r


def test_mcl_reassembly_memory_held_with_long_topics_stays_within_the_bound():
    bound = MiB
    dec = MclDecoder(max_bytes=bound)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k in range(200):
            topic = b"%05d" % k + b"t" * 59995
            assert dec.feed(msgpack.packb([topic, 1, 2, b"x"]), ("127.0.0.1", 1), 0.0) is None
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert dec.stats.bytes_buffered <= bound
    assert held <= bound + (64 << 10), f"{held} bytes held under max_bytes={bound}"


# ---------------------------------------------------------------------------
# Attacks on the bounds above (hash flooding, the byte bound's estimate, one
# receive batch as one item, a channel shared by two receivers, reassembly
# shared by every sender, drop_oldest into an unbuffered channel, block
# polling, deep nesting and non-finite floats in the tools)
# ---------------------------------------------------------------------------

#: Python hashes an int modulo this Mersenne prime.
_HASH_MODULUS = (1 << 61) - 1


def _colliding_timestamp(k: int) -> bytes:
    """A msgpack timestamp 96 (ext -1, 15 bytes) that the decoder turns into
    the int ``k * (2**61 - 1)`` nanoseconds: every such int hashes to 0."""
    sec, ns = divmod(k * _HASH_MODULUS, 10**9)
    return b"\xc7\x0c\xff" + struct.pack(">Iq", ns, sec)


def _colliding_map(n: int, first: int = 1) -> bytes:
    """A msgpack map of ``n`` entries (16 bytes each), every key a distinct
    int with hash 0, every value nil: building the dict costs n**2 / 2
    key comparisons. No container but the map itself."""
    return (b"\xdf" + struct.pack(">I", n)
            + b"".join(_colliding_timestamp(k) + b"\xc0" for k in range(first, first + n)))


def test_hash_flood_map_costs_no_more_than_the_densest_accepted_datagram():
    """Unit level (no socket): one 64 kB datagram ``[nil, {4000 colliding
    int keys: nil}]`` holds a single container, so the density bound lets it
    through; building its dict costs 8 million int comparisons. The densest
    datagram the bound accepts costs ~1 ms; this one must not cost 10x that."""
    from mcast_trio import MclDecoder

    datagram = b"\x92\xc0" + _colliding_map(4000)
    assert len(datagram) <= 65000
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        try:
            MclDecoder().feed(datagram, ("127.0.0.1", 1), 0.0)
        except Exception:
            pass  # refusing it is fine
        best = min(best, time.perf_counter() - t)
    assert best < 0.02, f"one 64 kB datagram took {best * 1000:.0f} ms to decode"


async def test_hash_flood_datagrams_starve_the_loop(ep):
    """Ten 64 kB datagrams ``[nil, {4000 colliding keys}]`` at 10 a second,
    interleaved with legitimate messages: a 100 ms ticker must keep >= 80 %
    of its ticks (the densest array bombs at 150/s do)."""
    group, port = ep
    hostile = [b"\x92\xc0" + _colliding_map(4000)] * 10
    legit = [msgpack.packb([b"imu", b"message %d" % k]) for k in range(10)]
    datagrams = [d for pair in zip(hostile, legit) for d in pair]
    got: list[bytes] = []
    ticker = _Ticker()
    sock = plain_sender()
    try:
        async with open_receiver(group, port, framing="mcl") as rx:
            async def consume():
                async for message in rx:
                    if type(message.payload) is bytes:
                        got.append(message.payload)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                nursery.start_soon(ticker.run)
                await trio.sleep(0.2)
                await trio.to_thread.run_sync(_send_paced, sock, datagrams, (group, port), 20)
                await _wait_until(lambda: len(got) >= 10 or (rx.statistics().kernel_drops or 0) > 0,
                                  "the legitimate messages", 30)
                await trio.sleep(0.2)
                nursery.cancel_scope.cancel()
    finally:
        sock.close()
    assert got == [b"message %d" % k for k in range(10)]
    assert ticker.kept() >= 0.8, (
        f"the 100 ms ticker kept {ticker.kept():.0%} of its ticks, worst gap {max(ticker.gaps):.2f} s")


async def test_hash_flood_chunked_message_stalls_the_loop_between_slices(ep):
    """One 256 kB chunked message (5 valid chunks) whose payload is a map of
    16,000 colliding keys: unpacked in 64 KiB slices, but each slice adds
    4,000 keys to a dict already holding every earlier key, so the slices
    grow slower and slower (the work is quadratic in the message). The loop
    must not stall more than 0.3 s at a time (as for the chunked array bomb)."""
    group, port = ep
    payload = _colliding_map(16000)
    chunks = [payload[i:i + 60000] for i in range(0, len(payload), 60000)]
    frames = [msgpack.packb([b"topic", i + 1, len(chunks), c], use_bin_type=False)
              for i, c in enumerate(chunks)]
    after = msgpack.packb([b"imu", b"after"])
    got: list = []
    ticker = _Ticker()
    sock = plain_sender()
    try:
        async with open_receiver(group, port, framing="mcl") as rx:
            async def consume():
                async for message in rx:
                    got.append(message.payload)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                nursery.start_soon(ticker.run)
                await trio.sleep(0.2)
                await trio.to_thread.run_sync(_send_paced, sock, frames + [after], (group, port), 50)
                await _wait_until(lambda: b"after" in got or (rx.statistics().kernel_drops or 0) > 0,
                                  "the message after", 30)
                await trio.sleep(0.2)
                nursery.cancel_scope.cancel()
    finally:
        sock.close()
    assert got[-1] == b"after"
    assert max(ticker.gaps) < 0.3, (
        f"worst ticker gap {max(ticker.gaps):.2f} s, kept {ticker.kept():.0%}")


def _deep_size(obj) -> int:
    """Memory of ``obj`` and everything it holds (sys.getsizeof, without the
    garbage collector's headers or allocator rounding: an underestimate)."""
    import sys

    seen: set[int] = set()
    stack = [obj]
    total = 0
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if type(o) is list:
            stack.extend(o)
        elif type(o) is dict:
            stack.extend(o.keys())
            stack.extend(o.values())
    return total


def _small_dicts_datagram(k: int) -> bytes:
    """``[nil, [pad, {b"XYa": -1000 - i} for i in range(8000)]]``: 8 bytes of
    msgpack per one-entry dict, within the density bound (one container per
    8 bytes), about 37 bytes of memory per byte."""
    items = [b"\xbf" + b"p" * 31] + [
        b"\x81\xa3" + struct.pack(">H", (i + k) % 65536) + b"a" + b"\xd1" + struct.pack(">h", -1000 - i)
        for i in range(8000)]
    return b"\x92\xc0\xdc" + struct.pack(">H", len(items)) + b"".join(items)


async def test_a_stalled_consumer_holds_no_more_than_max_queue_bytes_of_small_dicts(ep):
    """The consumer stalls while 30 datagrams of one-entry dicts (64 kB each,
    accepted) arrive, ``max_queue_bytes`` 4 MiB, ``drop_newest``. What it
    then finds queued must hold at most 4 MiB plus one item (an item alone
    is never refused); the decoder's estimate (16 bytes per byte) undercounts
    these payloads 2.3x, so the channel holds over twice the bound."""
    group, port = ep
    bound = 4 * MiB
    datagrams = [_small_dicts_datagram(k) for k in range(30)]
    assert all(len(d) <= 65000 for d in datagrams)
    sock = plain_sender()
    items: list[list] = []
    try:
        async with open_receiver(group, port, framing="mcl", overflow="drop_newest",
                                 max_queue_bytes=bound, batch_size=1) as rx:
            await trio.sleep(0.1)
            await trio.to_thread.run_sync(_send_paced, sock, datagrams, (group, port), 200)
            await _wait_until(lambda: rx.statistics().datagrams + (rx.statistics().kernel_drops or 0)
                              >= len(datagrams), "every datagram", 10)
            stats = rx.statistics()
            with trio.move_on_after(0.5):
                async for message in rx:
                    items.append(message.payload)
    finally:
        sock.close()
    assert stats.malformed == 0 and stats.kernel_drops == 0, stats
    assert len(items) + stats.dropped == len(datagrams), (len(items), stats)
    sizes = [_deep_size(p) for p in items]
    held = sum(sizes)
    assert held <= bound + max(sizes), (
        f"the stalled consumer's channel held {held / MiB:.1f} MiB of payloads "
        f"({len(items)} messages of {max(sizes) / MiB:.2f} MiB) under max_queue_bytes={bound / MiB:.0f} MiB")


def test_listen_mcl_answers_sigint_promptly_while_a_colliding_map_is_unpacked(ep):
    """``mcast-trio listen --messages --framing mcl`` receives one 640 kB
    chunked message (11 valid chunks) whose payload is a map of 40,000
    colliding int keys. SIGINT 1.5 s later must end it (exit 0) within a
    second: it took 2.8 s, the slice being unpacked when the signal came
    (each slice is slower than the one before; with a 32 MiB message a slice
    takes tens of seconds)."""
    import signal
    import subprocess
    import sys

    group, port = ep
    env = dict(os.environ, PYTHONPATH=_PACKAGE_PARENT)
    proc = subprocess.Popen([sys.executable, "-m", "mcast_trio.cli", "listen", "--messages", "--framing", "mcl",
                             "-g", group, "-p", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 10
        line = proc.stderr.readline()  # "listen: ... joined on lo"
        assert "joined" in line, line
        payload = _colliding_map(40000)
        chunks = [payload[i:i + 60000] for i in range(0, len(payload), 60000)]
        frames = [msgpack.packb([b"t", i + 1, len(chunks), c], use_bin_type=False)
                  for i, c in enumerate(chunks)]
        sock = plain_sender()
        try:
            _send_paced(sock, frames, (group, port), 200)
        finally:
            sock.close()
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        proc.wait(timeout=60)
        took = time.monotonic() - sent
        assert time.monotonic() < deadline + 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    assert took < 1.0, f"listen took {took:.2f} s to exit after SIGINT; stderr: {err[-300:]}"


def _chunks(topic: bytes, payload: bytes, size: int = 60000) -> list[bytes]:
    parts = [payload[i:i + size] for i in range(0, len(payload), size)]
    return [msgpack.packb([topic, i + 1, len(parts), p], use_bin_type=False) for i, p in enumerate(parts)]


async def _legit_and_hostile(ep, hostile_between, legit_messages=5, **options):
    """A legitimate MCL sender sends ``legit_messages`` 3-chunk messages, its
    chunks 20 ms apart (well within the 2 s reassembly timeout); between two
    of its chunks a second sender (another port) sends
    ``hostile_between()``. Returns the payloads received from the legitimate
    sender and the statistics."""
    group, port = ep
    legit_sock, hostile_sock = plain_sender(), plain_sender()
    legit_addr = legit_sock.getsockname()
    payloads = [bytes([65 + k]) * 150000 for k in range(legit_messages)]
    got: list[bytes] = []
    try:
        async with open_receiver(group, port, framing="mcl", **options) as rx:
            async def consume():
                async for message in rx:
                    if tuple(message.address)[:2] == legit_addr:
                        got.append(message.payload)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                await trio.sleep(0.1)

                def send():
                    for payload in payloads:
                        for frame in _chunks(b"legit", msgpack.packb(payload)):
                            legit_sock.sendto(frame, (group, port))
                            time.sleep(0.01)
                            for d in hostile_between():
                                hostile_sock.sendto(d, (group, port))
                            time.sleep(0.01)

                await trio.to_thread.run_sync(send)
                await trio.sleep(0.3)
                nursery.cancel_scope.cancel()
            stats = rx.statistics()
    finally:
        legit_sock.close()
        hostile_sock.close()
    return payloads, got, stats


async def test_a_hostile_sender_of_many_incomplete_messages_evicts_legitimate_ones(ep):
    """Between two chunks of each legitimate message, a hostile sender sends
    the first chunk of 300 two-chunk messages (distinct topics): the pending
    bound (256 messages) is shared by all senders, so the oldest, the
    legitimate message, is evicted. A legitimate sender's messages must all
    arrive whatever another sender does."""
    counter = itertools.count()

    def hostile():
        return [msgpack.packb([b"h%d" % next(counter), 1, 2, b"x"], use_bin_type=False) for _ in range(300)]

    payloads, got, stats = await _legit_and_hostile(ep, hostile)
    assert (stats.kernel_drops or 0) == 0, stats
    assert got == payloads, (
        f"{len(got)} of {len(payloads)} legitimate messages arrived; reassembly {stats.reassembly}")


async def test_a_hostile_sender_of_large_incomplete_messages_evicts_legitimate_ones(ep):
    """The same with bytes: between two legitimate chunks, a hostile sender
    sends the first 60 kB chunk of 40 large messages (2.4 MB) under
    ``max_reassembly_bytes`` of 2 MiB: the byte bound is shared by all
    senders, so the legitimate message is evicted."""
    counter = itertools.count()
    chunk = b"y" * 60000

    def hostile():
        return [msgpack.packb([b"h%d" % next(counter), 1, 100, chunk], use_bin_type=False) for _ in range(40)]

    payloads, got, stats = await _legit_and_hostile(ep, hostile, max_reassembly_bytes=2 * MiB)
    assert (stats.kernel_drops or 0) == 0, stats
    assert got == payloads, (
        f"{len(got)} of {len(payloads)} legitimate messages arrived; reassembly {stats.reassembly}")


async def _scenario_string_flood(group: str, port: int) -> dict:
    """2,000 datagrams ``[nil, [21,660 two-byte strings]]`` (64,987 bytes,
    no container but the list: accepted) at the fastest rate the loopback
    takes, ``max_queue_bytes`` 8 MiB, a consumer that throws each message
    away at once."""
    import json  # noqa: F401

    items = [b"\xa2" + struct.pack(">H", i) for i in range(21660)]
    datagram = b"\x92\xc0\xdd" + struct.pack(">I", len(items)) + b"".join(items)
    sent = 2000
    got = [0]
    ticker = _Ticker()
    sock = plain_sender()
    try:
        async with open_receiver(group, port, framing="mcl", max_queue_bytes=8 * MiB) as rx:
            async def consume():
                async for _ in rx:
                    got[0] += 1

            base = _rss_kib()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                nursery.start_soon(ticker.run)
                await trio.to_thread.run_sync(_send_paced, sock, [datagram] * sent, (group, port), 2000)
                await _wait_until(lambda: rx.statistics().datagrams + (rx.statistics().kernel_drops or 0)
                                  >= sent, "every datagram", 30)
                await _wait_until(lambda: rx.statistics().messages >= rx.statistics().datagrams,
                                  "every datagram decoded", 10)
                await _wait_until(lambda: got[0] >= rx.statistics().messages, "the consumer", 10)
                nursery.cancel_scope.cancel()
            stats = rx.statistics()
    finally:
        sock.close()
    return dict(base_kib=base, peak_kib=_rss_kib("VmHWM"), kept=ticker.kept(), worst_gap=max(ticker.gaps),
                datagrams=stats.datagrams, messages=stats.messages, got=got[0], dropped=stats.dropped,
                malformed=stats.malformed, kernel_drops=stats.kernel_drops)


def test_a_flood_of_accepted_dense_datagrams_stays_near_max_queue_bytes(ep):
    """Peak RSS of the receiving process (a child, VmHWM) while it takes a
    flood of accepted 64 kB datagrams of two-byte strings (about 0.9 MB of
    objects each, the estimate right), ``max_queue_bytes`` 8 MiB, consumer
    keeping up: it grew 460 MiB. An item is one receive batch of up to
    ``batch_size`` (256) datagrams, decoded whole and never refused for its
    size when the channel is empty: 256 x 0.9 MB per item, whatever
    ``max_queue_bytes`` says. Growth must stay within the bound plus the
    100 MiB test_mcl_bombs allows for a flood."""
    import json
    import subprocess
    import sys

    group, port = ep
    done = subprocess.run([sys.executable, __file__, "string_flood", group, str(port)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=_PACKAGE_PARENT))
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    # Everything accounted for.
    assert r["messages"] == r["datagrams"] == r["got"] and r["malformed"] == 0, r
    assert r["datagrams"] + (r["kernel_drops"] or 0) == 2000, r
    growth_mib = (r["peak_kib"] - r["base_kib"]) / 1024
    assert growth_mib < 8 + 100, f"peak RSS grew {growth_mib:.0f} MiB under max_queue_bytes=8 MiB: {r}"


async def test_a_shared_send_channel_does_not_drop_when_it_holds_far_less_than_max_queue_bytes(ep):
    """Two receivers (two groups) send into one channel, clones of a
    user-supplied ``send_channel`` (the usual way to merge sources),
    ``max_queue_bytes`` 4 MiB, ``drop_newest``. Receiver A delivers three
    1.2 MB messages, which the consumer takes; receiver B delivers ten small
    messages, which the consumer leaves queued; A receives one more 1.2 MB
    message. The channel then holds ten small messages (about 1 kB): A's
    message must go in, not be dropped. (A forgets the cost of an item only
    when the channel holds fewer items than it sent, counting B's items as
    its own: it believes its three taken messages still queued.)"""
    import functools

    from mcast_trio import serve_receiver

    group_a, port = ep
    group_b = group_a.rsplit(".", 1)[0] + ".251"
    big = [bytes([66 + k]) * 1_200_000 for k in range(4)]
    sock = plain_sender()
    got: list = []
    try:
        async with trio.open_nursery() as nursery:
            send, receive = trio.open_memory_channel(256)
            options = dict(framing="mcl", overflow="drop_newest", max_queue_bytes=4 * MiB)
            a = await nursery.start(functools.partial(serve_receiver, group_a, port, send.clone(), **options))
            b = await nursery.start(functools.partial(serve_receiver, group_b, port, send.clone(), **options))
            send.close()

            def send_big(k):
                for frame in _chunks(b"big", msgpack.packb(big[k])):
                    sock.sendto(frame, (group_a, port))
                    time.sleep(0.001)

            async def take(n):
                while sum(len(item) for item in got) < n:
                    with trio.fail_after(5):
                        got.append(await receive.receive())

            for k in range(3):
                await trio.to_thread.run_sync(send_big, k)
            await take(3)
            for k in range(10):
                sock.sendto(msgpack.packb([b"small", b"%d" % k]), (group_b, port))
                await trio.sleep(0.01)
            await _wait_until(lambda: b.statistics().messages >= 10, "B's messages", 5)
            await trio.to_thread.run_sync(send_big, 3)
            await _wait_until(lambda: a.statistics().messages >= 4, "A's last message", 5)
            await trio.sleep(0.1)
            stats_a = a.statistics()
            queued = receive.statistics().current_buffer_used
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
    assert stats_a.kernel_drops == 0 and stats_a.malformed == 0, stats_a
    assert stats_a.dropped == 0, (
        f"A dropped {stats_a.dropped} message(s) while the channel held {queued} small items "
        f"(about 1 kB) under max_queue_bytes=4 MiB")


#: ``[b"imu", [[[...1020 levels...[nil]...]]], 9000 bytes]]``: 9,040 bytes,
#: 1,021 containers (the density bound allows 1,130): accepted by the MCL
#: decoder, yet deeper than Python's repr() and json.dumps() can go.
DEEP = b"\x92\xa3imu\x92" + b"\x91" * 1020 + b"\xc0" + b"\xc5" + (9000).to_bytes(2, "big") + b"p" * 9000


@pytest.mark.parametrize("command", [["listen", "--messages"], ["listen", "--messages", "--json"],
                                     ["record", "OUT", "--messages"]])
def test_mcl_tools_survive_a_deeply_nested_payload(ep, tmp_path, command):
    """One 9 kB datagram whose payload nests 1,020 lists (within the density
    bound) ends ``listen --messages --framing mcl`` (text and --json) and
    ``record --messages --framing mcl`` with a RecursionError traceback,
    exit 1. The tools must survive it (refuse it as malformed, or print what
    they can) and deliver the next message; SIGINT exits 0."""
    import signal
    import subprocess
    import sys

    group, port = ep
    command = [str(tmp_path / "run.apx") if arg == "OUT" else arg for arg in command]
    env = dict(os.environ, PYTHONPATH=_PACKAGE_PARENT)
    proc = subprocess.Popen([sys.executable, "-m", "mcast_trio.cli", *command, "--framing", "mcl",
                             "-g", group, "-p", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        proc.stderr.readline()  # joined / recording
        time.sleep(0.2)
        sock = plain_sender()
        try:
            for datagram in [DEEP, msgpack.packb([b"imu", b"after"])]:
                sock.sendto(datagram, (group, port))
                time.sleep(0.05)
        finally:
            sock.close()
        time.sleep(0.3)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert alive and proc.returncode == 0, f"exit {proc.returncode}: {err[-400:]}"
    assert "Traceback" not in err, err[-400:]
    if command[0] == "listen":
        assert "after" in out or b"after".hex() in out, out[-300:]


async def test_max_queue_bytes_charges_the_topic_of_queued_messages(ep):
    """MCL messages with 60 kB topics and 1-byte payloads, ``max_queue_bytes``
    4 MiB, ``drop_newest``, a stalled consumer: the topic is charged to the
    reassembly bound now, but not to the channel's: each queued message is
    charged about 225 bytes for 60 kB held, so the channel took 260 of
    300 (15.6 MB, stopped by queue_size=256 items, not by bytes; with the
    default batch_size an item may hold 256 such messages). What the stalled consumer finds queued must hold at most the
    bound plus one item."""
    group, port = ep
    bound = 4 * MiB
    datagrams = [msgpack.packb([b"%05d" % k + b"T" * 59995, b"x"], use_bin_type=False) for k in range(300)]
    sock = plain_sender()
    got: list = []
    try:
        async with open_receiver(group, port, framing="mcl", overflow="drop_newest",
                                 max_queue_bytes=bound, batch_size=8) as rx:
            await trio.sleep(0.1)
            await trio.to_thread.run_sync(_send_paced, sock, datagrams, (group, port), 1000)
            await _wait_until(lambda: rx.statistics().datagrams + (rx.statistics().kernel_drops or 0)
                              >= len(datagrams), "every datagram", 10)
            stats = rx.statistics()
            with trio.move_on_after(0.5):
                async for message in rx:
                    got.append(message)
    finally:
        sock.close()
    assert stats.kernel_drops == 0 and stats.malformed == 0, stats
    assert len(got) + stats.dropped == len(datagrams), (len(got), stats)
    held = sum(len(m.topic) + len(m.payload) for m in got)
    assert held <= bound + 8 * 65000, (
        f"the stalled consumer's channel held {len(got)} messages, {held / MiB:.1f} MiB of topics, "
        f"under max_queue_bytes={bound / MiB:.0f} MiB")


async def test_a_receiver_blocked_on_max_queue_bytes_does_not_spin(ep):
    """``overflow="block"``, ``max_queue_bytes`` 100 kB, a consumer that
    stalls: two 50 kB messages fill the bound and the receive task waits
    for room in bytes by polling every millisecond: the process burns 15 %
    of a core for as long as the consumer stalls (waiting for room in items
    costs nothing). Blocked, it must stay under 5 %; everything is delivered
    once the consumer resumes."""
    import resource

    group, port = ep
    sock = plain_sender()
    got = 0
    try:
        async with open_receiver(group, port, framing="mcl", overflow="block", max_queue_bytes=100_000,
                                 queue_size=1000, batch_size=1) as rx:
            for _ in range(20):
                sock.sendto(msgpack.packb([b"t", b"x" * 50000]), (group, port))
            await trio.sleep(0.3)
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            await trio.sleep(1.5)
            r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            with trio.move_on_after(1):
                async for _ in rx:
                    got += 1
            stats = rx.statistics()
    finally:
        sock.close()
    cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / (t1 - t0)
    assert got == 20 and stats.dropped == 0 and stats.kernel_drops == 0, (got, stats)
    assert cpu < 0.05, f"the blocked receiver used {cpu:.0%} of a core while its consumer stalled"


def test_listen_json_mcl_emits_strict_json_for_nan_and_infinity(ep):
    """``listen --messages --framing mcl --json`` given MCL payloads ``nan``
    and ``[inf, 1.5]`` (any sender can send them) printed ``"payload":NaN``
    and ``[Infinity,1.5]``: not JSON (RFC 8259), refused by strict parsers
    (the same fault as issue 13.13 for ``info --json``). Every line must
    parse strictly."""
    import json
    import signal
    import subprocess
    import sys

    group, port = ep
    env = dict(os.environ, PYTHONPATH=_PACKAGE_PARENT)
    proc = subprocess.Popen([sys.executable, "-m", "mcast_trio.cli", "listen", "--messages", "--framing", "mcl",
                             "--json", "-g", group, "-p", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert "joined" in proc.stderr.readline()
        sock = plain_sender()
        try:
            for payload in [float("nan"), [float("inf"), 1.5], b"after"]:
                sock.sendto(msgpack.packb([b"imu", payload], use_bin_type=False), (group, port))
                time.sleep(0.05)
        finally:
            sock.close()
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    lines = out.splitlines()
    assert len(lines) == 3, out
    for line in lines:
        try:
            json.loads(line, parse_constant=strict)
        except ValueError as exc:
            pytest.fail(f"not strict JSON ({exc}): {line}")


async def _scenario_unbuffered_drop_oldest(group: str, port: int) -> dict:
    """serve_receiver into a user-supplied unbuffered channel
    (``trio.open_memory_channel(0)``), ``drop_channel`` its receive side's
    clone, ``overflow="drop_oldest"``, a consumer that takes one message
    every 200 ms; five small messages arrive."""
    import functools

    from mcast_trio import serve_receiver

    sock = plain_sender()
    got = []
    try:
        with trio.move_on_after(3):
            async with trio.open_nursery() as nursery:
                send, receive = trio.open_memory_channel(0)
                try:
                    service = await nursery.start(functools.partial(
                        serve_receiver, group, port, send, drop_channel=receive.clone(), framing="mcl",
                        overflow="drop_oldest"))
                except (ValueError, TypeError) as exc:  # refusing it is fine
                    return dict(refused=str(exc))

                async def consume():
                    async for item in receive:
                        got.extend(item)
                        await trio.sleep(0.2)

                nursery.start_soon(consume)
                for k in range(5):
                    sock.sendto(msgpack.packb([b"t", b"%d" % k]), (group, port))
                    await trio.sleep(0.01)
                await trio.sleep(1.5)
                stats = service.statistics()
                nursery.cancel_scope.cancel()
    finally:
        sock.close()
    return dict(got=len(got), dropped=stats.dropped, messages=stats.messages)


def test_drop_oldest_into_an_unbuffered_user_channel_does_not_hang(ep):
    """``overflow="drop_oldest"`` with a user-supplied unbuffered channel:
    when a message arrives while the consumer is not waiting, the receive
    task loops forever between ``send_nowait`` (WouldBlock: nobody waiting)
    and ``drop_channel.receive_nowait`` (WouldBlock: nothing buffered)
    without a checkpoint: the whole trio loop freezes, cancellation
    included (the child is killed after 8 s). It must either refuse
    the channel before starting or account for every message
    (got + dropped == messages) and finish."""
    import json
    import subprocess
    import sys

    group, port = ep
    try:
        done = subprocess.run([sys.executable, __file__, "unbuffered_drop_oldest", group, str(port)],
                              capture_output=True, text=True, timeout=8,
                              env=dict(os.environ, PYTHONPATH=_PACKAGE_PARENT))
    except subprocess.TimeoutExpired:
        pytest.fail("the receiving process hung (event loop frozen) for 8 s")
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    if "refused" not in r:
        assert r["messages"] == 5 and r["got"] + r["dropped"] == 5, r


_SCENARIOS.update(string_flood=_scenario_string_flood, unbuffered_drop_oldest=_scenario_unbuffered_drop_oldest)


# ---------------------------------------------------------------------------

if __name__ == "__main__":
    # A child process of the tests above: SCENARIO GROUP PORT [ARGS...]
    name, group, port, *rest = sys.argv[1:]
    result = trio.run(_SCENARIOS[name], group, int(port), *rest)
    print(json.dumps(result))
