"""serve_receiver as easy as open_receiver, public types on its channel, and
argument errors that name the public argument (issue 8). Real sockets, in the
private network namespace; groups from the pytest plugin's ``mcast_group``."""

from __future__ import annotations

import functools

import pytest
import trio

from mcast_trio import (
    AstroPix4Readout,
    Message,
    MulticastReceiver,
    ReadoutChunk,
    ReceiverService,
    open_receiver,
    open_sender,
    serve_receiver,
)
from mcast_trio.sim import DaqSimulator
from mcast_trio.testing import joined_ipv4_groups


def readouts(n: int) -> list[AstroPix4Readout]:
    return DaqSimulator(3, start_ns=0).readouts(n)


async def test_serve_receiver_without_a_channel_gives_a_receiver(mcast_group):
    group, port = mcast_group
    async with trio.open_nursery() as nursery:
        receiver = await nursery.start(serve_receiver, group, port)
        assert isinstance(receiver, MulticastReceiver)
        assert group in joined_ipv4_groups()
        async with open_sender(group, port, framing="native") as tx:
            for i in range(5):
                await tx.send(b"m%d" % i, topic="t")
        got = [await receiver.receive() for _ in range(5)]
        assert [(m.topic, m.payload) for m in got] == [(b"t", b"m%d" % i) for i in range(5)]
        assert receiver.statistics().messages == 5
        nursery.cancel_scope.cancel()
    # the task closed its channel: iteration ends
    assert [m async for m in receiver] == []
    assert group not in joined_ipv4_groups()


async def test_serve_receiver_takes_keyword_options_through_partial(mcast_group):
    group, port = mcast_group
    sent = readouts(40)
    async with trio.open_nursery() as nursery:
        receiver = await nursery.start(functools.partial(
            serve_receiver, group, port, readout_class=AstroPix4Readout, batch_size=8, queue_size=64))
        async with open_sender(group, port) as tx:
            await tx.send_many(sent)
        ids = []
        async for batch in receiver.batches():
            ids.extend(int(i) for i in batch.readouts.readout_id)
            if len(ids) == 40:
                break
        stats = receiver.statistics()
        nursery.cancel_scope.cancel()
    assert ids == [r.readout_id for r in sent]
    assert (stats.readouts, stats.lost, stats.dropped) == (40, 0, 0)


async def test_a_channel_of_yours_carries_public_types_and_defaults_to_drop_newest(mcast_group):
    group, port = mcast_group
    sent = readouts(6)
    send, receive = trio.open_memory_channel(1)
    async with trio.open_nursery() as nursery:
        # No drop_channel: no ValueError, the default policy is drop_newest.
        service = await nursery.start(functools.partial(
            serve_receiver, group, port, send, AstroPix4Readout, batch_size=1))
        assert isinstance(service, ReceiverService) and service.overflow == "drop_newest"
        async with open_sender(group, port) as tx:
            await tx.send_many(sent)
        with trio.fail_after(5):
            while service.statistics().datagrams < 6:
                await trio.sleep(0.002)
        chunk = receive.receive_nowait()
        nursery.cancel_scope.cancel()
    assert isinstance(chunk, ReadoutChunk) and len(chunk) == 1
    (readout,) = list(chunk)
    assert readout.to_bytes() == sent[0].to_bytes()  # the newest were dropped
    assert int(chunk.batch.readouts.readout_id[0]) == sent[0].readout_id
    stats = service.statistics()
    assert (stats.dropped, stats.dropped_chunks) == (5, 5)


async def test_messages_on_a_channel_of_yours_are_lists_of_message(mcast_group):
    group, port = mcast_group
    send, receive = trio.open_memory_channel(16)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_receiver, group, port, send)
        async with open_sender(group, port, framing="native") as tx:
            await tx.send(b"hello")
        with trio.fail_after(5):
            item = await receive.receive()
        nursery.cancel_scope.cancel()
    assert isinstance(item, list) and [type(m) for m in item] == [Message]
    assert item[0].payload == b"hello"


async def test_explicit_drop_oldest_without_a_way_to_drop_fails_before_joining(mcast_group):
    group, port = mcast_group
    send, _receive = trio.open_memory_channel(1)
    async with trio.open_nursery() as nursery:
        with pytest.raises(ValueError, match=r"overflow='drop_oldest' needs drop_channel="):
            await nursery.start(functools.partial(serve_receiver, group, port, send,
                                                  overflow="drop_oldest"))
    assert group not in joined_ipv4_groups()


# (function, kwargs, exception, fragments): each must fail before anything
# opens, naming the public argument and what is allowed.
_BAD = [
    (dict(bogus=1), TypeError, ["open_receiver()", "'bogus'", "allowed:", "batch_size"]),
    (dict(queue_size="x"), TypeError, ["queue_size='x'", "must be an integer"]),
    (dict(batch_size="x"), TypeError, ["batch_size='x'", "must be an integer", "1..1024"]),
    (dict(readout_class=int), TypeError, ["readout_class=<class 'int'>", "is not a readout class"]),
    (dict(reassembly_timeout=0), ValueError, ["reassembly_timeout=0"]),
    (dict(max_pending_messages=0), ValueError, ["max_pending_messages=0"]),
    (dict(max_reassembly_bytes=-1), ValueError, ["max_reassembly_bytes=-1"]),
    # raw framing checks the reassembly bounds too (they used to pass unchecked)
    (dict(readout_class=AstroPix4Readout, framing="raw", max_pending_messages="x"), TypeError,
     ["max_pending_messages='x'"]),
    (dict(framing="nope"), ValueError, ["framing='nope'", "'raw', 'native', 'mcl', 'auto'"]),
    (dict(on_malformed=5), TypeError, ["on_malformed=5", "not callable"]),
]


@pytest.mark.parametrize("kwargs, exc, fragments", _BAD, ids=lambda v: repr(v)[:40])
async def test_open_receiver_errors_name_the_public_argument(mcast_group, kwargs, exc, fragments):
    group, port = mcast_group
    with pytest.raises(exc) as info:
        async with open_receiver(group, port, **kwargs):
            pytest.fail("open_receiver accepted a bad argument")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "_configure" not in message and "timeout=" not in message.replace("reassembly_timeout=", "")
    assert group not in joined_ipv4_groups()


async def test_serve_receiver_errors_name_serve_receiver(mcast_group):
    group, port = mcast_group
    async with trio.open_nursery() as nursery:
        with pytest.raises(TypeError, match=r"^serve_receiver\(\) got unexpected keyword argument 'bogus'"):
            await nursery.start(functools.partial(serve_receiver, group, port, bogus=1))
    assert group not in joined_ipv4_groups()


async def test_the_receiver_takes_auto_framing_as_its_default(mcast_group):
    group, port = mcast_group
    sent = readouts(3)
    async with open_receiver(group, port, AstroPix4Readout, framing="auto") as rx:
        async with open_sender(group, port, framing="auto") as tx:
            await tx.send_many(sent)
        with trio.fail_after(5):
            got = [await rx.receive() for _ in sent]
    assert [r.to_bytes() for r in got] == [r.to_bytes() for r in sent]


async def test_sender_type_mistakes_are_type_errors(mcast_group):
    group, port = mcast_group
    for kwargs, fragment in [(dict(queue_size="x"), "queue_size='x'"),
                             (dict(framing="raw", max_datagram="x"), "max_datagram='x'")]:
        with pytest.raises(TypeError, match=f"^{fragment} must be an integer"):
            async with open_sender(group, port, **kwargs):
                pytest.fail("open_sender accepted a bad argument")
