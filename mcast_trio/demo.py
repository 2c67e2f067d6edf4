"""``python -m mcast_trio.demo``: a simulated DAQ and a live monitor on loopback.

The DAQ task multicasts simulated AstroPix 4 readouts (``mcast_trio.sim``) at
a steady rate, exactly as astropix-analysis would (raw framing), plus, on
purpose, one extra garbage datagram after every ``--garbage-every`` readouts
so that the malformed counter has something to count (the demo says so when
it starts, and compares the count with what it injected at the end; the
garbage is sent in addition to the readouts, so "lost" counts real losses
only). The monitor receives them with
``open_receiver(..., readout_class=AstroPix4Readout)``, consumes the decoded
batches, and prints one line of statistics per second: readouts/s, hits/s,
MB/s, lost, malformed, dropped. After ``--seconds`` it stops and exits 0.

Run it inside a private network namespace (``make demo`` does): the default
interface is loopback, so nothing leaves the host anyway.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import trio

from . import AstroPix4Readout, open_receiver, open_sender
from .sim import DaqSimulator

GROUP = "239.255.77.1"
PORT = 50777


#: The datagram added on purpose after every ``garbage_every`` readouts.
GARBAGE = b"\x00garbage, not a readout"
#: Default mean number of hits per readout.
MEAN_HITS = 4.0
#: Longest pause between two sends (seconds); lower rates send one readout
#: per tick.
_TICK = 0.01


def _new_counts() -> dict:
    return {"readouts": 0, "hits": 0, "datagrams": 0, "garbage": 0, "seconds": 0.0}


async def simulate(sender, *, rate: float, seconds: float | None = None, seed: int = 0,
                   mean_hits: float = MEAN_HITS, split_fraction: float = 0.0, garbage_every: int = 0,
                   counts: dict | None = None) -> dict:
    """Send simulated readouts with ``sender`` (an open
    :class:`~mcast_trio.MulticastSender`) at ``rate`` readouts/s, for
    ``seconds`` (None: until cancelled); return the counts: ``readouts``,
    ``hits`` (the simulator's ground truth of the readouts sent),
    ``datagrams`` handed to the sender (readouts plus garbage), ``garbage``
    and ``seconds`` (elapsed).

    The schedule is absolute: at every tick (10 ms, or ``1/rate`` below
    100/s) it sends what is due since the start, so the average rate is
    ``rate`` whatever the tick's jitter. Readout ids count from 0, the
    timestamps are the send schedule (ns since the epoch). After every
    ``garbage_every`` readouts one garbage datagram is added on purpose.

    ``counts``: a dict to update in place (so that a caller that cancels the
    call still has them); by default a new one.

    Cancellation: the only way to stop it when ``seconds`` is None; ``counts``
    then says what was handed to the sender.
    """
    if counts is None:
        counts = _new_counts()
    else:
        for key, value in _new_counts().items():
            counts.setdefault(key, value)
    period_ns = max(1, round(1e9 / rate))
    sim = DaqSimulator(seed=seed, mean_hits=mean_hits, split_fraction=split_fraction, start_ns=time.time_ns(),
                       period_ns=period_ns)
    tick = _TICK if rate * _TICK >= 1 else 1.0 / rate
    total = None if seconds is None else round(rate * seconds)
    start = trio.current_time()
    k = 0
    try:
        while total is None or counts["readouts"] < total:
            k += 1
            due = math.floor(k * tick * rate + 1e-9)
            if total is not None:
                due = min(due, total)
            n = due - counts["readouts"]
            if n > 0:
                batch = sim.generate(n)
                datagrams = []
                garbage = 0
                for i, datagram in enumerate(batch.datagrams(), counts["readouts"] + 1):
                    datagrams.append(datagram)
                    if garbage_every and i % garbage_every == 0:
                        datagrams.append(GARBAGE)
                        garbage += 1
                await sender.send_many(datagrams)
                counts["readouts"] += n
                counts["hits"] += len(batch.truth)
                counts["garbage"] += garbage
                counts["datagrams"] += len(datagrams)
            if total is not None and counts["readouts"] >= total:
                break
            await trio.sleep_until(start + k * tick)
    finally:
        counts["seconds"] = trio.current_time() - start
    return counts


async def daq(group: str, port: int, rate: float, garbage_every: int, seed: int, totals: dict) -> None:
    """Send ``rate`` readouts per second with :func:`simulate` until
    cancelled; the garbage datagrams added on purpose are counted in
    ``totals["injected"]`` when it stops.

    Cancellation: the only way to stop it; the sender closes its socket.
    """
    counts: dict = {}
    try:
        async with open_sender(group, port, framing="raw") as sender:
            await simulate(sender, rate=rate, seed=seed, split_fraction=0.02, garbage_every=garbage_every,
                           counts=counts)
    finally:
        totals["injected"] += counts.get("garbage", 0)


async def monitor(receiver, totals: dict) -> None:
    """Consume decoded batches: count hits and fill a hit map."""
    async for batch in receiver.batches():
        hits = batch.hits
        totals["hits"] += len(hits)
        np.add.at(totals["hitmap"], (hits.row, hits.column), 1)
        if len(hits):
            totals["tot_sum"] += float(hits.tot_us.sum())


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mcast_trio.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--rate", type=float, default=20000.0, help="readouts per second (default 20000)")
    parser.add_argument("--garbage-every", type=int, default=5000,
                        help="add one malformed datagram on purpose after every N readouts (0: never; default 5000)")
    parser.add_argument("--group", default=GROUP)
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    totals = {"injected": 0, "hits": 0, "tot_sum": 0.0, "hitmap": np.zeros((32, 32), dtype=np.int64)}
    print(f"mcast_trio demo: simulated DAQ -> {args.group}:{args.port} on loopback, "
          f"{args.rate:.0f} readouts/s for {args.seconds:.0f} s")
    if args.garbage_every:
        print(f"on purpose, the DAQ adds one garbage datagram after every {args.garbage_every:,} readouts: "
              "'malformed' counts those (--garbage-every 0 turns them off); 'lost' counts readouts that "
              "never arrived, 'dropped' what the monitor was too slow to take")
    print(f"{'t/s':>4} {'readouts/s':>11} {'hits/s':>10} {'MB/s':>7} {'lost':>6} {'malformed':>9} {'dropped':>8}")
    async with open_receiver(args.group, args.port, readout_class=AstroPix4Readout) as receiver:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor, receiver, totals)
            nursery.start_soon(daq, args.group, args.port, args.rate, args.garbage_every, args.seed, totals)
            before = receiver.statistics()
            start = trio.current_time()
            seconds = 0
            while seconds < args.seconds:
                seconds += 1
                await trio.sleep_until(start + seconds)
                now = receiver.statistics()
                print(f"{seconds:>4} {now.readouts - before.readouts:>11,} {now.hits - before.hits:>10,} "
                      f"{(now.bytes - before.bytes) / 1e6:>7.2f} {now.lost:>6} {now.malformed:>9} "
                      f"{now.dropped:>8}", flush=True)
                before = now
            nursery.cancel_scope.cancel()
        final = receiver.statistics()
    hitmap = totals["hitmap"]
    row, col = np.unravel_index(int(hitmap.argmax()), hitmap.shape)
    mean_tot = totals["tot_sum"] / totals["hits"] if totals["hits"] else 0.0
    print(f"total: {final.datagrams:,} datagrams, {final.readouts:,} readouts, {final.hits:,} hits "
          f"(monitor consumed {totals['hits']:,}), lost {final.lost}, malformed {final.malformed}, "
          f"dropped {final.dropped}, kernel drops {final.kernel_drops}")
    print(f"hit map: busiest pixel row {row} column {col} ({hitmap.max()} hits); mean TOT {mean_tot:.2f} us")
    if totals["injected"] or final.malformed:
        print(f"malformed: {final.malformed} received, {totals['injected']} injected on purpose by the demo DAQ "
              f"(the last ones may still have been in flight at the end); last: {final.last_error}")
    return 0


def run(argv: list[str] | None = None) -> int:
    return trio.run(main, argv)


if __name__ == "__main__":
    sys.exit(run())
