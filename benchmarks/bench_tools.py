"""The shift tools at the transport's top rate, side by side in one run.

* receivers: a sender process floods pre-generated simulator readouts
  (``send_many``, as fast as it goes, ``--seconds``) into, in turn, a bare
  receiver (``open_receiver`` consuming ``batches()``, nothing else) and
  ``mcast-trio monitor --headless --json``: received/sent and CPU per readout
  of each, so the monitor's own cost shows against the bare receive path;
* the monitor's display: frames built and rendered with rich (a full 32x32
  map, 3 senders) in-process: CPU per frame, frames/s on one core, share of
  a core at the default 4 frames/s;
* the recorder: the same flood into ``mcast-trio record``, readouts/s and
  MB/s written, against copying the recorded file's bytes (``cat``-speed).

Run inside the private network namespace (``make bench`` does):
``tools/netns-run python benchmarks/bench_tools.py``. The commands run as
users run them: the installed ``mcast-trio`` script beside this Python, else
``python -m mcast_trio.cli``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

GROUP = "239.255.77.21"
PORT = 47400


def _cli() -> list[str]:
    script = pathlib.Path(sys.executable).parent / "mcast-trio"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mcast_trio.cli"]


def _cpu_of(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the roles (this script started again) ------------------------------------------------------

def role_send(seconds: float, pool: int) -> None:
    import trio

    from mcast_trio import open_sender
    from mcast_trio.sim import DaqSimulator

    datagrams = DaqSimulator(seed=5, mean_hits=4.0).generate(pool).datagrams()

    async def main():
        async with open_sender(GROUP, PORT, framing="raw") as sender:
            print("ready", flush=True)
            sys.stdin.readline()
            start = trio.current_time()
            sent = 0
            while trio.current_time() - start < seconds and sent < len(datagrams):
                await sender.send_many(datagrams[sent:sent + 1024])
                sent += len(datagrams[sent:sent + 1024])
                await trio.lowlevel.checkpoint()
            await sender.flush()
            elapsed = trio.current_time() - start
        print(json.dumps({"sent": sent, "seconds": elapsed}), flush=True)

    trio.run(main)


def role_bare() -> None:
    import trio

    from mcast_trio import AstroPix4Readout, open_receiver

    async def main():
        async with open_receiver(GROUP, PORT, AstroPix4Readout) as receiver:
            print("ready", file=sys.stderr, flush=True)
            count = 0
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    async def consume():
                        nonlocal count
                        async for batch in receiver.batches():
                            count += len(batch.readouts)
                    nursery.start_soon(consume)
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
            stats = receiver.statistics()
        print(json.dumps({"readouts": count, "kernel_drops": stats.kernel_drops, "dropped": stats.dropped}))

    trio.run(main)


# -- the parent ---------------------------------------------------------------------------------

def _flood(receiver: subprocess.Popen, seconds: float, pool: int) -> tuple[dict, float, float]:
    """Run the sender against ``receiver``; (sender result, receiver CPU s, wall s) of the burst."""
    sender = subprocess.Popen([sys.executable, __file__, "--role", "send", "--seconds", str(seconds),
                               "--pool", str(pool)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert sender.stdout.readline().strip() == "ready"
    cpu0, wall0 = _cpu_of(receiver.pid), time.monotonic()
    sender.stdin.write("go\n")
    sender.stdin.flush()
    sent = json.loads(sender.stdout.readline())
    sender.wait()
    time.sleep(0.3)  # the receiver drains its socket
    return sent, _cpu_of(receiver.pid) - cpu0, time.monotonic() - wall0


def bench_receivers(seconds: float, pool: int) -> list[dict]:
    rows = []
    cases = [("bare receiver (batches())", [sys.executable, __file__, "--role", "bare"]),
             ("mcast-trio monitor --headless --json",
              [*_cli(), "monitor", "--headless", "--json", "-g", f"{GROUP}:{PORT}"])]
    for name, argv in cases:
        receiver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    cwd=tempfile.gettempdir())
        receiver.stderr.readline()  # it has joined
        sent, cpu, wall = _flood(receiver, seconds, pool)
        receiver.send_signal(signal.SIGTERM)
        out, _ = receiver.communicate(timeout=30)
        last = json.loads(out.strip().splitlines()[-1])
        got = last["readouts"] if "readouts" in last else last["total"]["readouts"]
        rows.append(dict(case=name, sent=sent["sent"], rate=sent["sent"] / sent["seconds"], received=got,
                         cpu_us_per_readout=cpu / max(got, 1) * 1e6, cores=cpu / wall))
    return rows


def bench_display(frames: int) -> dict:
    from rich.console import Console

    from mcast_trio import ReceiverStatistics, SenderStats
    from mcast_trio.cli._accumulate import Accumulator
    from mcast_trio.cli._monitor import UiState, render_frame
    from mcast_trio.sim import DaqSimulator

    batch = DaqSimulator(seed=1, rows=32, columns=32, mean_hits=4).generate(50_000)
    acc = Accumulator()
    acc.add(batch.truth, len(batch))
    senders = {("127.0.0.1", 40000 + i): SenderStats(received=1000 * i) for i in range(3)}
    for t in range(130):
        acc.observe(float(t), ReceiverStatistics(readouts=1000 * t, hits=4000 * t, bytes=60000 * t,
                                                 senders=senders))
    ui = UiState(log=False, run="bench", title=f"{GROUP}:{PORT}", started=0.0, snapshot_dir=pathlib.Path("."))
    console = Console(file=io.StringIO(), width=140, height=50, force_terminal=True, color_system="256")
    cpu0 = time.process_time()
    built = [render_frame(acc, 130.0, ui) for _ in range(frames)]
    cpu1 = time.process_time()
    for frame in built:
        console.file = io.StringIO()
        console.print(frame)
    cpu2 = time.process_time()
    per_frame = (cpu2 - cpu0) / frames
    return dict(build_ms=(cpu1 - cpu0) / frames * 1e3, render_ms=(cpu2 - cpu1) / frames * 1e3,
                frames_per_core_s=1 / per_frame, core_share_at_4fps=4 * per_frame)


def bench_recorder(seconds: float, pool: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "run.apx"
        recorder = subprocess.Popen([*_cli(), "record", str(out), "-g", f"{GROUP}:{PORT}", "--json"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp)
        recorder.stderr.readline()  # "recording ..."
        sent, cpu, wall = _flood(recorder, seconds, pool)
        recorder.send_signal(signal.SIGTERM)
        summary = json.loads(recorder.communicate(timeout=60)[0])
        size = out.stat().st_size
        copy = pathlib.Path(tmp) / "copy.apx"
        t0 = time.perf_counter()
        with open(out, "rb") as src, open(copy, "wb") as dst:  # what `cat run.apx > copy` does
            shutil.copyfileobj(src, dst, 1 << 20)
        cat_s = time.perf_counter() - t0
    written = summary["readouts_written"]
    return dict(sent=sent["sent"], rate=sent["sent"] / sent["seconds"], written=written,
                readouts_per_s=written / sent["seconds"], mb_per_s=size / sent["seconds"] / 1e6,
                cpu_us_per_readout=cpu / max(written, 1) * 1e6, cat_mb_per_s=size / cat_s / 1e6, bytes=size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["send", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each flood (default 4)")
    parser.add_argument("--pool", type=int, default=1_000_000, help="readouts generated for a flood")
    parser.add_argument("--frames", type=int, default=200, help="display frames rendered")
    args = parser.parse_args()
    if args.role == "send":
        return role_send(args.seconds, args.pool)
    if args.role == "bare":
        return role_bare()
    print(f"floods of {args.seconds:g} s, pre-generated simulator readouts (~4 hits), one sender process")
    print(f"{'receiver':<40}{'sent/s':>10}{'received/sent':>15}{'CPU us/readout':>16}{'cores':>7}")
    for row in bench_receivers(args.seconds, args.pool):
        print(f"{row['case']:<40}{row['rate']:>10,.0f}{row['received'] / row['sent']:>15.4f}"
              f"{row['cpu_us_per_readout']:>16.2f}{row['cores']:>7.2f}")
    d = bench_display(args.frames)
    print(f"display (32x32 map, 3 senders): build {d['build_ms']:.2f} ms + rich {d['render_ms']:.2f} ms CPU/frame; "
          f"{d['frames_per_core_s']:.0f} frames/s on one core; {d['core_share_at_4fps'] * 100:.1f} % of a core "
          "at 4 frames/s")
    r = bench_recorder(args.seconds, args.pool)
    print(f"recorder: sent {r['rate']:,.0f}/s, written {r['written']:,} of {r['sent']:,} readouts "
          f"({r['readouts_per_s']:,.0f} readouts/s, {r['mb_per_s']:.1f} MB/s, {r['cpu_us_per_readout']:.2f} us CPU "
          f"per readout); copying the same {r['bytes'] / 1e6:.1f} MB: {r['cat_mb_per_s']:,.0f} MB/s "
          f"(recorder/cat {r['mb_per_s'] / r['cat_mb_per_s']:.3f}x)")


if __name__ == "__main__":
    main()
