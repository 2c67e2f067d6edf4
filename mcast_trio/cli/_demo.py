"""``mcast-trio demo``: a simulated DAQ and the live monitor in one process,
on loopback."""

from __future__ import annotations

import sys

import click

from .. import resolve_group
from ..demo import GROUP, PORT, daq
from ._common import EVERY_OR_NEVER, RATE, SECONDS, SEED, parse_endpoint, run
from ._monitor import MonitorConfig, serve_monitor


@click.command()
@click.option("--seconds", type=SECONDS, default=None,
              help="How long to run [default: 10 s without a terminal; in a terminal until q or Ctrl-C].")
@click.option("--rate", type=RATE, default=20000.0, show_default=True,
              help="Readouts per second the simulated DAQ sends.")
@click.option("--garbage-every", type=EVERY_OR_NEVER, default=5000, show_default=True,
              help="Add one malformed datagram on purpose after every N readouts (0: never), so that "
                   "the malformed counter has something to count.")
@click.option("--seed", type=SEED, default=1, show_default=True, help="Seed of the simulator.")
@click.option("--group", "-g", default=f"{GROUP}:{PORT}", show_default=True, metavar="GROUP[:PORT]",
              help="Multicast group (on loopback) the DAQ sends to and the monitor joins.")
@click.option("--headless", is_flag=True, help="One text line per second even in a terminal.")
@click.option("--json", "as_json", is_flag=True, help="With --headless (implied): JSON objects.")
def demo(seconds, rate, garbage_every, seed, group, headless, as_json):
    """A simulated DAQ and the live monitor together, on loopback.

    The DAQ is the library's demo loop (mcast_trio.demo.daq): simulated
    AstroPix 4 readouts at --rate per second, plus one garbage datagram after
    every --garbage-every readouts. The monitor is `mcast-trio monitor`: the
    terminal screen when stdout is a terminal (keys r, l, s, q), one line per
    second otherwise.

    \b
    Examples:
      mcast-trio demo                        # the terminal monitor, until q
      mcast-trio demo --seconds 5 | cat      # headless lines for 5 s
      mcast-trio demo --rate 100000 --garbage-every 0
    """
    ctx = click.get_current_context()
    host, port = parse_endpoint(group)
    port = PORT if port is None else port
    try:
        resolve_group(host, port)
    except (ValueError, TypeError) as exc:
        raise click.UsageError(f"--group {group!r}: {exc}", ctx) from None
    headless = headless or as_json or not sys.stdout.isatty()
    if seconds is None and headless:
        seconds = 10.0
    config = MonitorConfig(headless=headless, json=as_json, seconds=seconds, title=f"demo {host}:{port}")
    totals = {"injected": 0}

    async def simulated_daq():
        await daq(host, port, rate, garbage_every, seed, totals)

    run(serve_monitor, host, port, {}, config, simulated_daq)
    if headless and not as_json:
        click.echo(f"demo: the simulated DAQ injected {totals['injected']:,} garbage datagrams on purpose")


COMMANDS = [demo]
