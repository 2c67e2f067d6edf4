"""The one receive loop: drain a socket endpoint in batches, feed a
:class:`~mcast_trio._protocol._pipeline.ReceivePipeline`, deliver what it
returns, wait; and :func:`send_all`, the matching loop of the sending side.

The shape is trio's ``dtls_receive_loop``: the loop never waits for its
consumer (``deliver`` decides what to do when the consumer is slow: the
receiver applies its overflow policy, the fault relay schedules datagrams),
drains the socket with non-blocking batched receives until it is empty, and
only then waits with ``wait_readable``. Caps per wake-up keep a socket that
never empties, or datagrams that are slow to handle, from starving other
tasks: after ``max_per_wake`` datagrams or ``max_busy`` seconds of real time
(``time.perf_counter``, the time the loop holds the trio scheduler, which a
virtual clock such as ``autojump_clock`` does not see) it checkpoints; the
pipeline also pauses between datagrams it handles one by one in Python.

The receiver (``_receiver``) and the fault relay (``testing._relay``) run
this loop; so will the recorder and the relays of the next tools.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import trio

from ._io._batchio import ReceiveBatch

__all__ = ["receive_loop", "send_all"]


async def receive_loop(endpoint, pipeline, deliver: Callable[[Any], Awaitable[None]], *,
                       batch_size: int, max_datagram_size: int, max_per_wake: int,
                       max_busy: float, task_status=trio.TASK_STATUS_IGNORED,
                       started: Any = None) -> None:
    """Receive from ``endpoint`` until cancelled.

    Args:
        endpoint: a receiver endpoint of the current network (see
            :mod:`mcast_trio._io._net`).
        pipeline: the :class:`ReceivePipeline` that counts, decodes and
            filters; its ``counters.kernel_drops`` is kept up to date here:
            from every batch, and from the socket's own counter when the
            loop goes idle (drops after the last queued datagram).
        deliver: ``await deliver(item)`` for every non-empty result of the
            pipeline and every item it hands out while it decodes a batch; it should not block for long (it may checkpoint; it
            then sets ``pipeline.deadline`` itself if it wants a new budget).
        batch_size: datagrams per batched receive.
        max_datagram_size: receive slot size (longer datagrams are counted as
            truncated by the pipeline).
        max_per_wake, max_busy: the caps described in the module docstring.
        task_status, started: ``task_status.started(started)`` is called
            once the loop is ready to receive.

    Cancellation: the only way to stop it; a batch being handled when the
    cancellation arrives is abandoned at the next checkpoint (its datagrams
    are counted as received, not delivered).
    """
    batch = ReceiveBatch(batch_size, max_datagram_size)
    receive_batch = endpoint.receive_batch
    kernel_drops = endpoint.kernel_drops
    counters = pipeline.counters
    clock = pipeline.clock
    feed = pipeline.feed
    current_time = trio.current_time
    checkpoint = trio.lowlevel.checkpoint
    # 0 where the OS counts kernel drops, None only where it does not.
    counters.kernel_drops = kernel_drops()
    task_status.started(started)
    while True:
        received = 0
        pipeline.deadline = clock() + max_busy
        while True:
            n = receive_batch(batch)
            if n == 0:
                break
            drops = kernel_drops(batch)
            if drops is not None:
                counters.kernel_drops = drops
            work = feed(batch, n, current_time())
            try:
                part = work.send(None)
                while True:
                    if part is None:
                        # The pipeline ran out of time between two datagrams.
                        await checkpoint()
                        pipeline.deadline = clock() + max_busy
                    else:
                        # What the batch built so far reached the pipeline's
                        # max_item_bytes: delivered before the rest is decoded.
                        await deliver(part)
                    part = work.send(current_time())
            except StopIteration as done:
                item = done.value
            if item is not None:
                await deliver(item)
            received += n
            if received >= max_per_wake or clock() >= pipeline.deadline:
                # The socket never empties, or its datagrams are slow to
                # handle: let other tasks run.
                await checkpoint()
                pipeline.deadline = clock() + max_busy
                received = 0
        pipeline.expire(current_time())
        # Idle: the socket is empty. Drops after the last datagram it queued
        # travel with no datagram: read the socket's own counter (one system
        # call per wake-up, none per batch).
        drops = kernel_drops()
        if drops is not None:
            counters.kernel_drops = drops
        if pipeline.pending:
            # Wake up in time to expire incomplete messages even if nothing
            # else arrives.
            with trio.move_on_after(pipeline.reassembly_timeout / 4):
                await endpoint.wait_readable()
            continue
        await endpoint.wait_readable()


async def send_all(endpoint, datagrams: list) -> None:
    """Hand every datagram of ``datagrams`` to ``endpoint`` in order, in
    batches, waiting for room in the socket buffer when it is full.

    Raises what ``endpoint.send_batch`` raises for a datagram the network
    refuses.

    Cancellation: safe to cancel while waiting for room; the datagrams not
    yet handed over are not sent.
    """
    sent = 0
    while sent < len(datagrams):
        n = endpoint.send_batch(datagrams[sent:] if sent else datagrams)
        sent += n
        if n == 0:
            await endpoint.wait_writable()
