"""Receive-path cost: CPU time per datagram of ``open_receiver``, measured by
draining a socket buffer filled beforehand, in one process.

Less noisy than a two-process rate measurement (``bench_transport.py``): the
sender does not run while the receiver is timed. Each round sends ``--burst``
datagrams from a plain socket into the receiver's socket buffer (the trio
loop does not run meanwhile: the sends are synchronous), then times, with
``time.process_time()``, until the consumer has all of them. Best of
``--rounds`` rounds per case; the cases run interleaved.

Cases (~1 KiB simulator readouts, 110 hits each):

* ``readouts, batches()``: raw readouts decoded in batches (the monitor's
  fast path);
* ``readouts, async for``: the same, one readout object at a time;
* ``native messages``: native framing, message mode (datagrams handled one by
  one in Python);
* ``readouts, filter=``: raw readouts through a Python filter callable.

Only public API is used, so the same script measures another checkout
(``PYTHONPATH=/path/to/old/tree``) in the same conditions: run both and
compare the figures. Inside the private network namespace:
``tools/netns-run python benchmarks/bench_receive_path.py``.
"""

from __future__ import annotations

import argparse
import socket
import time

import trio

import mcast_trio
from mcast_trio import AstroPix4Readout, open_receiver
from mcast_trio.sim import DaqSimulator

GROUP = "239.255.77.9"
PORT = 47300


def _sender() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    sock.connect((GROUP, PORT))
    return sock


async def _case(name: str, options: dict, datagrams: list[bytes], consume: str, rounds: int) -> float:
    """Best CPU microseconds per datagram over ``rounds`` bursts."""
    best = float("inf")
    sock = _sender()
    n = len(datagrams)
    async with open_receiver(GROUP, PORT, **options) as rx:
        got = 0
        arrived = trio.Event()

        async def consumer():
            nonlocal got, arrived
            if consume == "batches":
                async for batch in rx.batches():
                    got += len(batch.readouts)
                    if got >= n:
                        arrived.set()
            else:
                async for _item in rx:
                    got += 1
                    if got >= n:
                        arrived.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consumer)
            await trio.sleep(0.05)
            for _ in range(rounds):
                got = 0
                arrived = trio.Event()
                for d in datagrams:  # synchronous: the receive task does not run
                    sock.send(d)
                t0 = time.process_time()
                with trio.fail_after(10):
                    await arrived.wait()
                cost = (time.process_time() - t0) / n * 1e6
                best = min(best, cost)
                await trio.sleep(0.01)
            stats = rx.statistics()
            nursery.cancel_scope.cancel()
    sock.close()
    if stats.dropped or stats.kernel_drops:
        raise SystemExit(f"{name}: lost datagrams (dropped {stats.dropped}, kernel {stats.kernel_drops});"
                         " use a smaller --burst")
    return best


async def main(args) -> None:
    sim = DaqSimulator(7, start_ns=0, mean_hits=110.0)
    readouts = [r.to_bytes() for r in sim.readouts(args.burst)]
    native = []
    from mcast_trio import NativeEncoder

    encoder = NativeEncoder(sender_id=1)
    for r in readouts:
        native.extend(encoder.encode(r))
    cases = [
        ("readouts, batches()", dict(readout_class=AstroPix4Readout), readouts, "batches"),
        ("readouts, async for", dict(readout_class=AstroPix4Readout), readouts, "each"),
        ("native messages", dict(framing="native"), native, "each"),
        ("readouts, filter=", dict(readout_class=AstroPix4Readout, filter=lambda payload, address: True),
         readouts, "batches"),
    ]
    results = {name: float("inf") for name, *_ in cases}
    for _ in range(args.repeats):
        for name, options, datagrams, consume in cases:
            cost = await _case(name, options, datagrams, consume, args.rounds)
            results[name] = min(results[name], cost)
    print(f"mcast_trio {mcast_trio.__version__} from {mcast_trio.__file__}")
    print(f"burst of {args.burst} datagrams (~{sum(map(len, readouts)) // len(readouts)} B), "
          f"best of {args.rounds} rounds x {args.repeats} repeats")
    print(f"{'case':<28}{'CPU us/datagram':>18}{'datagrams/CPU-s':>18}")
    for name, cost in results.items():
        print(f"{name:<28}{cost:>18.2f}{1e6 / cost:>18,.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=2000, help="datagrams per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per case and repeat (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    trio.run(main, parser.parse_args())
