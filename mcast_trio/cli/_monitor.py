"""``mcast-trio monitor``: the live monitor of a DAQ shift.

A trio service, all in one nursery (a crash in one task is never silent):
the library's receive task (``open_receiver`` in readout mode) counts every
datagram; the accumulator task consumes its decoded batches into a hit map
and a TOT histogram; the sampler reads ``statistics()`` a few times a second
(rates, alive/stale, alarms, a new run); the display task shows it: a rich
``Live`` screen in a terminal (rendered by rich's own thread from frames the
display task builds) or one line (``--json``: one JSON object) per interval
with ``--headless`` (through a :class:`~mcast_trio.Sink` on standard output,
so a stalled reader never stops the receive task); the key task reads single
key presses in the terminal.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import pathlib
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import click
import numpy as np
import trio

from .. import AstroPix4Readout, open_receiver
from ._accumulate import (
    DEFAULT_TOT_MAX_US,
    Accumulator,
    shade_rows,
    sparkline,
    text_bars,
)
from ._common import FRACTION, MAX_SECONDS, SECONDS, TOT_US, Number, network_options, run, stop_on_signals
from ._output import is_reader_gone, json_line, open_stdout, reader_gone

__all__ = ["COMMANDS", "MonitorConfig", "serve_monitor", "render_frame"]

#: How often the sampler reads the receiver's statistics (seconds).
SAMPLE_PERIOD = 0.25
#: Headless reports waiting for standard output; beyond, the oldest waiting
#: report is dropped and counted (``output`` in the JSON, ``output_dropped`` in the text line,
#: and a line on stderr at exit): a stalled reader never stops the receiver.
OUTPUT_QUEUE = 16


@dataclasses.dataclass
class MonitorConfig:
    """What the command line asked for."""

    headless: bool = False
    json: bool = False
    interval: float = 1.0
    seconds: float | None = None
    stale: float = 5.0
    loss_alarm: float = 0.01
    log: bool = False
    fps: float = 4.0
    snapshot_dir: pathlib.Path = pathlib.Path(".")
    run: str | None = None
    tot_max: float = DEFAULT_TOT_MAX_US
    screen: bool = False
    title: str = ""


@dataclasses.dataclass
class UiState:
    """The display's own state: scale, messages, snapshot numbering."""

    log: bool
    run: str
    title: str
    started: float
    snapshot_dir: pathlib.Path
    snapshots: int = 0
    message: str = ""
    quit: bool = False
    #: Headless: the standard output sink (a :class:`~mcast_trio.Sink`).
    output: Any = None


def _now() -> float:
    return time.monotonic()


# -- tasks --------------------------------------------------------------------


#: Seconds between two statistics checks of the accumulator task (a
#: statistics snapshot costs ~12 us; a restart seen there resets the
#: accumulators before the batch that follows it is added).
RESTART_CHECK = 0.002


async def _accumulate(receiver, acc: Accumulator, ui: UiState, rate_point: bool | None) -> None:
    """Consume every decoded batch into the accumulators.

    A new run (a sender's readout ids started over) resets them before the
    batch in which the receive task counted the restart is added, so the
    new run's map starts with its first batch (a batch that holds the end
    of the old run and the start of the new one is counted in the new)."""
    checked = -math.inf
    async for batch in receiver.batches():
        now = _now()
        if now - checked >= RESTART_CHECK:
            checked = now
            events = acc.observe(now, receiver.statistics(), rate_point=rate_point)
            if events:
                ui.message = events[-1]
        acc.add(batch.hits, len(batch.readouts))


async def _sample(receiver, acc: Accumulator, ui: UiState | None, rate_point: bool | None) -> None:
    """Read the statistics a few times a second: rates, alive/stale, restarts
    (a new run resets the accumulators)."""
    while True:
        events = acc.observe(_now(), receiver.statistics(), rate_point=rate_point)
        if events and ui is not None:
            ui.message = events[-1]
        await trio.sleep(SAMPLE_PERIOD)


