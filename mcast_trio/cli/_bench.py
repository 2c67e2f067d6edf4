"""``mcast-trio bench``: short decode and transport benchmarks that run from
an installed package (public API only), ratios printed; ``--full`` runs the
repository's own benchmark scripts when a source checkout is found."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import click
import trio

import mcast_trio
from .. import AstroPix4Readout, decode_readouts, decoder_backend, open_receiver, open_sender, resolve_group
from ..sim import DaqSimulator
from ._common import SENT_MEAN_HITS, PORT, Number, emit_json, fail, run

__all__ = ["COMMANDS"]

#: Default group and port of the transport benchmarks: not the shift's
#: default group, so that a benchmark never mixes into live traffic.
BENCH_GROUP = "239.255.77.11"
BENCH_PORT = 47311
_CHUNK = 1024
_BENCHMARKS = ("decode", "transport", "send")


def _best(function, repeats: int) -> float:
    """Best wall time of ``repeats`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - t0)
    return best


# -- decode ----------------------------------------------------------------------------------


def bench_decode(readouts: int, mean_hits: float, repeats: int) -> dict:
    """Hits per second of :func:`decode_readouts` in batches of several sizes
    against decoding one readout object at a time (``from_bytes().decode()``
    carrying the extra bytes, astropix-analysis' way)."""
    sim = DaqSimulator(7, start_ns=0, mean_hits=mean_hits, split_fraction=0.02)
    datagrams = sim.datagrams(readouts)
    hits = len(decode_readouts(datagrams).hits)
    results = {}

    def per_readout():
        extra = None
        for d in datagrams:
            r = AstroPix4Readout.from_bytes(d)
            r.decode(extra)
            extra = r.extra_bytes()

    seconds = _best(per_readout, max(1, repeats // 2))
    results["per readout (from_bytes + decode)"] = hits / seconds
    for size in (1, 64, 1024, len(datagrams)):
        chunks = [datagrams[i:i + size] for i in range(0, len(datagrams), size)]

        def batched(chunks=chunks):
            extra, last = None, -1
            for chunk in chunks:
                batch = decode_readouts(chunk, extra_bytes=extra, last_id=last)
                extra, last = batch.extra_bytes, batch.last_id

        name = f"decode_readouts, batches of {size}" if size != len(datagrams) else \
            f"decode_readouts, one batch ({size})"
        results[name] = hits / _best(batched, repeats)
    base = results["per readout (from_bytes + decode)"]
    return {
        "benchmark": "decode",
        "backend": decoder_backend(),
        "readouts": readouts,
        "hits": hits,
        "bytes_per_readout": sum(map(len, datagrams)) / len(datagrams),
        "rows": [{"case": name, "hits_per_s": rate, "ratio": rate / base} for name, rate in results.items()],
    }


# -- transport ---------------------------------------------------------------------------------


def _plain_sender(group: str, port: int) -> socket.socket:
    """A plain IPv4 socket sending to ``group`` on loopback (the baseline)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    sock.connect((group, port))
    return sock


def _plain_receiver(group: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((group, port))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                    socket.inet_aton(group) + socket.inet_aton("127.0.0.1"))
    sock.setblocking(False)
    return sock


def _plain_loop(group: str, port: int, datagrams: list[bytes], total: int) -> dict:
    """A plain Python loop: ``sendto`` each datagram, then drain the
    receiving socket with ``recv`` after every chunk."""
    tx, rx = _plain_sender(group, port), _plain_receiver(group, port)
    try:
        received = 0
        n = len(datagrams)
        cpu0, t0 = time.process_time(), time.perf_counter()
        sent = 0
        while sent < total:
            for i in range(min(_CHUNK, total - sent)):
                tx.send(datagrams[(sent + i) % n])
            sent += min(_CHUNK, total - sent)
            while True:
                try:
                    rx.recv(65536)
                except BlockingIOError:
                    break
                received += 1
        deadline = time.perf_counter() + 0.2
        while received < sent and time.perf_counter() < deadline:
            try:
                rx.recv(65536)
                received += 1
            except BlockingIOError:
                time.sleep(0.001)
        return _transport_row("plain Python sendto/recv loop", sent, received, cpu0, t0)
    finally:
        tx.close()
        rx.close()


def _transport_row(case: str, sent: int, received: int, cpu0: float, t0: float) -> dict:
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {"case": case, "sent": sent, "received": received, "loss": (sent - received) / sent if sent else 0.0,
            "seconds": wall, "datagrams_per_s": received / wall if wall > 0 else 0.0,
            "cpu_us_per_datagram": cpu / max(received, 1) * 1e6}


async def _mcast_trio_pair(group: str, port: int, datagrams: list[bytes], total: int) -> dict:
    """open_sender ``send_many`` -> open_receiver ``batches()`` in one trio
    loop, chunks of 1024."""
    n = len(datagrams)
    received = 0
    done = trio.Event()
    async with open_receiver(group, port, readout_class=AstroPix4Readout) as rx, \
            open_sender(group, port, framing="raw") as tx:
        async def consume():
            nonlocal received
            async for batch in rx.batches():
                received += len(batch.readouts)
                if received >= total:
                    done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await trio.sleep(0.02)
            cpu0, t0 = time.process_time(), time.perf_counter()
            sent = 0
            while sent < total:
                k = min(_CHUNK, total - sent)
                start = sent % n
                chunk = datagrams[start:start + k]
                if len(chunk) < k:
                    chunk += datagrams[:k - len(chunk)]
                await tx.send_many(chunk)
                sent += k
                await trio.sleep(0)  # let the receiver run between chunks
            await tx.flush()
            with trio.move_on_after(0.2):
                await done.wait()
            row = _transport_row("mcast_trio send_many -> batches()", sent, received, cpu0, t0)
            stats = rx.statistics()
            row["kernel_drops"] = stats.kernel_drops
            row["dropped"] = stats.dropped
            nursery.cancel_scope.cancel()
    return row


def _readouts_for_transport(mean_hits: float, pool: int = 4096) -> list[bytes]:
    # Ids restart every pass through the pool: the receiver counts restarts,
    # which does not matter here.
    return DaqSimulator(11, start_ns=0, mean_hits=mean_hits).datagrams(pool)


async def bench_transport(group: str, port: int, total: int, mean_hits: float) -> dict:
    datagrams = _readouts_for_transport(mean_hits)
    rows = [await _mcast_trio_pair(group, port, datagrams, total),
            _plain_loop(group, port, datagrams, total)]
    base = rows[1]
    for row in rows:
        row["rate_ratio"] = row["datagrams_per_s"] / base["datagrams_per_s"] if base["datagrams_per_s"] else None
        row["cpu_ratio"] = row["cpu_us_per_datagram"] / base["cpu_us_per_datagram"]
    return {"benchmark": "transport", "group": f"{group}:{port}", "datagrams": total,
            "bytes_per_datagram": sum(map(len, datagrams)) / len(datagrams), "rows": rows}


async def bench_send(group: str, port: int, total: int, mean_hits: float) -> dict:
    """Datagrams handed to the kernel per second: ``send_many`` (nobody
    listening) against a plain ``sendto`` loop."""
    datagrams = _readouts_for_transport(mean_hits)
    n = len(datagrams)
    rows = []
    async with open_sender(group, port, framing="raw") as tx:
        cpu0, t0 = time.process_time(), time.perf_counter()
        sent = 0
        while sent < total:
            k = min(_CHUNK, total - sent)
            start = sent % n
            await tx.send_many(datagrams[start:start + k] if start + k <= n else
                               datagrams[start:] + datagrams[:k - (n - start)])
            sent += k
        await tx.flush()
        errors = tx.statistics().errors
    row = _transport_row("mcast_trio send_many", sent, sent - errors, cpu0, t0)
    rows.append(row)
    sock = _plain_sender(group, port)
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        for i in range(total):
            sock.send(datagrams[i % n])
        rows.append(_transport_row("plain Python sendto loop", total, total, cpu0, t0))
    finally:
        sock.close()
    for row in rows:
        row.pop("received")
        row.pop("loss")
        row["rate_ratio"] = row["datagrams_per_s"] / rows[-1]["datagrams_per_s"]
    return {"benchmark": "send", "group": f"{group}:{port}", "datagrams": total, "rows": rows}


# -- output ------------------------------------------------------------------------------------


def _print(result: dict) -> None:
    name = result["benchmark"]
    if name == "decode":
        click.echo(f"decode: {result['readouts']:,} simulated readouts, {result['hits']:,} hits "
                   f"(~{result['bytes_per_readout']:.0f} B each), backend {result['backend']}")
        click.echo(f"  {'case':<40}{'hits/s':>14}{'ratio':>9}")
        for row in result["rows"]:
            click.echo(f"  {row['case']:<40}{row['hits_per_s']:>14,.0f}{row['ratio']:>8.1f}x")
    elif name in ("transport", "send"):
        click.echo(f"{name}: {result['datagrams']:,} datagrams to {result['group']} on loopback, one process")
        click.echo(f"  {'case':<36}{'datagrams/s':>13}{'loss':>8}{'CPU us/dgram':>14}{'rate ratio':>12}")
        for row in result["rows"]:
            loss = f"{row['loss'] * 100:.1f}%" if "loss" in row else "-"
            click.echo(f"  {row['case']:<36}{row['datagrams_per_s']:>13,.0f}{loss:>8}"
                       f"{row['cpu_us_per_datagram']:>14.2f}{row['rate_ratio']:>11.2f}x")


async def _network_benchmarks(which, group, port, datagrams, mean_hits, as_json) -> None:
    for name in which:
        bench = bench_transport if name == "transport" else bench_send
        result = await bench(group, port, datagrams, mean_hits)
        emit_json(result) if as_json else _print(result)


def _benchmarks_dir() -> pathlib.Path | None:
    """The repository's ``benchmarks/`` beside the package (a source checkout)."""
    candidate = pathlib.Path(mcast_trio.__file__).resolve().parent.parent / "benchmarks"
    return candidate if (candidate / "bench_decode.py").is_file() else None


@click.command("bench")
@click.argument("which", type=click.Choice([*_BENCHMARKS, "all"]), default="all")
@click.option("--datagrams", type=Number(1, 10**9, integer=True), default=100_000, show_default=True,
              help="Datagrams per transport/send run.")
@click.option("--readouts", type=Number(1, 10**8, integer=True), default=20_000, show_default=True,
              help="Simulated readouts for the decode benchmark.")
@click.option("--mean-hits", type=Number(0.0, SENT_MEAN_HITS.high, low_open=True), default=12.0,
              show_default=True, help="Mean hits per simulated readout (hits per second need hits; "
                                      "readouts one datagram carries).")
@click.option("--repeats", type=Number(1, 1000, integer=True), default=3, show_default=True,
              help="Decode runs per case; the best is kept.")
@click.option("--group", "-g", default=BENCH_GROUP, show_default=True,
              help="IPv4 multicast group of the network benchmarks (loopback).")
@click.option("--port", "-p", type=PORT, default=BENCH_PORT, show_default=True, help="Their UDP port.")
@click.option("--full", is_flag=True,
              help="Also run the repository's benchmarks/*.py (source checkout only; minutes).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per benchmark.")
def bench_command(which, datagrams, readouts, mean_hits, repeats, group, port, full, as_json):
    """Measure decoding and transport speed here, ratios printed.

    decode: hits/s of decode_readouts in batches (1, 64, 1024, all) against
    decoding readout objects one at a time, in-process. transport: an
    open_sender -> open_receiver pair on loopback in one process against a
    plain Python socket loop (rate, loss, CPU per datagram). send: send rate
    of send_many against a plain sendto loop. A few seconds each. --full
    also runs the repository's scripts (two-process transport, receive-path
    CPU per datagram, the pure-Python reference decoder). Run the
    network ones inside a private network namespace or on a host where
    loopback multicast to the benchmark group is harmless.

    \b
    Examples:
      mcast-trio bench decode
      mcast-trio bench transport --datagrams 500000
      mcast-trio bench all --json
      tools/netns-run mcast-trio bench --full      # plus benchmarks/*.py
    """
    try:
        spec = resolve_group(group, port)
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), param_hint="'--group'") from None
    if spec.family != socket.AF_INET or spec.unicast:
        raise click.BadParameter(f"{group!r}: the benchmarks need an IPv4 multicast group (the plain "
                                 "socket baseline is IPv4)", param_hint="'--group'")
    names = list(_BENCHMARKS) if which == "all" else [which]
    bench_dir = _benchmarks_dir() if full else None
    if full and bench_dir is None:
        raise fail("--full needs a source checkout: benchmarks/ was not found beside the mcast_trio package")
    if "decode" in names:
        result = bench_decode(readouts, mean_hits, repeats)
        emit_json(result) if as_json else _print(result)
    network = [name for name in names if name != "decode"]
    if network:
        run(_network_benchmarks, network, spec.group, port, datagrams, mean_hits, as_json)
    if bench_dir is not None:
        scripts = {"decode": ["bench_decode.py"], "transport": ["bench_transport.py", "bench_receive_path.py"],
                   "send": ["bench_send.py"]}
        for name in names:
            for script in scripts[name]:
                click.echo(f"== {script} ==", err=as_json)
                code = subprocess.call([sys.executable, str(bench_dir / script)], env=dict(os.environ))
                if code:
                    raise fail(f"{script} exited with status {code}")


COMMANDS = [bench_command]
