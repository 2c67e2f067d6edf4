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
import sys

import numpy as np
import trio

from . import AstroPix4Readout, open_receiver, open_sender
from .sim import DaqSimulator

GROUP = "239.255.77.1"
PORT = 50777


GARBAGE = b"\x00garbage, not a readout"


async def daq(group: str, port: int, rate: float, garbage_every: int, seed: int, totals: dict) -> None:
    """Send ``rate`` readouts per second, in ticks of 10 ms, until cancelled.

    After every ``garbage_every`` readouts one garbage datagram is added on
    purpose (counted in ``totals["injected"]``).

    Cancellation: the only way to stop it; the sender closes its socket.
    """
    sim = DaqSimulator(seed=seed, mean_hits=4.0, split_fraction=0.02)
    tick = 0.01
    per_tick = max(1, round(rate * tick))
    sent = 0
    async with open_sender(group, port, framing="raw") as sender:
        deadline = trio.current_time()
        while True:
            readouts = sim.generate(per_tick).datagrams()
            datagrams = []
            for datagram in readouts:
                datagrams.append(datagram)
                sent += 1
                if garbage_every and sent % garbage_every == 0:
                    datagrams.append(GARBAGE)
            await sender.send_many(datagrams)
            totals["injected"] += len(datagrams) - len(readouts)
            deadline += tick
            await trio.sleep_until(deadline)


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