def summary(acc: Accumulator, now: float, ui: UiState, *, final: bool = False) -> dict:
    """The JSON object of one headless report: the receiver's counters
    (cumulative, named as in ``statistics()``), per sender (named as in
    ``SenderStats``), rates, the map since its last reset, alarms."""
    rates = acc.rates
    rows, columns = acc.shape
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        "elapsed": round(now - ui.started, 3),
        "run": ui.run,
        "total": acc.counters(since_reset=False),
        "rates": {"readouts_per_s": round(rates.readouts, 1), "hits_per_s": round(rates.hits, 1),
                  "mb_per_s": round(rates.mbytes, 4), "datagrams_per_s": round(rates.datagrams, 1)},
        "senders": {
            view.name: {**view.counters, "readouts_per_s": round(view.readouts_per_s, 1),
                        "hits_per_s": round(view.hits_per_s, 1), "mb_per_s": round(view.mbytes_per_s, 4),
                        "alive": view.alive, "silent_s": round(view.age, 2)}
            for view in acc.senders(now, since_reset=False)
        },
        "map": {"rows": rows, "columns": columns, "readouts": acc.readouts, "hits": acc.hits,
                "tot_mean_us": None if math.isnan(acc.tot_mean) else round(acc.tot_mean, 3),
                "resets": acc.resets, "auto_resets": acc.auto_resets},
        "hottest": [{"row": r, "column": c, "hits": n} for r, c, n in acc.hottest(5)],
        "alarms": acc.alarms(now),
        # sources whose per-source malformed counts were forgotten to bound memory
        "sources_evicted": acc.sources_evicted,
        "events": list(acc.events),
        "output": _output_counters(ui),
        "final": final,
    }


def _output_counters(ui: UiState) -> dict:
    """What standard output took: reports written, dropped (the reader did
    not keep up), discarded (written never: the reader went away)."""
    if ui.output is None:
        return {"written": 0, "dropped": 0, "discarded": 0}
    o = ui.output.statistics()
    return {"written": o.written, "dropped": o.dropped, "discarded": o.discarded}


def text_line(acc: Accumulator, now: float, ui: UiState) -> str:
    """One headless text line."""
    c = acc.counters(since_reset=False)
    r = acc.rates
    hottest = acc.hottest(1)
    hot = f"hottest r{hottest[0][0]} c{hottest[0][1]}={hottest[0][2]:,}" if hottest else "hottest -"
    senders = acc.senders(now)
    alive = sum(v.alive for v in senders)
    line = (f"{now - ui.started:7.1f}s readouts {c['readouts']:,} ({r.readouts:,.0f}/s) hits {c['hits']:,} "
            f"({r.hits:,.0f}/s) {r.mbytes:.2f} MB/s lost {c['lost']} dup {c['duplicates']} "
            f"reord {c['reordered']} restarts {c['restarts']} malformed {c['malformed']} "
            f"dropped {c['dropped']} kernel_drops {c['kernel_drops']} senders {alive}/{len(senders)} alive "
            f"{hot} output_dropped {_output_counters(ui)['dropped']}")
    if acc.sources_evicted:
        line += f" sources_evicted {acc.sources_evicted:,}"
    alarms = acc.alarms(now)
    if alarms:
        line += " ALARM: " + "; ".join(alarms)
    return line


async def _report(receiver, acc: Accumulator, ui: UiState, config: MonitorConfig) -> None:
    """Headless: one line (or JSON object) per interval."""
    start = trio.current_time()
    n = 0
    while True:
        n += 1
        await trio.sleep_until(start + n * config.interval)
        _emit(receiver, acc, ui, config)


def _emit(receiver, acc: Accumulator, ui: UiState, config: MonitorConfig, *, final: bool = False) -> None:
    now = _now()
    acc.observe(now, receiver.statistics(), rate_point=not final)
    if config.json:
        ui.output.offer(json_line(summary(acc, now, ui, final=final)))
        acc.events.clear()
    else:
        ui.output.offer(text_line(acc, now, ui) + "\n")


async def _display(acc: Accumulator, ui: UiState, config: MonitorConfig) -> None:
    """The terminal: build a frame ``fps`` times a second; rich's ``Live``
    thread takes the latest one when it refreshes.

    The trio task never waits for the terminal: it only replaces a
    reference, and ``Live`` fetches it from its own thread
    (``get_renderable``), so a terminal that does not take output (a
    stalled ssh session, Ctrl-S) stops the screen, not the counting."""
    from rich.console import Console
    from rich.live import Live

    latest = [render_frame(acc, _now(), ui)]
    period = 1.0 / config.fps
    with Live(console=Console(), get_renderable=lambda: latest[0], screen=config.screen, auto_refresh=True,
              refresh_per_second=config.fps, redirect_stdout=False, redirect_stderr=False):
        try:
            while True:
                await trio.sleep(period)
                latest[0] = render_frame(acc, _now(), ui)
        finally:
            latest[0] = render_frame(acc, _now(), ui)  # Live draws it once more on exit


