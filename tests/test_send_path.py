"""The per-message send path of ``MulticastSender`` (issue 7, part 4) and the
sender-side faults: direct sends from the calling task, ordering behind
queued datagrams, exact statistics, ``max_queued``, cancellation of the fast
path, plain exceptions out of ``open_sender``, ``send_readout(bytes)`` and
malformed readout bytes in ``auto`` framing.

Most tests run over the in-memory network (``MemorySender.pause()`` stands
in for a full socket buffer); the last ones use real sockets inside the
private network namespace.
"""

from __future__ import annotations

import itertools
import os

import pytest
import trio

from mcast_trio import AstroPix4Readout, MalformedReadout, open_receiver, open_sender
from mcast_trio.sim import DaqSimulator
from mcast_trio.testing import MemoryNetwork, isolation_problem, open_fd_count, use_network

GROUP = "239.255.93.1"
PORT = 43101


def wire(n: int, seed: int = 0) -> list[bytes]:
    return DaqSimulator(seed, start_ns=0, mean_hits=1.0).datagrams(n)


async def receive_ids(rx, n: int) -> list[int]:
    with trio.fail_after(5):
        return [(await rx.receive()).readout_id for _ in range(n)]


async def drain_ids(rx) -> list[int]:
    """Every readout the receiver has or gets within 1 s (instant with the
    autojump clock)."""
    ids = []
    while True:
        with trio.move_on_after(1):
            ids.append((await rx.receive()).readout_id)
            continue
        return ids


class StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task) -> None:
        self.steps += 1


# ---------------------------------------------------------------------------
# The direct path
# ---------------------------------------------------------------------------


async def test_await_send_hands_the_datagram_over_before_it_returns():
    net = MemoryNetwork()
    data = wire(100)
    with use_network(net):
        async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout) as rx:
            async with open_sender(GROUP, PORT) as tx:
                for i, datagram in enumerate(data):
                    await tx.send(datagram)
                    s = tx.statistics()
                    assert (s.messages, s.datagrams, s.queued, s.syscalls) == (i + 1, i + 1, 0, i + 1)
                await tx.send_readout(AstroPix4Readout(b"", 100, 0))
                await tx.send_many(wire(5, seed=1))
                s = tx.statistics()
                assert (s.messages, s.datagrams, s.queued) == (106, 106, 0)
                assert s.bytes == sum(map(len, data)) + 19 + sum(map(len, wire(5, seed=1)))
            assert await receive_ids(rx, 106) == list(range(101)) + list(range(5))


async def test_a_loop_of_sends_does_not_switch_tasks_per_message():
    net = MemoryNetwork()
    data = wire(640)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    with use_network(net):
        async with open_sender(GROUP, PORT) as tx, trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.sleep(0)
            counter = StepCounter()
            trio.lowlevel.add_instrument(counter)
            try:
                start = ticks
                for datagram in data:
                    await tx.send(datagram)
            finally:
                trio.lowlevel.remove_instrument(counter)
            ran = ticks - start
            nursery.cancel_scope.cancel()
    assert tx.statistics().datagrams == 640
    # A schedule point every 64 datagrams, not a task switch per message ...
    assert counter.steps <= 2 * (640 // 64) + 4, counter.steps
    # ... and yet the other task is not starved.
    assert ran >= 640 // 64 - 1, ran


async def test_queued_datagrams_are_never_overtaken():
    net = MemoryNetwork()
    data = wire(8)
    with use_network(net):
        async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout) as rx:
            async with open_sender(GROUP, PORT) as tx:
                endpoint = net.senders[-1]
                endpoint.pause()  # the socket buffer is full
                await tx.send(data[0])  # tried directly, then queued
                s = tx.statistics()
                assert (s.messages, s.datagrams, s.queued) == (1, 0, 1)
                tx.send_nowait(data[1])
                await tx.send(data[2])  # something is queued: no direct send
                await tx.send_readout(AstroPix4Readout.from_bytes(data[3]))
                await tx.send_many(data[4:6])
                s = tx.statistics()
                assert (s.messages, s.datagrams, s.queued) == (6, 0, 6)
                endpoint.resume()
                with trio.fail_after(5):
                    await tx.flush()
                s = tx.statistics()
                assert (s.messages, s.datagrams, s.queued, s.unsent) == (6, 6, 0, 0)
                assert s.waits >= 1
                await tx.send(data[6])  # nothing queued: direct again
                assert tx.statistics().datagrams == 7
                tx.send_nowait(data[7])  # always queued
                assert tx.statistics().queued == 1
            assert await receive_ids(rx, 8) == list(range(8))


