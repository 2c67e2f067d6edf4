"""The fault-injecting relay over real sockets: a sender multicasts to group
A, :func:`~mcast_trio.testing.serve_fault_relay` re-emits group A on group B
with :class:`~mcast_trio.testing.LinkRules` applied, and a receiver on B
reports per-sender statistics that must equal the faults the relay injected,
exactly. One test has the sender in a separate process, the use case the
relay exists for (programs that are not in-process); one checks that a delay
is a delay in real time.

Everything here sends real datagrams (loopback multicast), so it runs only
inside a private network namespace (``tools/netns-run`` sets
``NETNS_RUN_INSIDE=1``; another harness may set ``MCAST_TRIO_TEST_NETNS=1``)
without a default route; elsewhere the module is skipped with that reason --
the same decision as ``tests/test_sockets.py``, which depends only on *where*
we run, never on whether multicast happens to work.

As in ``tests/test_harness.py``, the first and the last datagram cross a
perfect link: a receiver cannot tell a lost last datagram from silence, nor a
late first one from a restart.
"""

from __future__ import annotations

import itertools
import os
import statistics
import subprocess
import sys
import tempfile
from functools import partial

import pytest
import trio

from mcast_trio.testing import isolation_problem
from mcast_trio import AstroPix4Readout, open_receiver, open_sender
from mcast_trio.sim import DaqSimulator
from mcast_trio.testing import LinkRules, serve_fault_relay


# ---------------------------------------------------------------------------
# Where are we? (mcast_trio.testing.isolation_problem)
# ---------------------------------------------------------------------------


_PROBLEM = isolation_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

_serial = itertools.count()
_BASE_PORT = 46000 + os.getpid() % 1000 * 4


def _endpoints() -> tuple[str, int, str, int]:
    """A fresh (group A, port A, group B, port B) for one test."""
    n = next(_serial)
    return f"239.255.91.{n % 250 + 1}", _BASE_PORT + 2 * n, f"239.255.92.{n % 250 + 1}", _BASE_PORT + 2 * n + 1


async def _until(condition, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.002)


async def _drain(receiver, *, until, timeout: float = 5.0) -> None:
    """Consume batches until ``until(receiver.statistics())`` holds and no
    batch arrived for 20 ms."""
    with trio.fail_after(timeout):
        while True:
            with trio.move_on_after(0.02) as quiet:
                await receiver.receive_batch()
            if quiet.cancelled_caught and until(receiver.statistics()):
                return


def _check_equal(stats, injected, sent: int) -> None:
    """The receiver's statistics equal what the relay injected."""
    assert injected.sent == sent
    assert injected.delivered == sent - injected.lost + injected.duplicated
    assert stats.datagrams == injected.delivered
    (sender_stats,) = stats.senders.values()  # the relay's socket
    assert sender_stats.lost == injected.lost
    assert sender_stats.duplicates == injected.duplicated
    assert sender_stats.reordered == injected.reordered
    assert sender_stats.restarts == 0
    assert sender_stats.received == sent - injected.lost
    assert stats.lost == injected.lost and stats.malformed == 0
    assert stats.kernel_drops in (0, None) and stats.dropped == 0


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
async def test_receiver_statistics_equal_the_relays_injected_faults(seed):
    group_a, port_a, group_b, port_b = _endpoints()
    sim = DaqSimulator(seed=seed, start_ns=0, mean_hits=1.0)
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(partial(serve_fault_relay, group_a, port_a, group_b, port_b,
                                            LinkRules(), seed=seed))
        async with open_receiver(group_b, port_b, AstroPix4Readout, queue_size=4096) as rx:
            async with open_sender(group_a, port_a) as tx:
                await tx.send_many(sim.generate(1).datagrams())
                await _until(lambda: relay.received == 1)
                relay.rules = LinkRules(loss=0.05, duplicate=0.05, reorder=0.08)
                for _ in range(10):
                    await tx.send_many(sim.generate(100).datagrams())
                await _until(lambda: relay.received == 1001)
                relay.rules = LinkRules()
                await tx.send_many(sim.generate(1).datagrams())
                await _until(lambda: relay.received == 1002)
            injected = relay.faults
            await _drain(rx, until=lambda s: s.datagrams == injected.delivered)
            stats = rx.statistics()
        nursery.cancel_scope.cancel()
    assert injected.lost > 0 and injected.duplicated > 0 and injected.reordered > 0
    assert relay.emitted == injected.delivered
    _check_equal(stats, relay.faults, 1002)


