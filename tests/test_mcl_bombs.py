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

if __name__ == "__main__":
    # A child process of the tests above: SCENARIO GROUP PORT [ARGS...]
    name, group, port, *rest = sys.argv[1:]
    result = trio.run(_SCENARIOS[name], group, int(port), *rest)
    print(json.dumps(result))
