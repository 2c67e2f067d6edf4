"""mcast_trio.testing: the in-memory network, its faults, and the figures the
harness must prove (exact counts, fragments under faults, slow consumers,
cancellation at random points)."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
import trio

import mcast_trio
from mcast_trio import AstroPix4Readout, open_receiver, open_sender
from mcast_trio.sim import DaqSimulator
from mcast_trio.testing import FaultCounts, LinkRules, MemoryNetwork, use_network

GROUP = "239.255.42.1"
PORT = 42001


async def _drain(receiver, *, until, timeout: float = 5.0) -> list:
    """Consume batches until ``until(receiver.statistics())`` holds and no
    batch is left in the channel."""
    got = []
    with trio.fail_after(timeout):
        while True:
            with trio.move_on_after(0.02) as quiet:
                got.append(await receiver.receive_batch())
            if quiet.cancelled_caught and until(receiver.statistics()):
                return got


async def test_real_api_runs_over_the_memory_network():
    net = MemoryNetwork(seed=1)
    sim = DaqSimulator(seed=2, keep_truth=True, start_ns=0, split_fraction=0.1)
    with use_network(net):
        async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout) as rx:
            async with open_sender(GROUP, PORT) as tx:
                await tx.send_many(sim.generate(500).datagrams())
            batches = await _drain(rx, until=lambda s: s.readouts == 500)
    hits = np.concatenate([b.hits for b in batches])
    assert (hits.view(np.ndarray) == sim.truth.view(np.ndarray)).all()
    assert net.faults == FaultCounts(sent=500, delivered=500)
    assert net.members(GROUP, PORT) == 0  # left on exit


@pytest.mark.parametrize("seed", range(6))
async def test_raw_mode_statistics_equal_injected_faults(seed):
    # The first and the last readout cross a perfect link: a receiver cannot
    # tell a lost last datagram from silence, nor a late first one from a
    # restart (see SequenceTracker).
    net = MemoryNetwork(seed=seed)
    sim = DaqSimulator(seed=seed, start_ns=0, mean_hits=1.0)
    with use_network(net):
        async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout, queue_size=4096) as rx:
            async with open_sender(GROUP, PORT) as tx:
                await tx.send_readout(sim.readouts(1)[0])
                await tx.flush()  # rules apply when datagrams leave, not when queued
                net.set_rules(LinkRules(loss=0.05, duplicate=0.05, reorder=0.08))
                for _ in range(10):
                    await tx.send_many(sim.generate(100).datagrams())
                await tx.flush()
                net.set_rules(LinkRules())
                await tx.send_readout(sim.readouts(1)[0])
            injected = net.faults
            expected = injected.delivered
            await _drain(rx, until=lambda s: s.datagrams == expected)
            stats = rx.statistics()
    assert injected.lost > 0 and injected.duplicated > 0 and injected.reordered > 0
    (sender_stats,) = stats.senders.values()
    assert sender_stats.lost == injected.lost
    assert sender_stats.duplicates == injected.duplicated
    assert sender_stats.reordered == injected.reordered
    assert sender_stats.restarts == 0
    assert stats.lost == injected.lost and stats.malformed == 0


@pytest.mark.parametrize("seed", range(4))
async def test_native_mode_statistics_equal_injected_faults(seed):
    net = MemoryNetwork(seed=seed)
    with use_network(net):
        async with open_receiver(GROUP, PORT, framing="native", queue_size=4096) as rx:
            async with open_sender(GROUP, PORT, framing="native", topic="t") as tx:
                await tx.send(b"first")
                await tx.flush()
                net.set_rules(LinkRules(loss=0.04, duplicate=0.04, reorder=0.06))
                for i in range(800):
                    await tx.send(b"message %d" % i)
                await tx.flush()
                net.set_rules(LinkRules())
                await tx.send(b"last")
            injected = net.faults
            got = []
            with trio.fail_after(5):
                while len(got) < injected.delivered:
                    got.append(await rx.receive())
            stats = rx.statistics()
    (key, sender_stats), = stats.senders.items()
    assert len(key) == 3  # (host, port, sender_id)
    assert sender_stats.lost == injected.lost
    assert sender_stats.duplicates == injected.duplicated
    assert sender_stats.reordered == injected.reordered


async def test_sender_restart_is_detected():
    net = MemoryNetwork(seed=0)
    with use_network(net):
        async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout) as rx:
            async with open_sender(GROUP, PORT) as tx:
                await tx.send_many(DaqSimulator(seed=1, start_ns=0, start_id=0).generate(3000).datagrams())
                # The DAQ restarts: ids from 0 again.
                await tx.send_many(DaqSimulator(seed=2, start_ns=0, start_id=0).generate(10).datagrams())
            await _drain(rx, until=lambda s: s.datagrams == 3010)
            (stats,) = rx.statistics().senders.values()
    assert stats.restarts == 1
    assert stats.lost == 0 and stats.duplicates == 0 and stats.reordered == 0
    assert stats.received == 3010


def _payload(i: int) -> bytes:
    body = random.Random(i).randbytes(10_000 + (i * 7919) % 30_000)
    return i.to_bytes(4, "little") + hashlib.sha256(body).digest() + body


@pytest.mark.parametrize("seed", range(3))
async def test_fragmented_messages_under_loss_and_reordering(seed):
    net = MemoryNetwork(LinkRules(loss=0.01, reorder=0.05, duplicate=0.01), seed=seed)
    bound = 2 << 20
    sent = {}
    peak = 0
    with use_network(net):
        async with open_receiver(GROUP, PORT, framing="native", max_reassembly_bytes=bound,
                                 reassembly_timeout=0.5, queue_size=1024) as rx:
            async with open_sender(GROUP, PORT, framing="native", max_datagram=1400) as tx:
                for i in range(150):
                    payload = _payload(i)
                    sent[i] = payload
                    await tx.send(payload)
                    peak = max(peak, rx.statistics().reassembly.bytes_buffered)
            delivered = []
            with trio.move_on_after(1.5):
                while True:
                    delivered.append(await rx.receive())
            stats = rx.statistics()
            assert stats.dropped == 0
    assert 0 < len(delivered) < 150  # 1 % loss of ~20 fragments each loses some messages
    for message in delivered:
        i = int.from_bytes(message.payload[:4], "little")
        # Intact, never merged with another message.
        assert message.payload == sent[i]
        assert hashlib.sha256(message.payload[36:]).digest() == message.payload[4:36]
    indices = [int.from_bytes(m.payload[:4], "little") for m in delivered]
    # Duplicated fragments never produce a second copy of a message.
    assert len(indices) == len(set(indices))
    assert peak <= bound
    assert stats.reassembly.bytes_buffered == 0  # incomplete messages expired
    assert stats.reassembly.expired + stats.reassembly.evicted >= 150 - len(delivered) - 1


async def test_delay_uses_the_trio_clock(autojump_clock):
    net = MemoryNetwork(LinkRules(delay=30.0), seed=0)
    with use_network(net):
        async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout) as rx:
            async with open_sender(GROUP, PORT) as tx:
                start = trio.current_time()
                await tx.send_readout(AstroPix4Readout(b"\xbc", 1, 1))
            readout = await rx.receive()
            assert trio.current_time() - start >= 30.0
    assert readout.readout_id == 1


async def test_truncation_and_corruption_are_counted_as_malformed():
    net = MemoryNetwork(LinkRules(truncate=1.0), seed=3)
    with use_network(net):
        async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout) as rx:
            async with open_sender(GROUP, PORT) as tx:
                await tx.send_many(DaqSimulator(seed=1, start_ns=0).generate(200).datagrams())
            await _drain(rx, until=lambda s: s.datagrams == 200)
            stats = rx.statistics()
    assert net.faults.truncated == 200
    assert stats.malformed == 200 and stats.readouts == 0
    assert "length field" in stats.last_error or "shorter than" in stats.last_error


async def test_receive_buffer_overflow_shows_as_kernel_drops():
    net = MemoryNetwork(seed=0)
    with use_network(net):
        async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout, rcvbuf=4096) as rx:
            async with open_sender(GROUP, PORT) as tx:
                # Sent in one go, before the receive task runs again.
                await tx.send_many(DaqSimulator(seed=1, start_ns=0).generate(500).datagrams())
            await _drain(rx, until=lambda s: s.datagrams == net.faults.delivered)
            stats = rx.statistics()
    assert net.faults.overflowed > 0
    assert stats.kernel_drops == net.faults.overflowed
    assert stats.datagrams + stats.kernel_drops == 500


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
async def test_stuck_consumer_never_blocks_the_receive_task(policy):
    net = MemoryNetwork(seed=0)
    with use_network(net):
        async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout, queue_size=2,
                                 overflow=policy, batch_size=16) as rx:
            async with open_sender(GROUP, PORT) as tx:
                sim = DaqSimulator(seed=1, start_ns=0)
                for _ in range(20):
                    await tx.send_many(sim.generate(50).datagrams())
                    await trio.sleep(0)  # the consumer is stuck: it never reads
            with trio.fail_after(5):
                while rx.statistics().datagrams < 1000:
                    await trio.sleep(0.001)
            stats = rx.statistics()
            queued = []
            while True:
                try:
                    queued.append(rx._channel.receive_nowait())
                except trio.WouldBlock:
                    break
    kept = sum(len(chunk.lengths) for chunk in queued)
    assert stats.datagrams == 1000
    assert stats.dropped == 1000 - kept and stats.dropped > 0
    assert stats.dropped_chunks > 0
    ids = np.concatenate([chunk.batch.readouts.readout_id for chunk in queued])
    if policy == "drop_newest":
        assert ids.max() < 100  # the earliest were kept
    else:
        assert ids.min() > 900  # the latest were kept


async def test_crashing_consumer_leaves_everything_closed():
    net = MemoryNetwork(seed=0)
    with use_network(net):
        with pytest.raises(ZeroDivisionError):  # a lone exception comes out as itself
            async with open_sender(GROUP, PORT) as tx:
                async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout) as rx:
                    await tx.send_many(DaqSimulator(seed=1, start_ns=0).generate(10).datagrams())
                    async for _readout in rx:
                        1 / 0
        assert net.members(GROUP, PORT) == 0
        # The sender was unaffected and the group can be joined again at once.
        async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout) as rx:
            async with open_sender(GROUP, PORT) as tx:
                await tx.send_readout(AstroPix4Readout(b"", 5, 5))
            with trio.fail_after(2):
                assert (await rx.receive()).readout_id == 5


class _CancelAfterSteps(trio.abc.Instrument):
    def __init__(self, steps: int, scope: trio.CancelScope) -> None:
        self.remaining = steps
        self.scope = scope

    def before_task_step(self, task) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.scope.cancel()


async def _scenario(net: MemoryNetwork, seed: int) -> None:
    async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout, queue_size=4) as rx:
        async with open_sender(GROUP, PORT, queue_size=2) as tx:
            sim = DaqSimulator(seed=seed, start_ns=0)
            for _ in range(3):
                await tx.send_many(sim.generate(20).datagrams())
                await tx.send_readout(sim.readouts(1)[0])
        count = 0
        async for _readout in rx:
            count += 1
            if count == 60:
                break


async def test_cancellation_at_random_points_leaves_nothing_behind():
    rng = random.Random(1234)
    root = trio.lowlevel.current_root_task()
    before = len(root.child_nurseries[0].child_tasks) if root.child_nurseries else 0
    completed = 0
    for seed in range(300):
        net = MemoryNetwork(seed=seed)
        with use_network(net):
            with trio.CancelScope() as scope:
                instrument = _CancelAfterSteps(rng.randrange(1, 120), scope)
                trio.lowlevel.add_instrument(instrument)
                try:
                    await _scenario(net, seed)
                    completed += 1
                finally:
                    trio.lowlevel.remove_instrument(instrument)
            assert net.members(GROUP, PORT) == 0, f"seed {seed}: group still joined"
            assert all(r._closed for r in net.receivers), f"seed {seed}: receiver endpoint open"
            assert all(s._closed for s in net.senders), f"seed {seed}: sender endpoint open"
            # A receiver restarted on the same group works at once.
            async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout) as rx:
                async with open_sender(GROUP, PORT) as tx:
                    await tx.send_readout(AstroPix4Readout(b"", 9, 9))
                with trio.fail_after(1):
                    assert (await rx.receive()).readout_id == 9
    after = len(root.child_nurseries[0].child_tasks) if root.child_nurseries else 0
    assert after == before  # no task left behind
    assert 0 < completed < 300  # some runs were cancelled, some completed


async def test_plugin_fixtures(mcast_network, mcast_receiver, mcast_sender, mcast_daq):
    daq = mcast_daq(seed=5)
    await mcast_sender.send_many(daq.generate(100).datagrams())
    hits = []
    readouts = 0
    with trio.fail_after(5):
        async for batch in mcast_receiver.batches():
            hits.append(batch.hits)
            readouts += len(batch.readouts)
            if readouts == 100:
                break
    assert (np.concatenate(hits).view(np.ndarray) == daq.truth.view(np.ndarray)).all()
    assert mcast_network.faults.sent == 100


def test_plugin_is_registered_through_its_entry_point(request):
    import os

    if os.environ.get("MCAST_TRIO_REQUIRE_INSTALLED") != "1":
        pytest.skip("entry points exist only for the installed package (make test)")
    assert request.config.pluginmanager.has_plugin("mcast_trio")


@pytest.mark.parametrize("kwargs, text", [
    (dict(loss=1.5), "loss=1.5 is out of range; allowed: a probability in 0.0..1.0"),
    (dict(delay=-1), "delay=-1 is out of range"),
    (dict(reorder="x"), "reorder='x' is out of range"),
])
def test_link_rules_validation(kwargs, text):
    with pytest.raises(ValueError, match=text.replace(".", r"\.").replace("(", r"\(")):
        LinkRules(**kwargs)


def test_exports():
    assert mcast_trio.testing.MemoryNetwork is MemoryNetwork


async def test_sender_bounds_the_datagrams_waiting():
    net = MemoryNetwork(seed=0)
    with use_network(net):
        async with open_sender(GROUP, PORT, max_queued=100) as tx:
            readouts = DaqSimulator(seed=1, start_ns=0).readouts(150)
            # The sender task has not run yet: everything sent now waits.
            for readout in readouts[:100]:
                tx.send_nowait(readout.to_bytes())
            with pytest.raises(trio.WouldBlock):
                tx.send_nowait(readouts[100].to_bytes())
            assert tx.statistics().queued == 100
            # send() waits for room instead, and everything leaves in order.
            await tx.send_many([r.to_bytes() for r in readouts[100:]])
            await tx.flush()
        stats = tx.statistics()
    assert stats.datagrams == 150 and stats.unsent == 0
    with pytest.raises(ValueError, match="max_queued=0 is out of range"):
        async with open_sender(GROUP, PORT, max_queued=0):
            pass


async def test_send_many_fast_path_and_mixed_lists_send_the_same_bytes():
    net = MemoryNetwork(seed=0)
    readouts = DaqSimulator(seed=2, start_ns=0).readouts(20)
    wire = [r.to_bytes() for r in readouts]
    with use_network(net):
        async with open_receiver(GROUP, PORT, framing="raw") as rx:
            async with open_sender(GROUP, PORT) as tx:
                await tx.send_many(wire[:10])  # all serialized readouts: the compiled check
                await tx.send_many([readouts[10], wire[11], bytearray(wire[12]), *wire[13:]])  # mixed
                await tx.send_many([b"not a readout"])  # auto framing: native frame
            got = []
            with trio.fail_after(2):
                while len(got) < 21:
                    got.append((await rx.receive()).payload)
    assert got[:20] == wire
    assert got[20].startswith(b"MCTR")
