"""Soak test: a sender and a decoding receiver, in separate processes, for
10 million datagrams at a rate the receiver sustains; memory must stay flat
and nothing may be lost.

What runs (``make soak``, inside a private network namespace through
``tools/netns-run``; loopback multicast to 239.255.93.1, nothing leaves the
machine):

* a **receiver** process: ``open_receiver(..., readout_class=AstroPix4Readout)``
  consumed with ``batches()`` (decoding on), counting readouts and hits;
* a **sender** process: ``open_sender`` + ``send_many``, paced at ``--rate``
  datagrams per second (chunks of ``--chunk``), sending serialized readouts
  generated on the fly by :class:`mcast_trio.sim.DaqSimulator` (consecutive
  readout ids, hits split across readouts, padding), so the receiver's hit
  count can be compared with the simulator's ground truth;
* this script, sampling both processes' RSS (``/proc/PID/status``) and the
  receiver's statistics every second.

The rate: ``--rate auto`` (default) first measures what the pair sustains:
a few seconds with the sender unpaced, then the soak runs at ``--fraction``
(default 0.5) of the rate the receiver's consumer reached (end to end). Sender and receiver are
pinned to different CPUs when there are two or more.

At the end it prints datagrams, readouts, hits (and the ground truth), lost,
malformed, kernel drops, dropped (consumer channel overflow), RSS first /
max / last and the slope after warm-up, for both processes; it exits with 1
if anything was lost (sent - received, the loss tracker, kernel drops,
channel drops, malformed) or the receiver's RSS grew by more than
``--max-growth-mib`` after the warm-up (``--warmup`` seconds), else 0.

Usage::

    make soak                                   # 10 million datagrams
    tools/netns-run python benchmarks/soak.py --datagrams 2000000 --rate 100000
    tools/netns-run python benchmarks/soak.py --seconds 60 --json soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

GROUP = "239.255.93.1"
PORT = 47931


# ---------------------------------------------------------------------------
# Where are we?
# ---------------------------------------------------------------------------


def _default_route() -> str | None:
    for path, is_default in (
        ("/proc/net/route", lambda f: f[1] == "00000000" and f[7] == "00000000" and int(f[3], 16) & 1),
        ("/proc/net/ipv6_route", lambda f: f[0] == "0" * 32 and f[1] == "00" and int(f[8], 16) & 1),
    ):
        try:
            with open(path) as handle:
                for line in handle:
                    fields = line.split()
                    if len(fields) > 8 and fields[0] != "Iface" and is_default(fields):
                        return f"a default route ({path})"
        except OSError:
            pass
    return None


def _isolation_problem() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the soak runs in a Linux network namespace (tools/netns-run)"
    if not (os.environ.get("NETNS_RUN_INSIDE") == "1" or os.environ.get("MCAST_TRIO_TEST_NETNS") == "1"):
        return "not inside a private network namespace: run it as `make soak` or under tools/netns-run"
    route = _default_route()
    if route is not None:
        return f"this network namespace has {route}; refusing to send multicast from it"
    return None


# ---------------------------------------------------------------------------
# The two roles (separate processes)
# ---------------------------------------------------------------------------


def _emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


async def _stdin_closed(stop) -> None:
    import trio

    async with trio.lowlevel.FdStream(os.dup(0)) as stdin:
        while await stdin.receive_some():
            pass
    stop.set()


def _receiver_stats(stats, readouts: int, hits: int) -> dict:
    return {"datagrams": stats.datagrams, "readouts": stats.readouts, "hits": stats.hits,
            "consumed_readouts": readouts, "consumed_hits": hits, "lost": stats.lost,
            "duplicates": stats.duplicates, "reordered": stats.reordered, "restarts": stats.restarts,
            "malformed": stats.malformed, "kernel_drops": stats.kernel_drops, "dropped": stats.dropped,
            "rcvbuf": stats.rcvbuf}


async def _receiver(args) -> None:
    import trio

    from mcast_trio import AstroPix4Readout, open_receiver

    stop = trio.Event()
    readouts = hits = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stdin_closed, stop)
        async with open_receiver(GROUP, args.port, AstroPix4Readout, queue_size=args.queue_size) as rx:
            _emit("joined", rcvbuf=rx.statistics().rcvbuf)

            async def report():
                while True:
                    await trio.sleep(args.interval)
                    _emit("stats", **_receiver_stats(rx.statistics(), readouts, hits))

            nursery.start_soon(report)
            while True:
                with trio.move_on_after(0.5):
                    batch = await rx.receive_batch()
                    readouts += len(batch.readouts) - batch.n_malformed
                    hits += len(batch.hits)
                    continue
                if stop.is_set():
                    break  # the sender is done and nothing came for 0.5 s
            _emit("done", **_receiver_stats(rx.statistics(), readouts, hits))
        nursery.cancel_scope.cancel()


async def _sender(args) -> None:
    import trio

    from mcast_trio import open_sender
    from mcast_trio.sim import DaqSimulator

    stop = trio.Event()
    sim = DaqSimulator(seed=args.seed, start_ns=0, mean_hits=args.mean_hits, split_fraction=0.05,
                       padding_fraction=0.05)
    total = args.datagrams
    rate = args.rate or None
    sent = hits = 0  # hits: the ground truth of the readouts sent
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stdin_closed, stop)
        async with open_sender(GROUP, args.port, queue_size=64, sndbuf=args.sndbuf) as tx:
            start = trio.current_time()
            _emit("started")
            pending: list[bytes] = []
            block = None
            block_sent = 0
            while sent < total and not stop.is_set():
                if not pending:
                    # Generating in blocks is several times cheaper per readout.
                    block = sim.generate(min(4096, total - sent))
                    pending = block.datagrams()[::-1]
                    block_sent = 0
                n = min(args.chunk, len(pending))
                chunk = pending[-n:]
                del pending[-n:]
                await tx.send_many(chunk[::-1])
                sent += n
                block_sent += n
                if not pending:
                    hits += len(block.truth)
                if rate:
                    await trio.sleep_until(start + sent / rate)
                else:
                    await trio.sleep(0)
        elapsed = trio.current_time() - start
        if pending and block_sent:
            # Stopped in the middle of a block: the hits of the readouts sent.
            last_id = int(block.readout_ids[block_sent - 1])
            hits += int((block.truth["readout_id"] <= last_id).sum())
        stats = tx.statistics()
        _emit("done", datagrams=stats.datagrams, errors=stats.errors, waits=stats.waits,
              readouts=sent, hits=hits, seconds=elapsed,
              last_error=stats.last_error)
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# The conductor
# ---------------------------------------------------------------------------


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _Child:
    """A role process with its JSON event lines (read without blocking)."""

    def __init__(self, role: str, args, cpu: int | None, **options) -> None:
        argv = [sys.executable, os.path.abspath(__file__), "--role", role, "--port", str(args.port)]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        self.role = role
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr)
        if cpu is not None:
            try:
                os.sched_setaffinity(self.proc.pid, {cpu})
            except OSError:
                pass
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._buffer = b""
        self.events: list[dict] = []

    def poll_events(self) -> list[dict]:
        try:
            data = os.read(self.proc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            data = b""
        self._buffer += data
        new = []
        while b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            new.append(json.loads(line))
        self.events.extend(new)
        return new

    def wait_for(self, kind: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.poll_events():
                if event["event"] == kind:
                    return event
            if self.proc.poll() is not None:
                self.poll_events()
                found = [e for e in self.events if e["event"] == kind]
                if found:
                    return found[-1]
                raise RuntimeError(f"the {self.role} exited ({self.proc.returncode}) before {kind!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {self.role} sent no {kind!r} within {timeout} s")
            time.sleep(0.01)

    def close_stdin(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def stop(self) -> None:
        self.close_stdin()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _cpus() -> tuple[int | None, int | None]:
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None, None
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)


def _run_pair(args, *, datagrams: int, rate: float, seconds: float | None, progress: bool) -> dict:
    """One sender -> receiver run; returns everything measured."""
    send_cpu, recv_cpu = _cpus()
    receiver = _Child("receiver", args, recv_cpu, queue_size=args.queue_size, interval=args.interval)
    sender = None
    try:
        receiver.wait_for("joined", 30)
        sender = _Child("sender", args, send_cpu, datagrams=datagrams, rate=rate, chunk=args.chunk,
                        mean_hits=args.mean_hits, seed=args.seed, sndbuf=args.sndbuf)
        started = sender.wait_for("started", 30)["t"]
        samples = []  # (seconds since start, receiver RSS, sender RSS, receiver stats or None)
        next_sample = time.monotonic()
        limit = time.monotonic() + seconds if seconds else None
        stopped_early = False
        while sender.proc.poll() is None:
            now = time.monotonic()
            if limit is not None and now >= limit and not stopped_early:
                sender.close_stdin()  # stop sending; it reports what it sent
                stopped_early = True
            if now >= next_sample:
                stats = [e for e in receiver.poll_events() if e["event"] == "stats"]
                sample = (now - started, _rss(receiver.proc.pid), _rss(sender.proc.pid),
                          stats[-1] if stats else None)
                samples.append(sample)
                if progress and stats and len(samples) % 10 == 0:
                    s = stats[-1]
                    print(f"  {sample[0]:7.1f} s  received {s['datagrams']:>12,}  lost {s['lost']:,}"
                          f"  kernel drops {s['kernel_drops']}  receiver RSS {sample[1] / 2**20:.1f} MiB",
                          flush=True)
                next_sample += 1.0
            sender.poll_events()
            time.sleep(0.05)
        sent = sender.wait_for("done", 10)
        receiver.close_stdin()
        final = receiver.wait_for("done", 60)
        receiver.proc.wait(timeout=10)
    finally:
        for child in (sender, receiver):
            if child is not None:
                child.stop()
    return {"sent": sent, "received": final, "samples": samples, "stopped_early": stopped_early}


def _calibrate(args) -> float:
    """The receive rate reached with an unpaced sender (datagrams/s)."""
    run = _run_pair(args, datagrams=args.calibration_datagrams, rate=0, seconds=args.calibration_seconds,
                    progress=False)
    sent, received = run["sent"], run["received"]
    seconds = sent["seconds"]
    sender_rate = sent["datagrams"] / seconds
    # End to end: what the consumer got, not what the receive task took
    # from the socket (the difference was dropped at the channel).
    consumer_rate = received["consumed_readouts"] / seconds
    print(f"calibration: unpaced sender {sender_rate:,.0f}/s; the receiver took"
          f" {received['datagrams'] / seconds:,.0f}/s from the socket, its consumer got {consumer_rate:,.0f}/s"
          f" ({received['consumed_readouts']:,} of {sent['datagrams']:,} in {seconds:.1f} s; kernel drops"
          f" {received['kernel_drops']}, channel drops {received['dropped']:,})")
    return min(sender_rate, consumer_rate)


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y)."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / var if var else 0.0


def _memory(samples, index: int, warmup: float) -> dict | None:
    series = [(x[0], x[index]) for x in samples if x[index] is not None]
    if not series:
        return None
    after = [(t, r) for t, r in series if t >= warmup] or series[-1:]
    return {
        "first": series[0][1],
        "max": max(r for _, r in series),
        "last": series[-1][1],
        "after_warmup": after[0][1],
        "growth_after_warmup": max(r for _, r in after) - after[0][1],
        "slope_bytes_per_min": _slope(after) * 60,
        "samples": len(series),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datagrams", type=int, default=10_000_000, help="datagrams to send (default 10000000)")
    parser.add_argument("--rate", default="auto",
                        help="datagrams per second, or 'auto' (default): measure first, run at --fraction of it")
    parser.add_argument("--fraction", type=float, default=0.5,
                        help="with --rate auto: fraction of the measured receive rate (default 0.5)")
    parser.add_argument("--seconds", type=float, default=None, help="stop sending after this many seconds")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of warm-up excluded from the "
                        "memory check (default 10)")
    parser.add_argument("--max-growth-mib", type=float, default=8.0,
                        help="largest receiver RSS growth after warm-up, MiB (default 8)")
    parser.add_argument("--chunk", type=int, default=256, help="readouts per send_many call (default 256)")
    parser.add_argument("--mean-hits", type=float, default=4.0, help="mean hits per readout (default 4)")
    parser.add_argument("--queue-size", type=int, default=256, help="receiver channel bound, in batches")
    parser.add_argument("--sndbuf", type=int, default=4 * 1024 * 1024, help="sender SO_SNDBUF")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--calibration-seconds", type=float, default=4.0, help=argparse.SUPPRESS)
    parser.add_argument("--calibration-datagrams", type=int, default=5_000_000, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--role", choices=("sender", "receiver"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.role is not None:
        import trio

        if args.role == "sender":
            args.rate = float(args.rate)
        trio.run(_sender if args.role == "sender" else _receiver, args)
        return 0

    problem = _isolation_problem()
    if problem is not None:
        print(f"soak: {problem}", file=sys.stderr)
        return 2

    import mcast_trio

    print(f"mcast_trio {mcast_trio.__version__} ({mcast_trio.decoder_backend()} decoder), Python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs; sender/receiver pinned to CPUs {_cpus()}")
    if args.rate == "auto":
        measured = _calibrate(args)
        rate = int(measured * args.fraction // 1000 * 1000) or 1000
        how = f"{args.fraction:g} x the measured {measured:,.0f}/s"
    else:
        rate = float(args.rate)
        how = "--rate"
    expected = args.datagrams / rate if rate else 0
    print(f"soak: {args.datagrams:,} datagrams at {rate:,.0f}/s ({how}), about {expected / 60:.1f} min"
          + (f", at most {args.seconds:g} s" if args.seconds else ""), flush=True)

    run = _run_pair(args, datagrams=args.datagrams, rate=rate, seconds=args.seconds, progress=True)
    sent, got, samples = run["sent"], run["received"], run["samples"]
    receiver_memory = _memory(samples, 1, args.warmup)
    sender_memory = _memory(samples, 2, args.warmup)
    missing = sent["datagrams"] - got["datagrams"] + got["duplicates"]
    results = {
        "rate": rate, "rate_source": how, "seconds": sent["seconds"],
        "achieved_rate": sent["datagrams"] / sent["seconds"] if sent["seconds"] else 0.0,
        "stopped_early": run["stopped_early"],
        "sent": sent, "received": got, "missing": missing,
        "receiver_rss": receiver_memory, "sender_rss": sender_memory,
        "rss_samples": [[round(t, 2), r, s] for t, r, s, _ in samples],
    }

    def mib(value):
        return f"{value / 2**20:.1f} MiB"

    print(f"\nsent      {sent['datagrams']:>14,} datagrams in {sent['seconds']:.1f} s"
          f" ({results['achieved_rate']:,.0f}/s), {sent['readouts']:,} readouts, {sent['hits']:,} hits (truth)"
          + ("  [stopped by --seconds]" if run["stopped_early"] else ""))
    print(f"received  {got['datagrams']:>14,} datagrams, {got['readouts']:,} readouts,"
          f" {got['hits']:,} hits (consumer: {got['consumed_readouts']:,} readouts, {got['consumed_hits']:,} hits)")
    print(f"lost {got['lost']:,}  missing {missing:,}  malformed {got['malformed']:,}  kernel drops"
          f" {got['kernel_drops']}  dropped {got['dropped']:,}  duplicates {got['duplicates']:,}"
          f"  reordered {got['reordered']:,}  (receive buffer {got['rcvbuf']:,} bytes)")
    for who, memory in (("receiver", receiver_memory), ("sender", sender_memory)):
        if memory:
            print(f"{who} RSS: first {mib(memory['first'])}, max {mib(memory['max'])}, last {mib(memory['last'])};"
                  f" after {args.warmup:g} s warm-up: {mib(memory['after_warmup'])}, growth"
                  f" {mib(memory['growth_after_warmup'])}, slope {memory['slope_bytes_per_min'] / 2**10:+.1f} KiB/min"
                  f" ({memory['samples']} samples)")

    failures = []
    if missing or got["lost"] or got["malformed"] or got["dropped"] or got["kernel_drops"]:
        failures.append("loss")
    if sent["errors"]:
        failures.append(f"{sent['errors']} send errors ({sent['last_error']})")
    if got["hits"] != sent["hits"] and not missing:
        failures.append(f"hits {got['hits']:,} != truth {sent['hits']:,}")
    if receiver_memory is None or receiver_memory["growth_after_warmup"] > args.max_growth_mib * 2**20:
        failures.append(f"receiver memory grew more than {args.max_growth_mib:g} MiB after warm-up")
    results["failures"] = failures
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("\nresult:", "FAIL: " + "; ".join(failures) if failures else "PASS (no loss, memory flat)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