async def test_max_queued_holds_with_the_direct_path(autojump_clock):
    net = MemoryNetwork()
    data = wire(5)
    with use_network(net):
        async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout) as rx:
            async with open_sender(GROUP, PORT, max_queued=3) as tx:
                endpoint = net.senders[-1]
                endpoint.pause()
                await tx.send(data[0])
                tx.send_nowait(data[1])
                tx.send_nowait(data[2])
                with pytest.raises(trio.WouldBlock):
                    tx.send_nowait(data[3])
                with trio.move_on_after(1) as scope:
                    await tx.send(data[3])  # waits for room
                assert scope.cancelled_caught
                s = tx.statistics()
                assert (s.messages, s.queued, s.datagrams) == (3, 3, 0)
                endpoint.resume()
                await tx.send(data[3])
                await tx.send(data[4])
                await tx.flush()
                s = tx.statistics()
                assert (s.messages, s.queued, s.datagrams, s.unsent) == (5, 0, 5, 0)
            assert await receive_ids(rx, 5) == list(range(5))


async def test_a_fragmented_message_goes_out_directly_and_whole():
    net = MemoryNetwork()
    with use_network(net):
        async with open_receiver(GROUP, PORT, framing="native") as rx:
            async with open_sender(GROUP, PORT, framing="native", max_datagram=512) as tx:
                payload = bytes(range(256)) * 20
                await tx.send(payload)
                s = tx.statistics()
                assert s.datagrams > 1 and s.queued == 0
                assert s.messages == 1
            with trio.fail_after(5):
                message = await rx.receive()
    assert message.payload == payload