async def _keys(acc: Accumulator, ui: UiState, cancel_scope: trio.CancelScope, nursery) -> None:
    """Read key presses (cbreak mode; the terminal is restored on exit)."""
    fd = sys.stdin.fileno()
    if not os.isatty(fd):
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        while True:
            await trio.lowlevel.wait_readable(fd)
            data = os.read(fd, 64)
            if not data:
                return
            for key in data.decode("utf-8", "ignore").lower():
                if key == "q":
                    ui.quit = True
                    cancel_scope.cancel()
                    return
                if key == "r":
                    acc.reset(_now())
                    ui.message = "reset by hand"
                elif key == "l":
                    ui.log = not ui.log
                    ui.message = f"scale: {'log' if ui.log else 'linear'}"
                elif key == "s":
                    ui.snapshots += 1
                    nursery.start_soon(_snapshot, acc.arrays(), ui, ui.snapshots)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _snapshot(arrays: dict, ui: UiState, seq: int) -> None:
    """Write ``{run}-{seq:03d}.npz`` (the accumulators) and, with
    matplotlib, ``.png`` (map and spectrum), never over an existing file."""
    directory = ui.snapshot_dir
    try:
        path = await trio.to_thread.run_sync(_write_snapshot, arrays, directory, ui.run, seq)
    except OSError as exc:
        ui.message = f"snapshot failed: {exc}"
        return
    ui.message = f"snapshot {path}"


def _check_run_name(value: str | None) -> str | None:
    """A run name becomes part of file names: letters, digits, ``._-+`` only."""
    if value is not None and (not value or not all(ch.isalnum() or ch in "._-+" for ch in value)
                              or value.startswith(".")):
        raise click.BadParameter(f"{value!r} is not a run name; allowed: letters, digits and ._-+ "
                                 "(not starting with a dot)", param_hint="'--run'")
    return value


def _write_snapshot(arrays: dict, directory: pathlib.Path, run_name: str, seq: int) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    while True:
        stem = directory / f"{run_name}-{seq:03d}"
        if not stem.with_suffix(".npz").exists() and not stem.with_suffix(".png").exists():
            break
        seq += 1
    with open(stem.with_suffix(".npz"), "xb") as out:
        np.savez(out, **arrays)
    written = [".npz"]
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        pass
    else:
        fig = Figure(figsize=(10, 4))
        FigureCanvasAgg(fig)
        ax_map, ax_tot = fig.subplots(1, 2)
        hitmap = arrays["hitmap"]
        used_rows = np.flatnonzero(hitmap.any(axis=1))
        used_cols = np.flatnonzero(hitmap.any(axis=0))
        rows = used_rows[-1] + 1 if len(used_rows) else 1
        cols = used_cols[-1] + 1 if len(used_cols) else 1
        image = ax_map.imshow(hitmap[:rows, :cols], origin="lower", aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=ax_map, label="hits")
        ax_map.set(xlabel="column", ylabel="row", title=f"hit map ({int(arrays['hits']):,} hits)")
        edges = arrays["tot_edges"]
        ax_tot.stairs(arrays["tot_counts"], edges)
        ax_tot.set(xlabel="TOT (us)", ylabel="hits",
                   title=f"TOT spectrum (overflow {int(arrays['tot_overflow']):,})")
        fig.suptitle(f"{run_name} snapshot {seq:03d}")
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=90)
        written.append(".png")
    return f"{stem}{'/'.join(written)}"


async def _stop_after(seconds: float, cancel_scope: trio.CancelScope) -> None:
    await trio.sleep(seconds)
    cancel_scope.cancel()


# -- the terminal frame -------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}"


