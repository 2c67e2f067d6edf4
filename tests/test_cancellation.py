"""Cancellation of senders, receivers and consumers at every await point,
over real multicast sockets.

A trio :class:`~trio.abc.Instrument` cancels an enclosing cancel scope
right before the k-th task step of the run, for k = 1, 2, ... until the
scenario completes without being cancelled; so cancellation lands at every
point where any task (the test's, the sender's, the receive task, the
consumer) yields to the scheduler. After each run: no leaked descriptor, no
group still joined, no task left, the counters consistent, and a receiver
re-opened on the same group and port right away receives.

Sends real datagrams: runs only inside a private network namespace
(``/work/shared/tools/netns-run``), like ``tests/test_transport.py``.
"""

from __future__ import annotations

import itertools
import os

import pytest
import trio

from mcast_trio.testing import isolation_problem, joined_ipv4_groups, open_fd_count
from mcast_trio import AstroPix4Readout, open_receiver, open_sender
from mcast_trio.sim import DaqSimulator



_PROBLEM = isolation_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")

_serial = itertools.count()
_BASE_PORT = 56000 + os.getpid() % 1000 * 3
MAX_STEPS = 3000  # a scenario that needs more task steps than this is a bug


@pytest.fixture
def ep() -> tuple[str, int]:
    n = next(_serial)
    return f"239.255.91.{n % 250 + 1}", _BASE_PORT + n


def readouts_for(n: int, seed: int = 0) -> list[AstroPix4Readout]:
    return DaqSimulator(seed, start_ns=0, mean_hits=1.0).readouts(n)






def task_count() -> int:
    def walk(task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries
                       for child in nursery.child_tasks)
    return walk(trio.lowlevel.current_root_task())


class CancelAtStep(trio.abc.Instrument):
    """Cancel ``scope`` right before the ``k``-th task step (of any task)."""

    def __init__(self, k: int, scope: trio.CancelScope) -> None:
        self.k = k
        self.scope = scope
        self.steps = 0

    @property
    def fired(self) -> bool:
        return self.steps >= self.k

    def before_task_step(self, task) -> None:
        self.steps += 1
        if self.steps == self.k:
            self.scope.cancel()


async def run_cancelled_at(k: int, body) -> CancelAtStep:
    """Run ``body()`` in a cancel scope that the k-th task step cancels."""
    with trio.CancelScope() as scope:
        instrument = CancelAtStep(k, scope)
        trio.lowlevel.add_instrument(instrument)
        try:
            await body()
        finally:
            trio.lowlevel.remove_instrument(instrument)
    return instrument


async def receive_one(group: str, port: int, readout: AstroPix4Readout) -> None:
    """A receiver opened on ``group``:``port`` right now receives ``readout``."""
    with trio.fail_after(3):
        async with open_receiver(group, port, AstroPix4Readout) as rx:
            async with open_sender(group, port) as tx:
                await tx.send_readout(readout)
            assert await rx.receive() == readout


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sweep", range(4))  # trio shuffles its run queue: vary
async def test_cancellation_at_every_task_step_leaks_nothing(ep, sweep):
    group, port = ep
    readouts = readouts_for(24, seed=1)
    probe = readouts_for(1, seed=2)[0]
    await receive_one(group, port, probe)  # warm up (first-use allocations)
    fds, tasks = open_fd_count(), task_count()
    assert group not in joined_ipv4_groups()

    for k in range(1, MAX_STEPS + 1):
        state: dict = {"got": [], "completed": False}

        async def consume(rx):
            while len(state["got"]) < len(readouts):
                state["got"].append(await rx.receive())

        async def scenario():
            async with open_receiver(group, port, AstroPix4Readout, batch_size=4) as rx:
                state["rx"] = rx
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(consume, rx)
                    async with open_sender(group, port, queue_size=2) as tx:
                        state["tx"] = tx
                        await tx.send_many(readouts[:8])
                        for r in readouts[8:16]:
                            await tx.send_readout(r)
                        for r in readouts[16:]:
                            await tx.send(r.to_bytes())
            state["completed"] = True

        with trio.fail_after(5):
            instrument = await run_cancelled_at(k, scenario)

        where = f"cancelled before task step {k}"
        assert open_fd_count() == fds, f"{where}: a file descriptor leaked"
        assert group not in joined_ipv4_groups(), f"{where}: the group is still joined"
        assert task_count() == tasks, f"{where}: a task was left behind"
        got = state["got"]
        assert got == readouts[:len(got)], f"{where}: received {got}"
        if "tx" in state:
            s = state["tx"].statistics()
            assert s.queued == 0 and s.unsent >= 0 and s.errors == 0, f"{where}: {s}"
            assert s.datagrams + s.unsent == s.messages, f"{where}: {s}"
        if "rx" in state:
            s = state["rx"].statistics()
            # Datagrams still queued at close are counted, never decoded.
            assert s.readouts + s.discarded == s.datagrams and s.malformed == 0 and s.lost == 0, \
                f"{where}: {s}"
            if "tx" in state:
                assert s.datagrams <= state["tx"].statistics().datagrams, f"{where}: {s}"
        if not instrument.fired:
            # k is past the last step: the scenario ran to completion.
            assert state["completed"] and got == readouts
            assert k > 10, "the scenario took suspiciously few task steps"
            break
        await receive_one(group, port, probe)
        assert open_fd_count() == fds and group not in joined_ipv4_groups()
    else:
        pytest.fail(f"the scenario was still being cancelled after {MAX_STEPS} task steps")


