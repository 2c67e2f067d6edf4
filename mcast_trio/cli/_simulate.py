"""``mcast-trio simulate``: a DAQ stand-in that multicasts simulated AstroPix 4
readouts (:class:`mcast_trio.sim.DaqSimulator`) at a steady rate, raw framing,
exactly as astropix-analysis sends them."""

from __future__ import annotations

import math
import time

import click
import trio

from .. import open_sender
from ..sim import DaqSimulator
from ._common import emit_json, network_options, run, stop_on_signals

__all__ = ["COMMANDS", "GARBAGE", "simulate"]

#: The datagram added on purpose after every ``garbage_every`` readouts.
GARBAGE = b"\x00garbage, not a readout"
#: Default mean number of hits per readout.
MEAN_HITS = 4.0
#: Longest pause between two sends (seconds); lower rates send one readout
#: per tick.
_TICK = 0.01


def _new_counts() -> dict:
    return {"readouts": 0, "hits": 0, "datagrams": 0, "garbage": 0, "seconds": 0.0}


async def simulate(sender, *, rate: float, seconds: float | None = None, seed: int = 0,
                   mean_hits: float = MEAN_HITS, garbage_every: int = 0, counts: dict | None = None) -> dict:
    """Send simulated readouts with ``sender`` (an open
    :class:`~mcast_trio.MulticastSender`) at ``rate`` readouts/s, for
    ``seconds`` (None: until cancelled); return the counts: ``readouts``,
    ``hits`` (the simulator's ground truth of the readouts sent),
    ``datagrams`` handed to the sender (readouts plus garbage), ``garbage``
    and ``seconds`` (elapsed).

    The schedule is absolute: at every tick (10 ms, or ``1/rate`` below
    100/s) it sends what is due since the start, so the average rate is
    ``rate`` whatever the tick's jitter. Readout ids count from 0, the
    timestamps are the send schedule (ns since the epoch). After every
    ``garbage_every`` readouts one garbage datagram is added on purpose.

    ``counts``: a dict to update in place (so that a caller that cancels the
    call still has them); by default a new one.

    Cancellation: the only way to stop it when ``seconds`` is None; ``counts``
    then says what was handed to the sender.
    """
    if counts is None:
        counts = _new_counts()
    else:
        for key, value in _new_counts().items():
            counts.setdefault(key, value)
    period_ns = max(1, round(1e9 / rate))
    sim = DaqSimulator(seed=seed, mean_hits=mean_hits, start_ns=time.time_ns(), period_ns=period_ns)
    tick = _TICK if rate * _TICK >= 1 else 1.0 / rate
    total = None if seconds is None else round(rate * seconds)
    start = trio.current_time()
    k = 0
    try:
        while total is None or counts["readouts"] < total:
            k += 1
            due = math.floor(k * tick * rate + 1e-9)
            if total is not None:
                due = min(due, total)
            n = due - counts["readouts"]
            if n > 0:
                batch = sim.generate(n)
                datagrams = []
                garbage = 0
                for i, datagram in enumerate(batch.datagrams(), counts["readouts"] + 1):
                    datagrams.append(datagram)
                    if garbage_every and i % garbage_every == 0:
                        datagrams.append(GARBAGE)
                        garbage += 1
                await sender.send_many(datagrams)
                counts["readouts"] += n
                counts["hits"] += len(batch.truth)
                counts["garbage"] += garbage
                counts["datagrams"] += len(datagrams)
            if total is not None and counts["readouts"] >= total:
                break
            await trio.sleep_until(start + k * tick)
    finally:
        counts["seconds"] = trio.current_time() - start
    return counts


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
    counts = _new_counts()
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
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=1000.0, show_default=True,
              help="Readouts per second.")
@click.option("--seconds", type=click.FloatRange(min=0), default=None,
              help="How long to send [default: until Ctrl-C or SIGTERM].")
@click.option("--seed", type=int, default=0, show_default=True, help="Simulator seed (same seed, same bytes).")
@click.option("--mean-hits", type=click.FloatRange(min=0), default=MEAN_HITS, show_default=True,
              help="Mean number of hits per readout (Poisson).")
@click.option("--garbage-every", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
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