# The sender as a separate program: it sends the first readout, the bulk and
# the last readout, each after a line on stdin, and says when each is queued.
_SENDER = r"""
import sys
import trio
from mcast_trio import open_sender
from mcast_trio.sim import DaqSimulator

async def main(group, port, bulk):
    sim = DaqSimulator(seed=11, start_ns=0, mean_hits=1.0, split_fraction=0.2)
    async with open_sender(group, port) as tx:
        for name, count in (("first", 1), ("bulk", bulk), ("last", 1)):
            await trio.to_thread.run_sync(sys.stdin.readline)
            await tx.send_many(sim.generate(count).datagrams())
            await trio.sleep(0.01)
            print(name, tx.statistics().datagrams, flush=True)

trio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
"""


async def test_relay_between_a_separate_sender_process_and_a_receiver():
    group_a, port_a, group_b, port_b = _endpoints()
    bulk = 3000
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(partial(serve_fault_relay, group_a, port_a, group_b, port_b,
                                            LinkRules(), seed=42))
        async with open_receiver(group_b, port_b, AstroPix4Readout, queue_size=4096) as rx:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-c", _SENDER, group_a, str(port_a), str(bulk)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=os.environ.copy(),
                cwd=tempfile.gettempdir())  # not the repository: import the installed package
            try:
                lines = b""

                async def step(expected_received: int) -> bytes:
                    nonlocal lines
                    await process.stdin.send_all(b"go\n")
                    with trio.fail_after(10):
                        while b"\n" not in lines:
                            data = await process.stdout.receive_some()
                            assert data, "the sender process ended early"
                            lines += data
                    line, _, lines = lines.partition(b"\n")
                    await _until(lambda: relay.received == expected_received)
                    return line

                assert await step(1) == b"first 1"
                relay.rules = LinkRules(loss=0.03, duplicate=0.03, reorder=0.05)
                assert await step(1 + bulk) == b"bulk %d" % (1 + bulk)
                relay.rules = LinkRules()
                assert await step(2 + bulk) == b"last %d" % (2 + bulk)
                await process.stdin.aclose()
                with trio.fail_after(10):
                    assert await process.wait() == 0
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            injected = relay.faults
            await _drain(rx, until=lambda s: s.datagrams == injected.delivered)
            stats = rx.statistics()
        nursery.cancel_scope.cancel()
    assert injected.lost > 0 and injected.duplicated > 0 and injected.reordered > 0
    _check_equal(stats, injected, 2 + bulk)
    # Every relayed datagram (duplicates included) was a well-formed readout.
    assert stats.readouts == stats.datagrams and stats.hits > 0


async def test_delay_is_real_time():
    group_a, port_a, group_b, port_b = _endpoints()
    delay = 0.05
    sent: dict[int, float] = {}
    arrived: dict[int, float] = {}
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(partial(serve_fault_relay, group_a, port_a, group_b, port_b,
                                            LinkRules(), seed=0))
        async with open_receiver(group_b, port_b, AstroPix4Readout) as rx:

            async def consume():
                async for readout in rx:
                    arrived[readout.readout_id] = trio.current_time()

            nursery.start_soon(consume)
            async with open_sender(group_a, port_a) as tx:
                for rid in range(20):
                    if rid == 10:
                        relay.rules = LinkRules(delay=delay)
                    sent[rid] = trio.current_time()
                    await tx.send_readout(AstroPix4Readout(b"\xbc\xbc", rid, rid))
                    await trio.sleep(0.01)
            await _until(lambda: len(arrived) == 20)
            nursery.cancel_scope.cancel()
    latency = {rid: arrived[rid] - sent[rid] for rid in sent}
    assert sorted(arrived, key=arrived.get) == list(range(20))  # in order
    # A perfect link relays at once; a delayed one holds every datagram for
    # at least the delay (timed from when the relay received it).
    assert statistics.median(latency[r] for r in range(10)) < delay
    assert min(latency[r] for r in range(10, 20)) >= delay
    assert max(latency[r] for r in range(10, 20)) < delay + 0.5
    assert relay.faults.delivered == 20


async def test_truncation_by_the_relay_is_counted_as_malformed():
    group_a, port_a, group_b, port_b = _endpoints()
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(partial(serve_fault_relay, group_a, port_a, group_b, port_b,
                                            LinkRules(truncate=1.0), seed=3))
        async with open_receiver(group_b, port_b, AstroPix4Readout) as rx:
            async with open_sender(group_a, port_a) as tx:
                await tx.send_many(DaqSimulator(seed=1, start_ns=0).generate(200).datagrams())
            await _drain(rx, until=lambda s: s.datagrams == 200)
            stats = rx.statistics()
        nursery.cancel_scope.cancel()
    assert relay.faults.truncated == 200
    assert stats.malformed == 200 and stats.readouts == 0