async def test_cancelled_consumer_loses_nothing_already_delivered(ep):
    group, port = ep
    readouts = readouts_for(20, seed=3)
    for k in range(1, MAX_STEPS + 1):
        got: list = []

        async def consume():
            while len(got) < len(readouts):
                got.append(await rx.receive())

        async def send_all(tx):
            for start in range(0, 20, 5):
                await tx.send_many(readouts[start:start + 5])
                await trio.sleep(0)

        with trio.fail_after(5):
            async with open_receiver(group, port, AstroPix4Readout, batch_size=3) as rx:
                async with open_sender(group, port) as tx, trio.open_nursery() as nursery:
                    nursery.start_soon(send_all, tx)
                    instrument = await run_cancelled_at(k, consume)
                    # Whatever the cancelled receive() had not returned is
                    # still there for the next one.
                    await consume()
                stats = rx.statistics()
        assert got == readouts, f"cancelled before task step {k}: got {[r.readout_id for r in got]}"
        assert stats.dropped == 0 and stats.readouts == 20
        if not instrument.fired:
            assert k > 5
            break
    else:
        pytest.fail(f"the consumer was still being cancelled after {MAX_STEPS} task steps")


async def test_cancelled_wait_in_receive_then_next_receive_gets_the_data(ep):
    group, port = ep
    readouts = readouts_for(3, seed=4)
    async with open_receiver(group, port, AstroPix4Readout) as rx:
        with trio.move_on_after(0.05) as scope:
            await rx.receive()  # nothing was sent: waits until cancelled
        assert scope.cancelled_caught
        async with open_sender(group, port) as tx:
            await tx.send_many(readouts)
        with trio.fail_after(3):
            assert [await rx.receive() for _ in readouts] == readouts


async def test_leaving_the_sender_normally_sends_everything_queued(ep):
    group, port = ep
    n = 3000
    wire = DaqSimulator(5, start_ns=0, mean_hits=0.5).datagrams(n)
    async with open_receiver(group, port, AstroPix4Readout) as rx:
        async with open_sender(group, port, queue_size=n) as tx:
            for data in wire:
                tx.send_nowait(data)  # no checkpoint: all queued at once
            assert tx.statistics().queued == n
        stats = tx.statistics()
        with trio.fail_after(5):
            got = [await rx.receive() for _ in range(n)]
    assert (stats.datagrams, stats.unsent, stats.queued, stats.errors) == (n, 0, 0, 0)
    assert [r.readout_id for r in got] == list(range(n))


async def test_cancelling_the_sender_counts_what_was_left_as_unsent(ep):
    group, port = ep
    n = 3000
    wire = DaqSimulator(6, start_ns=0, mean_hits=0.5).datagrams(n + 1)
    async with open_receiver(group, port, AstroPix4Readout) as rx:
        with trio.CancelScope() as scope:
            async with open_sender(group, port, queue_size=n) as tx:
                for data in wire[:n]:
                    tx.send_nowait(data)
                scope.cancel()
        assert scope.cancelled_caught
        stats = tx.statistics()
        assert stats.unsent > 0 and stats.datagrams > 0, stats
        assert stats.datagrams + stats.unsent == n and stats.queued == 0
        with trio.fail_after(5):
            got = [await rx.receive() for _ in range(stats.datagrams)]
            # nothing else arrives before the next datagram sent
            async with open_sender(group, port) as tx2:
                await tx2.send(wire[n])
            last = await rx.receive()
    assert [r.readout_id for r in got] == list(range(stats.datagrams))
    assert last.readout_id == n
    with pytest.raises(trio.ClosedResourceError):
        await tx.send(wire[0])
