"""``mcast-trio simulate``: a DAQ stand-in that multicasts simulated AstroPix 4
readouts (:class:`mcast_trio.sim.DaqSimulator`) at a steady rate, raw framing,
exactly as astropix-analysis sends them."""

from __future__ import annotations

import click
import trio

from .. import open_sender
from ..demo import MEAN_HITS as DEFAULT_MEAN_HITS, simulate
from ._common import (EVERY_OR_NEVER, SENT_MEAN_HITS, RATE, SECONDS, SEED, emit_json, network_options, run,
                      stop_on_signals)

__all__ = ["COMMANDS"]

def _endpoint_text(network) -> str:
    """``239.255.0.1:5007`` or ``[ff12::1%mc0]:5007``."""
    return f"[{network.group}]:{network.port}" if ":" in network.group else f"{network.group}:{network.port}"


def _summary(counts: dict, network) -> str:
    rate = counts["readouts"] / counts["seconds"] if counts["seconds"] > 0 else 0.0
    text = (f"simulate: {counts['readouts']:,} readouts, {counts['hits']:,} hits, "
            f"{counts['datagrams']:,} datagrams sent to {_endpoint_text(network)} "
            f"in {counts['seconds']:.2f} s ({rate:,.0f} readouts/s)")
    if counts["garbage"]:
        text += f", {counts['garbage']:,} of them garbage on purpose"
    if counts.get("send_errors"):
        text += f"; {counts['send_errors']:,} refused by the kernel"
    if counts.get("unsent"):
        text += f"; {counts['unsent']:,} still queued at the end, not sent"
    return text


async def _main(network, rate, seconds, seed, mean_hits, garbage_every, as_json) -> None:
    # Filled as it goes: a signal may stop simulate() at any tick, or before it starts.
    counts: dict = {"readouts": 0, "hits": 0, "datagrams": 0, "garbage": 0, "seconds": 0.0}
    async with open_sender(network.group, network.port, framing="raw", **network.sender_options()) as sender:
        async with trio.open_nursery() as nursery:
            await nursery.start(stop_on_signals, nursery.cancel_scope)
            await simulate(sender, rate=rate, seconds=seconds, seed=seed, mean_hits=mean_hits,
                           garbage_every=garbage_every, counts=counts)
            nursery.cancel_scope.cancel()
        stats = sender.statistics()
    counts["group"] = _endpoint_text(network)
    counts["rate"] = rate
    counts["send_errors"] = stats.errors
    counts["unsent"] = stats.unsent
    if as_json:
        emit_json(counts)
    else:
        click.echo(_summary(counts, network))


@click.command("simulate")
@network_options(sender=True)
@click.option("--rate", type=RATE, default=1000.0, show_default=True,
              help="Readouts per second.")
@click.option("--seconds", type=SECONDS, default=None,
              help="How long to send [default: until Ctrl-C or SIGTERM].")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Simulator seed (same seed, same bytes).")
@click.option("--mean-hits", type=SENT_MEAN_HITS, default=DEFAULT_MEAN_HITS, show_default=True,
              help="Mean number of hits per readout (Poisson).")
@click.option("--garbage-every", type=EVERY_OR_NEVER, default=0, show_default=True, metavar="N",
              help="Add one malformed datagram after every N readouts (0: never).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def simulate_command(network, rate, seconds, seed, mean_hits, garbage_every, as_json):
    """Multicast simulated AstroPix 4 readouts: a DAQ stand-in.

    Readouts come from the library's simulator (known hits, ids from 0,
    timestamps on the send schedule) and go raw, one readout per datagram,
    as astropix-analysis sends them. Stops after --seconds, or on Ctrl-C /
    SIGTERM (exit 0), then prints a one-line summary.

    \b
    Examples:
      mcast-trio simulate                          # 1000 readouts/s until Ctrl-C
      mcast-trio simulate --rate 20000 --seconds 10
      mcast-trio simulate --garbage-every 1000     # exercise the malformed counters
      mcast-trio simulate --group 127.0.0.1        # astropix-analysis' unicast default
      mcast-trio simulate -g 'ff12::1%mc0' --seconds 5 --json
    """
    run(_main, network, rate, seconds, seed, mean_hits, garbage_every, as_json)


COMMANDS = [simulate_command]