def render_frame(acc: Accumulator, now: float, ui: UiState):
    """One screen of the terminal monitor as a rich renderable (built from
    the accumulators at ``now``; nothing in it refers back to them)."""
    from rich.console import Group
    from rich.text import Text

    scale = "log" if ui.log else "linear"
    counters = acc.counters()
    rates = acc.rates
    senders = acc.senders(now)
    alarms = acc.alarms(now)

    title = Text()
    title.append(f"mcast-trio monitor  {ui.title}  run {ui.run}  ", style="bold")
    title.append(f"scale: {scale}", style="bold cyan")
    title.append(f"  up {now - ui.started:.0f} s   keys: r reset  l lin/log  s snapshot  q quit")
    totals = Text(f"since reset: readouts {counters['readouts']:,}  hits {counters['hits']:,}  "
                  f"lost {counters['lost']:,}  malformed {counters['malformed']:,}  "
                  f"dropped {counters['dropped']:,}   rates: {rates.readouts:,.0f} readouts/s  "
                  f"{rates.hits:,.0f} hits/s  {rates.mbytes:.2f} MB/s"
                  + (f"   sources evicted {acc.sources_evicted:,}" if acc.sources_evicted else ""))
    hottest = acc.hottest(5)
    hot = Text("hottest: " + ("  ".join(f"row {r} col {c}: {n:,}" for r, c, n in hottest)
                              if hottest else "none yet"))
    if alarms:
        alarm = Text("ALARM: " + "; ".join(alarms), style="bold white on red")
    elif not senders:
        alarm = Text("waiting for data", style="yellow")
    else:
        alarm = Text("alarms: none", style="green")

    # The sender table as fixed-width lines (a rich Table costs ~5 ms a frame).
    header = ("sender", "state", "readouts/s", "hits/s", "MB/s", "received", "lost", "dup", "reord",
              "restarts", "malformed", "dropped", "kernel drops")
    cells = []
    for view in senders:
        state = ("alive", "green") if view.alive else (f"stale {view.age:.0f}s", "red")
        cells.append(([view.name, state, _fmt(view.readouts_per_s), _fmt(view.hits_per_s),
                       f"{view.mbytes_per_s:.2f}", _fmt(view.counters["received"]),
                       _fmt(view.counters["lost"]), _fmt(view.counters["duplicates"]),
                       _fmt(view.counters["reordered"]), _fmt(view.counters["restarts"]),
                       _fmt(view.counters["malformed"]), "-", "-"], ""))
    cells.append((["all", "", _fmt(rates.readouts), _fmt(rates.hits), f"{rates.mbytes:.2f}",
                   _fmt(counters["readouts"]), _fmt(counters["lost"]), _fmt(counters["duplicates"]),
                   _fmt(counters["reordered"]), _fmt(counters["restarts"]), _fmt(counters["malformed"]),
                   _fmt(counters["dropped"]), _fmt(counters["kernel_drops"])], "bold"))
    widths = [max(len(name), *(len(c[i][0] if isinstance(c[i], tuple) else c[i]) for c, _ in cells))
              for i, name in enumerate(header)]
    table = Text(no_wrap=True, overflow="crop")
    for row, row_style in [([*header], "bold"), *cells]:
        for i, cell in enumerate(row):
            text, style = cell if isinstance(cell, tuple) else (cell, row_style)
            text = text.ljust(widths[i]) if i < 2 else text.rjust(widths[i])
            table.append(text + ("  " if i < len(row) - 1 else ""), style or None)
        table.append("\n")
    table.rstrip()

    rows, columns = acc.shape
    counts = acc.hitmap[:rows, :columns]
    top = int(counts.max()) if counts.size else 0
    # The map (left) and the TOT histogram (right), side by side as lines of
    # (text, style) pieces: plain lines render several times faster in rich
    # than a grid of wrapped cells.
    left = [[(f"hit map {rows} x {columns} (rows x columns), {scale} scale, max {top:,}", "bold")],
            [("    " + "".join(f"{c:<8d}" for c in range(0, columns, 4)), "")]]
    for r, line in reversed(list(enumerate(shade_rows(counts, log=ui.log)))):
        left.append([(f"{r:>3} ", ""), (line, "cyan")])
    group = max(1, acc.tot_bins // 16)
    real = acc.tot_counts[:acc.tot_bins]  # the last entry of tot_counts is the overflow: drawn once, below
    merged = [int(real[i:i + group].sum()) for i in range(0, acc.tot_bins, group)]
    overflow = int(acc.tot_counts[-1])
    merged.append(overflow)
    width = acc.tot_max_us / acc.tot_bins * group
    mean = acc.tot_mean
    right = [[(f"TOT (us), mean {mean:.2f}" if not math.isnan(mean) else "TOT (us)", "bold")]]
    if overflow * 2 > sum(merged):
        right.append([(f"most hits are above {acc.tot_max_us:g} us: raise --tot-max", "bold red")])
    for i, (count, bar) in enumerate(zip(merged, text_bars(merged, width=28))):
        label = f"{i * width:>5.0f}-" if i < len(merged) - 1 else f"{acc.tot_max_us:>5.0f}+"
        right.append([(f"{label} {bar:<28} {count:,}", "")])
    left_width = max(sum(len(t) for t, _ in line) for line in left) + 3
    middle = Text(no_wrap=True, overflow="crop")
    for i in range(max(len(left), len(right))):
        used = 0
        for text, style in left[i] if i < len(left) else ():
            middle.append(text, style or None)
            used += len(text)
        if i < len(right):
            middle.append(" " * (left_width - used))
            for text, style in right[i]:
                middle.append(text, style or None)
        middle.append("\n")

    top_rate = max(acc.history, default=0.0)
    history = Text(f"readouts/s, last {len(acc.history)} s (max {top_rate:,.0f}): ")
    history.append(sparkline(acc.history, 100), style="magenta")
    parts = [title, totals, hot, alarm, table, middle, history]
    if ui.message:
        parts.append(Text(ui.message, style="italic"))
    return Group(*parts)


# -- the service ----------------------------------------------------------------


async def serve_monitor(group: str, port: int, receiver_options: dict, config: MonitorConfig,
                        also: Callable[[], Awaitable[Any]] | None = None) -> None:
    """Run the monitor until ``--seconds``, ``q``, Ctrl-C or SIGTERM;
    ``also`` is started in the same nursery once the receiver listens (the
    demo's DAQ)."""
    acc = Accumulator(tot_max_us=config.tot_max, stale=config.stale, loss_alarm=config.loss_alarm)
    run_name = config.run or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    ui = UiState(log=config.log, run=run_name, title=config.title or f"{group}:{port}", started=_now(),
                 snapshot_dir=config.snapshot_dir)
    # Malformed datagrams are counted per sender as the receive task meets them.
    receiver_options = dict(receiver_options, on_malformed=lambda payload, source: acc.add_malformed(source))
    if config.headless:
        # The latest report matters most: a full queue drops the oldest.
        async with open_stdout(OUTPUT_QUEUE, overflow="drop_oldest") as ui.output:
            await _serve(group, port, receiver_options, config, also, acc, ui)
        o = ui.output.statistics()
        if o.dropped or o.discarded:
            print(f"mcast-trio monitor: output: {o.written} reports written, {o.dropped} dropped (not taken by "
                  f"stdout), {o.discarded} discarded", file=sys.stderr, flush=True)
        if ui.output.error is not None:
            if not is_reader_gone(ui.output.error):
                raise ui.output.error
            reader_gone()  # the reader went away: a normal end
        return
    await _serve(group, port, receiver_options, config, also, acc, ui)


async def _stop_when_failed(output, scope: trio.CancelScope) -> None:
    """Standard output failed (a reader that went away): stop."""
    await output.wait_failed()
    scope.cancel()


async def _serve(group, port, receiver_options, config, also, acc: Accumulator, ui: UiState) -> None:
    async with open_receiver(group, port, AstroPix4Readout, **receiver_options) as receiver:
        acc.observe(_now(), receiver.statistics())
        async with trio.open_nursery() as nursery:
            await nursery.start(stop_on_signals, nursery.cancel_scope)
            if ui.output is not None:
                nursery.start_soon(_stop_when_failed, ui.output, nursery.cancel_scope)
            rate_point = False if config.headless else None  # headless: a rate point per report
            nursery.start_soon(_accumulate, receiver, acc, ui, rate_point)
            nursery.start_soon(_sample, receiver, acc, ui, rate_point)
            if config.seconds is not None:
                nursery.start_soon(_stop_after, config.seconds, nursery.cancel_scope)
            if config.headless:
                print(f"mcast-trio monitor: listening on {ui.title}", file=sys.stderr, flush=True)
                nursery.start_soon(_report, receiver, acc, ui, config)
            else:
                nursery.start_soon(_display, acc, ui, config)
                nursery.start_soon(_keys, acc, ui, nursery.cancel_scope, nursery)
            if also is not None:
                nursery.start_soon(also)
        if config.headless:
            _emit(receiver, acc, ui, config, final=True)


@click.command()
@network_options()
@click.option("--headless", is_flag=True,
              help="No terminal screen: one line per --interval (also when stdout is not a terminal).")
@click.option("--json", "as_json", is_flag=True,
              help="With --headless (implied): one JSON object per interval, counters named as in "
                   "the library's statistics(), per sender and in total.")
@click.option("--interval", type=Number(0.05, MAX_SECONDS), default=1.0, show_default=True,
              help="Seconds between headless reports (and between their rate points).")
@click.option("--seconds", type=SECONDS, default=None,
              help="Stop after this many seconds [default: run until q, Ctrl-C or SIGTERM].")
@click.option("--stale", type=SECONDS, default=5.0, show_default=True,
              help="A sender is stale (an alarm) after this many seconds without a datagram.")
@click.option("--loss-alarm", type=FRACTION, default=0.01, show_default=True,
              help="Alarm when a sender's loss fraction since the reset passes this.")
@click.option("--log", "log_scale", is_flag=True, help="Start with a log colour scale (key l switches).")
@click.option("--fps", type=Number(0.5, 30), default=4.0, show_default=True,
              help="Screen frames per second.")
@click.option("--screen/--no-screen", default=False, show_default=True,
              help="Use the terminal's alternate screen.")
@click.option("--snapshot-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
              default=pathlib.Path("."), show_default=True, help="Where key s writes its files.")
@click.option("--run", "run_name", default=None, callback=lambda ctx, param, value: _check_run_name(value),
              help="Run name of the snapshot files {run}-{seq:03d}.npz/.png [default: the start time].")
@click.option("--tot-max", type=TOT_US, default=DEFAULT_TOT_MAX_US, show_default=True,
              help="Upper edge of the TOT histogram (us); above it: the overflow bin. The default holds "
                   "real AstroPix 4 hits (about 180-295 us), as astropix-analysis' monitor does; the screen "
                   "says when most hits are above it.")
def monitor(network, headless, as_json, interval, seconds, stale, loss_alarm, log_scale, fps, screen,
            snapshot_dir, run_name, tot_max):
    """The live monitor: rates, loss and health per sender, hit map, TOT
    spectrum, history, alarms.

    Headless, the reports go to standard output through a bounded queue
    (16 reports; when full, the oldest waiting one is dropped and counted:
    "output" in each JSON report, output_dropped in each line, and a line
    on stderr at exit): a reader that stalls never stops the counting. A
    reader that goes away ends the monitor, exit 0.

    In a terminal: per sender readouts/s, hits/s, MB/s, lost, duplicates,
    reordered, restarts, malformed, dropped (overflow), kernel drops and
    alive/stale; the hit map (sized from the data, at most 32 x 32: the row
    and column fields are 5 bits) in a linear or log scale with the hottest
    pixels; the TOT histogram; a rate history strip; an alarm line when a
    sender goes silent or its loss passes --loss-alarm. The counters count
    every datagram; the screen samples them (--fps). A sender whose readout
    ids start over (a new run) resets the accumulators.

    \b
    Keys: r reset   l linear/log scale   s snapshot (.npz, and .png with
          matplotlib, in --snapshot-dir)   q quit

    \b
    Examples:
      mcast-trio monitor                               # terminal monitor, default group
      mcast-trio monitor -g 239.255.0.7:6000 --log     # another group, log colour scale
      mcast-trio monitor --headless --json --seconds 10
      mcast-trio monitor -i eth0 --stale 2 --loss-alarm 0.001 --snapshot-dir shots --run run42
    """
    config = _config(headless, as_json, interval, seconds, stale, loss_alarm, log_scale, fps, screen,
                     snapshot_dir, run_name, tot_max)
    run(serve_monitor, network.group, network.port, network.receiver_options(), config)


def _config(headless, as_json, interval, seconds, stale, loss_alarm, log_scale, fps, screen, snapshot_dir,
            run_name, tot_max) -> MonitorConfig:
    headless = headless or as_json or not sys.stdout.isatty()
    return MonitorConfig(headless=headless, json=as_json, interval=interval, seconds=seconds, stale=stale,
                         loss_alarm=loss_alarm, log=log_scale, fps=fps, snapshot_dir=snapshot_dir,
                         run=run_name, tot_max=tot_max, screen=screen)


COMMANDS = [monitor]