class _BatchOnlyEndpoint:
    """A sender endpoint with only the required methods of the network seam
    (no ``send_one``), over a memory network endpoint."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.send_batch = inner.send_batch
        self.wait_writable = inner.wait_writable
        self.close = inner.close


class _BatchOnlyNetwork(MemoryNetwork):
    def open_sender(self, spec, **options):
        return _BatchOnlyEndpoint(super().open_sender(spec, **options))


async def test_an_endpoint_without_send_one_gets_one_item_batches():
    net = _BatchOnlyNetwork()
    data = wire(4)
    with use_network(net):
        async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout) as rx:
            async with open_sender(GROUP, PORT) as tx:
                await tx.send(data[0])
                assert tx.statistics().datagrams == 1
                net.senders[-1].pause()
                await tx.send(data[1])
                await tx.send(data[2])
                assert tx.statistics().queued == 2
                net.senders[-1].resume()
                await tx.send(data[3])
            s = tx.statistics()
            assert (s.messages, s.datagrams, s.queued, s.unsent) == (4, 4, 0, 0)
            assert await receive_ids(rx, 4) == list(range(4))


# ---------------------------------------------------------------------------
# Cancellation of the fast path
# ---------------------------------------------------------------------------


async def test_a_cancelled_send_sends_and_queues_nothing():
    net = MemoryNetwork()
    data = wire(2)
    with use_network(net):
        async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout) as rx:
            async with open_sender(GROUP, PORT) as tx:
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await tx.send(data[0])
                assert scope.cancelled_caught
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await tx.send_many(data)
                assert scope.cancelled_caught
                s = tx.statistics()
                assert (s.messages, s.datagrams, s.queued, s.syscalls) == (0, 0, 0, 0)
                await tx.send(data[1])
            assert await receive_ids(rx, 1) == [1]


class _CancelAtStep(trio.abc.Instrument):
    def __init__(self, k: int, scope: trio.CancelScope) -> None:
        self.k, self.scope, self.steps = k, scope, 0

    def before_task_step(self, task) -> None:
        self.steps += 1
        if self.steps == self.k:
            self.scope.cancel()


@pytest.mark.parametrize("pause_at", [None, 70])
async def test_cancellation_at_every_step_of_a_send_loop(autojump_clock, pause_at):
    data = wire(200, seed=3)
    for k in itertools.count(1):
        assert k < 2000, "the scenario never completes"
        net = MemoryNetwork()
        state = {"returned": 0}
        with use_network(net):
            async with open_receiver(GROUP, PORT, readout_class=AstroPix4Readout) as rx:
                with trio.CancelScope() as scope:
                    instrument = _CancelAtStep(k, scope)
                    trio.lowlevel.add_instrument(instrument)
                    try:
                        async with open_sender(GROUP, PORT) as tx:
                            state["tx"] = tx
                            for i, datagram in enumerate(data):
                                if i == pause_at:
                                    net.senders[-1].pause()
                                if pause_at is not None and i == pause_at + 30:
                                    net.senders[-1].resume()
                                await tx.send(datagram)
                                state["returned"] = i + 1
                    finally:
                        trio.lowlevel.remove_instrument(instrument)
                got = await drain_ids(rx)
        where = f"cancelled before task step {k}"
        returned = state["returned"]
        if "tx" in state:
            s = state["tx"].statistics()
            # Every send that returned was sent or queued (then dropped as
            # unsent); the cancelled one was neither.
            assert s.messages == returned, f"{where}: {s}, {returned} returned"
            assert s.datagrams + s.unsent == returned and s.queued == 0, f"{where}: {s}"
            assert got == list(range(s.datagrams)), f"{where}: {s}, got {got}"
            if pause_at is None:
                assert s.unsent == 0, f"{where}: {s}"
        if instrument.steps < k:
            assert returned == len(data) and got == list(range(len(data)))
            break


# ---------------------------------------------------------------------------
# Exceptions come out as themselves
# ---------------------------------------------------------------------------


async def test_an_exception_in_the_block_comes_out_as_itself():
    net = MemoryNetwork()
    with use_network(net):
        try:
            async with open_sender(GROUP, PORT) as tx:
                await tx.send(b"x")
                {}["missing"]
        except KeyError as exc:
            assert exc.args == ("missing",)
        else:
            pytest.fail("the KeyError did not come out")
        assert all(sender._closed for sender in net.senders)


async def test_an_error_on_opening_comes_out_as_itself():
    with pytest.raises(ValueError, match="queue_size=0"):
        async with open_sender(GROUP, PORT, queue_size=0):
            pass
    with pytest.raises(ValueError, match="port=70000"):
        async with open_sender(GROUP, 70000):
            pass


async def test_concurrent_failures_stay_grouped():
    net = MemoryNetwork()
    with use_network(net):
        with pytest.RaisesGroup(KeyError, trio.ClosedResourceError):
            async with open_sender(GROUP, PORT) as tx:
                endpoint = net.senders[-1]
                endpoint.pause()
                await tx.send(b"queued")  # the sender task waits to send it
                endpoint.close()  # ... and fails when it wakes up
                endpoint.resume()
                raise KeyError("the block fails too")


# ---------------------------------------------------------------------------
# send_readout(bytes), and malformed readout bytes in auto framing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["auto", "raw", "native"])
async def test_send_readout_accepts_a_serialized_readout(framing):
    net = MemoryNetwork()
    data = wire(3, seed=5)
    with use_network(net):
        async with open_receiver(GROUP, PORT, framing="native" if framing == "native" else "raw") as rx:
            async with open_sender(GROUP, PORT, framing=framing) as tx:
                await tx.send_readout(data[0])
                await tx.send_readout(bytearray(data[1]))
                await tx.send_readout(memoryview(data[2]))
                assert tx.statistics().messages == 3
            with trio.fail_after(5):
                got = [(await rx.receive()).payload for _ in range(3)]
    assert got == data


@pytest.mark.parametrize("bad, what", [
    (b"\xfe\xdc\xba\x00", "shorter than the 19-byte readout header"),
    (b"\x00" * 30, "bad readout header 00 00 00"),
    (AstroPix4Readout(b"\x20" * 8, 1, 2).to_bytes() + b"\xff", "length field at offset 15 says 8"),
])
async def test_send_readout_refuses_malformed_bytes(bad, what):
    net = MemoryNetwork()
    with use_network(net):
        async with open_sender(GROUP, PORT) as tx:
            with pytest.raises(MalformedReadout, match=what):
                await tx.send_readout(bad)
            assert tx.statistics().messages == 0


@pytest.mark.parametrize("bad", [5, True, "fe dc ba", None, 1.5])
async def test_send_readout_of_something_else_says_what_to_pass(bad):
    net = MemoryNetwork()
    with use_network(net):
        async with open_sender(GROUP, PORT) as tx:
            with pytest.raises(TypeError, match="allowed: a readout object with to_bytes"):
                await tx.send_readout(bad)
            assert tx.statistics().messages == 0


@pytest.mark.parametrize("bad", [
    b"\xfe\xdc\xba",  # the header alone
    b"\xfe\xdc\xba" + b"\x00" * 10,  # shorter than the fixed part
    AstroPix4Readout(b"\x20" * 8, 1, 2).to_bytes()[:-1],  # length field too large
    AstroPix4Readout(b"\x20" * 8, 1, 2).to_bytes() + b"\x00",  # too small
])
async def test_auto_framing_refuses_bytes_that_begin_like_a_readout_but_are_malformed(bad):
    net = MemoryNetwork()
    with use_network(net):
        async with open_receiver(GROUP, PORT, framing="native") as rx:
            async with open_sender(GROUP, PORT) as tx:
                with pytest.raises(MalformedReadout):
                    await tx.send(bad)
                with pytest.raises(MalformedReadout):
                    tx.send_nowait(bytearray(bad))
                with pytest.raises(MalformedReadout):
                    await tx.send_many([b"fine", bad])
                assert tx.statistics().messages == 0
                # With a topic the message is framed on purpose: not refused.
                await tx.send(bad, topic="t")
                # Bytes that do not begin with the header are framed as before.
                await tx.send(b"\xfe\xdc\x00 not a readout")
            with trio.fail_after(5):
                assert (await rx.receive()).payload == bad
                assert (await rx.receive()).payload == b"\xfe\xdc\x00 not a readout"


# ---------------------------------------------------------------------------
# Real sockets
# ---------------------------------------------------------------------------

_PROBLEM = isolation_problem()
_needs_netns = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")
_BASE_PORT = 57000 + os.getpid() % 1000 * 2


@_needs_netns
async def test_real_socket_mixed_calls_keep_order_and_count_exactly():
    group, port = "239.255.93.2", _BASE_PORT
    n = 3000
    data = wire(n, seed=7)
    readouts = [AstroPix4Readout.from_bytes(d) for d in data[1000:2000]]
    fds = open_fd_count()
    async with open_receiver(group, port, AstroPix4Readout, queue_size=4096) as rx:
        async with open_sender(group, port) as tx:
            for d in data[:1000]:
                await tx.send(d)
            s = tx.statistics()
            assert (s.datagrams, s.queued, s.syscalls) == (1000, 0, 1000)
            for i, r in enumerate(readouts):
                if i % 3 == 0:
                    tx.send_nowait(r.to_bytes())
                else:
                    await tx.send_readout(r)
            await tx.send_many(data[2000:])
        s = tx.statistics()
        assert (s.messages, s.datagrams, s.queued, s.unsent, s.errors) == (n, n, 0, 0, 0)
        assert s.bytes == sum(map(len, data))
        got = await receive_ids(rx, n)
        assert rx.statistics().lost == rx.statistics().dropped == 0
    assert got == list(range(n))
    assert open_fd_count() == fds  # the endpoint's second descriptor is closed too


@pytest.mark.parametrize("value, allowed", [(70000, "64..64989"), (10, "64..64989")])
async def test_mcl_max_datagram_errors_name_max_datagram(value, allowed):
    with pytest.raises(ValueError) as info:
        async with open_sender("239.255.0.1", 5007, framing="mcl", max_datagram=value):
            pytest.fail("open_sender accepted a bad max_datagram")
    assert f"max_datagram={value}" in str(info.value) and allowed in str(info.value)
    assert "chunk_size" not in str(info.value)


@pytest.mark.parametrize("value, error", [("x", TypeError), (True, TypeError), (0, ValueError),
                                          (70000, ValueError)])
async def test_raw_max_datagram_is_checked_before_opening(value, error):
    before = open_fd_count()
    with pytest.raises(error) as info:
        async with open_sender("239.255.0.1", 5007, framing="raw", max_datagram=value):
            pytest.fail("open_sender accepted a bad max_datagram")
    assert f"max_datagram={value!r}" in str(info.value) and "1..65507" in str(info.value)
    assert open_fd_count() == before
