"""Per-message send benchmark: mcast_trio's send calls against a plain
blocking ``socket.sendto`` loop, side by side in one run (issue 7, part 4).

Rows (datagrams handed to the kernel per second, and the ratio to the plain
``sendto`` loop, the 1.0x baseline):

* plain blocking ``sock.sendto(data, (group, port))`` loop (the baseline);
* ``await sender.send_readout(readout)`` per readout (target >= 0.5x);
* ``await sender.send(data)`` per readout;
* ``sender.send_nowait(data)`` per readout, ``await sender.flush()`` when it
  raises ``trio.WouldBlock`` and at the end (target >= 0.9x);
* ``await sender.send_many(chunk)`` with chunks of ``--chunk`` serialized
  readouts (target >= 1.0x);
* the blocking ``mcast_trio.astropix.MulticastSender.send_readout`` (target
  >= 0.9x), or "not available" when that module cannot be imported.

The traffic: ``--pool`` simulator readouts of about 1 KiB
(``DaqSimulator(mean_hits=110)``), made once and sent cyclically, as readout
objects (``send_readout``) or their bytes, to a multicast group on ``lo``.
A separate process (pinned to another CPU when there are two or more) has
joined the group and drains it with a plain ``recv_into`` loop
(``--receiver none``: no member; loopback multicast still costs the send).
What it received is printed, for information: it may drop when it cannot
keep up, which costs the sender nothing.

The rows run interleaved, ``--rounds`` times; each row keeps its best round,
so a burst of load from other processes on the machine hurts one round, not
one row. Times are wall-clock; the CPU-time ratio of the sending thread is
printed beside it (less sensitive to other processes).

Run inside the private network namespace only (nothing leaves the machine):
``make bench`` or ``tools/netns-run python benchmarks/bench_send.py``.
``--check`` exits with status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import platform
import select
import socket
import struct
import subprocess
import sys
import time

GROUP = "239.255.78.1"
PORT = 47311
RCVBUF = 4 * 1024 * 1024
TARGETS = {  # row -> minimum ratio to the plain sendto loop
    "await send_readout()": 0.5,
    "send_nowait()": 0.9,
    "send_many()": 1.0,
    "astropix send_readout()": 0.9,
}


def _drain(group: str, port: int, cpu: int | None) -> None:
    """The receiving process: join, say "ready", count until stdin closes."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.bind((group, port))
    mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("127.0.0.1"))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    sock.setblocking(False)
    buf = bytearray(65536)
    count = 0
    print("ready", flush=True)
    stdin = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([sock, stdin], [], [])
        if sock in readable:
            try:
                while True:
                    sock.recv_into(buf)
                    count += 1
            except BlockingIOError:
                pass
        if stdin in readable and not os.read(stdin, 4096):
            break
    print(count, flush=True)


