"""A fault-injecting relay: receive a group, re-emit it on another group with
:class:`LinkRules` applied, for testing programs that are not in-process.

Runs over the current network (real sockets by default, so it can sit between
two separate processes; also the memory network). Each source address gets its
own fault link (seeded from ``seed`` and the source), so the faults reproduce.
"""

from __future__ import annotations

import heapq
import itertools
import math

import trio

from .._errors import unwrap_single
from .._io import _groups, _sockets
from .._io._net import current_network
from .._loop import receive_loop, send_all
from .._protocol._pipeline import ReceivePipeline
from ._memory import FaultCounts, LinkRules, FaultLink

__all__ = ["FaultRelay", "serve_fault_relay"]


class FaultRelay:
    """The state of a running relay (what ``task_status.started()`` passes).

    Attributes:
        rules: the :class:`LinkRules` applied (assign a new value to change
            them on the fly; links take it for the next datagram).
        received: datagrams received on the source group.
        emitted: datagrams re-emitted on the target group.
        pipeline: the receive pipeline of the source side (its
            ``statistics()`` has the receive counters).
    """

    def __init__(self, rules: LinkRules, seed: int) -> None:
        if not isinstance(rules, LinkRules):
            raise TypeError(f"rules={rules!r} must be a LinkRules")
        self.rules = rules
        self.seed = seed
        # Raw framing, no readout class: every datagram is a message with
        # its source, as received.
        self.pipeline = ReceivePipeline(framing="raw")
        self.emitted = 0
        self._links: dict[tuple, FaultLink] = {}
        self._heap: list[tuple[float, int, bytes, FaultLink]] = []
        self._order = itertools.count()
        self._wake = trio.Event()

    @property
    def received(self) -> int:
        """Datagrams received on the source group."""
        return self.pipeline.counters.datagrams

    async def _relay(self, messages) -> None:
        # What the receive loop delivers: schedule each datagram on its
        # source's link.
        now = trio.current_time()
        for message in messages:
            link = self._link(message.address)
            self._schedule(link.process(message.payload, now), link)

    @property
    def faults(self) -> FaultCounts:
        """Counts summed over every source's link."""
        total = FaultCounts()
        for link in self._links.values():
            total += link.counts
        return total

    def _link(self, source) -> FaultLink:
        link = self._links.get(source)
        if link is None:
            link = self._links[source] = FaultLink(self.rules, f"{self.seed}|{source}".encode())
        link.rules = self.rules
        return link

    def _schedule(self, deliveries, link: FaultLink) -> None:
        for at, data in deliveries:
            heapq.heappush(self._heap, (at, next(self._order), data, link))
        if deliveries:
            self._wake.set()

    async def _emit(self, endpoint) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            held = math.inf
            for source, link in self._links.items():
                self._schedule(link.expire(now), link)
                if link.held is not None:
                    held = min(held, link.held[1])
            due = []
            while heap and heap[0][0] <= now:
                _, _, data, link = heapq.heappop(heap)
                due.append(data)
                link.counts.delivered += 1
            if due:
                await send_all(endpoint, due)
                self.emitted += len(due)
                await trio.lowlevel.checkpoint()
                continue
            deadline = min(heap[0][0] if heap else math.inf, held)
            if self._wake.is_set():
                self._wake = trio.Event()
            with trio.move_on_at(deadline):
                await self._wake.wait()


async def serve_fault_relay(
    source_group: str,
    source_port: int,
    target_group: str,
    target_port: int,
    rules: LinkRules | None = None,
    *,
    seed: int = 0,
    interface=None,
    target_interface=None,
    ttl: int = 1,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Relay ``source_group:source_port`` to ``target_group:target_port``,
    applying ``rules``; for ``await nursery.start(serve_fault_relay, ...)``.

    ``task_status.started()`` gets the :class:`FaultRelay` once the source
    group is joined. Interfaces default to loopback.

    A single exception (an invalid argument, an error from opening a socket or
    from sending) comes out as itself, not wrapped in an ``ExceptionGroup`` by
    the relay's own nursery; only concurrent failures of its receive and emit
    tasks stay grouped.

    Cancellation: the only way to stop it; datagrams not yet re-emitted are
    dropped, the group is left and both sockets are closed.
    """
    relay = FaultRelay(rules if rules is not None else LinkRules(), seed)
    in_spec = _groups.resolve_group(source_group, source_port, interface=interface)
    out_spec = _groups.resolve_group(target_group, target_port, interface=target_interface, ttl=ttl)
    if (in_spec.group, in_spec.port) == (out_spec.group, out_spec.port):
        raise ValueError(f"the relay would feed itself: source and target are both {in_spec.group} "
                         f"port {in_spec.port}")
    network = current_network()
    receiver = network.open_receiver(in_spec, rcvbuf=_sockets.DEFAULT_RCVBUF)
    try:
        sender = network.open_sender(out_spec)
        try:
            with unwrap_single():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(relay._emit, sender)
                    await receive_loop(receiver, relay.pipeline, relay._relay, batch_size=64,
                                       max_datagram_size=65536, max_per_wake=4096, max_busy=0.005,
                                       task_status=task_status, started=relay)
        finally:
            sender.close()
    finally:
        receiver.close()
