"""mcast_trio.astropix.MulticastSender.send_readout against a plain blocking
``socket.sendto`` loop, side by side in one run (issue 7: target >= 0.9x).

Run inside the private network namespace::

    tools/netns-run python benchmarks/bench_astropix.py [--readouts 200000] [--rounds 5]

Both loops send the same 1 KiB readouts to the same destination, a
multicast group on the loopback interface (nobody joined) and a unicast
receiver socket on 127.0.0.1 that never reads (the kernel drops what does
not fit, as for a stalled monitor; no ICMP errors). The plain loop sends
pre-serialized bytes (``sock.sendto(data, address)``) and, separately,
serializes each readout as astropix-analysis' sender does
(``sock.sendto(readout.to_bytes(), address)``). Best of ``--rounds``
rounds, interleaved; compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import socket
import time

from mcast_trio import AstroPix4Readout
from mcast_trio.astropix import MulticastSender


def _readouts(n: int, size: int = 1024) -> list[AstroPix4Readout]:
    payload = bytes(range(256)) * (size // 256)
    data = payload[: size - 19].replace(b"\xff", b"\xfe")
    return [AstroPix4Readout(data, i, 1_700_000_000_000_000_000 + i) for i in range(n)]


def _plain_socket(address) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    return sock


def _rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readouts", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    readouts = _readouts(args.readouts)
    datagrams = [r.to_bytes() for r in readouts]
    n = len(readouts)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))  # never read: full buffer, datagrams dropped
    destinations = {"multicast 239.255.0.77": ("239.255.0.77", 45077),
                    "unicast 127.0.0.1": sink.getsockname()}
    print(f"{n} readouts of {len(datagrams[0])} bytes, best of {args.rounds} rounds\n")
    print(f"{'destination':24} {'loop':44} {'readouts/s':>12} {'ratio':>7}")
    for name, address in destinations.items():
        plain = _plain_socket(address)
        sender = MulticastSender(address[0], address[1])
        best = {"plain sendto(bytes)": 0.0, "plain sendto(readout.to_bytes())": 0.0,
                "astropix.MulticastSender.send_readout": 0.0}

        def plain_bytes():
            sendto = plain.sendto
            for data in datagrams:
                sendto(data, address)

        def plain_readouts():
            sendto = plain.sendto
            for readout in readouts:
                sendto(readout.to_bytes(), address)

        def ours():
            send_readout = sender.send_readout
            for readout in readouts:
                send_readout(readout)

        try:
            for _ in range(args.rounds):
                for label, fn in zip(best, (plain_bytes, plain_readouts, ours)):
                    best[label] = max(best[label], _rate(fn, n))
        finally:
            plain.close()
            sender.close()
        base = best["plain sendto(bytes)"]
        for label, rate in best.items():
            print(f"{name:24} {label:44} {rate:12,.0f} {rate / base:7.2f}")
    sink.close()


if __name__ == "__main__":
    main()