class Rows:
    """The benchmark rows; each ``run_*`` sends ``n`` datagrams and returns
    (wall seconds, CPU seconds of this thread)."""

    def __init__(self, n: int, chunk: int, readouts: list, data: list[bytes]) -> None:
        self.n = n
        self.chunk = chunk
        self.readouts = readouts
        self.data = data
        self.mask = len(data) - 1

    @staticmethod
    def _clock():
        return time.perf_counter(), time.thread_time()

    def _since(self, start):
        wall, cpu = self._clock()
        return wall - start[0], cpu - start[1]

    def run_sendto(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            data, mask, address, sendto = self.data, self.mask, (GROUP, PORT), sock.sendto
            start = self._clock()
            for i in range(self.n):
                sendto(data[i & mask], address)
            return self._since(start)
        finally:
            sock.close()

    def _trio(self, loop):
        import trio

        from mcast_trio import open_sender

        async def main():
            async with open_sender(GROUP, PORT) as sender:
                start = self._clock()
                await loop(sender)
                await sender.flush()
                took = self._since(start)
            stats = sender.statistics()
            if stats.datagrams != self.n or stats.errors or stats.unsent:
                raise RuntimeError(f"the sender did not send every datagram: {stats}")
            return took

        return trio.run(main)

    def run_send_readout(self):
        async def loop(sender):
            readouts, mask, send_readout = self.readouts, self.mask, sender.send_readout
            for i in range(self.n):
                await send_readout(readouts[i & mask])
        return self._trio(loop)

    def run_send(self):
        async def loop(sender):
            data, mask, send = self.data, self.mask, sender.send
            for i in range(self.n):
                await send(data[i & mask])
        return self._trio(loop)

    def run_send_nowait(self):
        import trio

        async def loop(sender):
            data, mask, send_nowait = self.data, self.mask, sender.send_nowait
            for i in range(self.n):
                try:
                    send_nowait(data[i & mask])
                except trio.WouldBlock:
                    await sender.flush()
                    send_nowait(data[i & mask])
        return self._trio(loop)

    def run_send_many(self):
        chunks = [self.data[k:k + self.chunk] for k in range(0, len(self.data), self.chunk)]

        async def loop(sender):
            left, k = self.n, 0
            while left > 0:
                chunk = chunks[k % len(chunks)]
                if len(chunk) > left:
                    chunk = chunk[:left]
                await sender.send_many(chunk)
                left -= len(chunk)
                k += 1
        return self._trio(loop)

    def run_astropix(self):
        from mcast_trio.astropix import MulticastSender  # ImportError: "not available"

        sender = MulticastSender(group=GROUP, port=PORT, ttl=1)
        try:
            readouts, mask, send_readout = self.readouts, self.mask, sender.send_readout
            start = self._clock()
            for i in range(self.n):
                send_readout(readouts[i & mask])
            return self._since(start)
        finally:
            sender.close()


ROWS = [
    ("plain sendto() loop", "run_sendto"),
    ("await send_readout()", "run_send_readout"),
    ("await send()", "run_send"),
    ("send_nowait()", "run_send_nowait"),
    ("send_many()", "run_send_many"),
    ("astropix send_readout()", "run_astropix"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["drain"], help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--datagrams", type=int, default=100_000, help="datagrams per row and round (default 100000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; best kept (default 5)")
    parser.add_argument("--pool", type=int, default=4096, help="distinct readouts, a power of two (default 4096)")
    parser.add_argument("--mean-hits", type=float, default=110.0, help="mean hits per readout (~1 KiB)")
    parser.add_argument("--chunk", type=int, default=1024, help="readouts per send_many call (default 1024)")
    parser.add_argument("--receiver", choices=["drain", "none"], default="drain",
                        help="a process that joins the group and drains it (default), or no member")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the sender and the receiver to CPUs")
    parser.add_argument("--check", action="store_true", help="exit with status 1 if a target is missed")
    args = parser.parse_args()

    if args.role == "drain":
        _drain(GROUP, PORT, args.cpu)
        return
    if os.environ.get("NETNS_RUN_INSIDE") != "1" and os.environ.get("MCAST_TRIO_NETNS") != "1":
        sys.exit("bench_send: refusing to run outside a private network namespace; "
                 "run it as: tools/netns-run python benchmarks/bench_send.py")
    if args.pool < 1 or args.pool & (args.pool - 1):
        parser.error(f"--pool {args.pool} is not a power of two")

    import mcast_trio
    from mcast_trio.sim import DaqSimulator

    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    if pin:
        os.sched_setaffinity(0, {cpus[0]})
    readouts = DaqSimulator(seed=1, mean_hits=args.mean_hits, start_ns=0).readouts(args.pool)
    data = [r.to_bytes() for r in readouts]
    sizes = [len(d) for d in data]
    rows = Rows(args.datagrams, args.chunk, readouts, data)

    drain = None
    if args.receiver == "drain":
        cmd = [sys.executable, os.path.abspath(__file__), "--role", "drain"]
        if pin:
            cmd += ["--cpu", str(cpus[1])]
        drain = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if drain.stdout.readline().strip() != "ready":
            sys.exit("bench_send: the receiving process did not start")

    print(f"mcast_trio {mcast_trio.__version__}; Python {platform.python_version()}, Linux {platform.release()},"
          f" {os.cpu_count()} CPUs, load average {' '.join(open('/proc/loadavg').read().split()[:3])}")
    print(f"traffic: {len(data)} simulator readouts sent cyclically to {GROUP}:{PORT} on lo, mean"
          f" {sum(sizes) / len(sizes):.0f} B (min {min(sizes)}, max {max(sizes)}); receiver:"
          f" {'a plain process draining the group' if drain else 'none (no member)'};"
          f" {'sender and receiver pinned to CPUs ' + str(cpus[:2]) if pin else 'not pinned'}")
    print(f"{args.datagrams:,} datagrams per row and round, {args.rounds} interleaved rounds, best kept")
    print()

    best: dict[str, tuple[float, float]] = {}
    missing: dict[str, str] = {}
    try:
        for _ in range(args.rounds):
            for name, method in ROWS:
                if name in missing:
                    continue
                try:
                    wall, cpu = getattr(rows, method)()
                except ImportError as exc:
                    missing[name] = f"not available ({exc})"
                    continue
                except Exception as exc:  # noqa: BLE001 - report the row, keep the others
                    if method != "run_astropix":
                        raise
                    missing[name] = f"failed: {type(exc).__name__}: {exc}"
                    continue
                old = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(old[0], wall), min(old[1], cpu))
    finally:
        received = None
        if drain is not None:
            drain.stdin.close()
            received = drain.stdout.readline().strip()
            drain.wait(timeout=10)

    base_wall, base_cpu = best["plain sendto() loop"]
    n = args.datagrams
    met = True
    print(f"{'row':26s} {'datagrams/s':>12s} {'vs sendto':>10s} {'CPU ratio':>10s}  target")
    for name, _method in ROWS:
        if name in missing:
            print(f"{name:26s} {missing[name]}")
            continue
        wall, cpu = best[name]
        ratio = base_wall / wall
        target = TARGETS.get(name)
        verdict = ""
        if target is not None:
            ok = ratio >= target
            met = met and ok
            verdict = f">= {target:.1f}x {'PASS' if ok else 'FAIL'}"
        print(f"{name:26s} {n / wall:12,.0f} {ratio:9.2f}x {base_cpu / cpu:9.2f}x  {verdict}")
    if received is not None:
        total = n * args.rounds * (len(ROWS) - len(missing))
        print(f"\nthe draining receiver got {received} of {total:,} datagrams sent")
    if args.check and not met:
        sys.exit(1)


if __name__ == "__main__":
    main()
