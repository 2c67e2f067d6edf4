"""``mcast-trio replay FILE.apx``: multicast a recorded file's readouts again,
at the recorded pace, at a fixed rate, at a multiple of the recorded pace, or
as fast as possible; looping with readout ids (and timestamps) continued so
that receivers see one continuous run."""

from __future__ import annotations

import warnings

import click
import numpy as np
import trio

from .. import AstroPix4Readout, TruncatedRecordWarning, open_apx, open_sender
from .._format import readout_ids_and_timestamps
from ._common import (COUNT_OR_UNLIMITED, RATE, SPEED, emit_json, fail, network_options, run, stop_on_signals,
                      said_once)
from ._simulate import _endpoint_text

__all__ = ["COMMANDS"]

_U32 = 1 << 32
_U64 = 1 << 64
#: Readouts per send_many call at most (and per file read).
_BATCH = 1024


def _scan(path: str) -> dict:
    """One pass over the file: count, first and last readout id and
    timestamp (what renumbering and the recorded pace need)."""
    info = {"count": 0, "first_id": 0, "last_id": 0, "first_ts": 0, "last_ts": 0, "truncated": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncatedRecordWarning)  # said once, below
        with open_apx(path) as apx:
            for batch in apx.batches(_BATCH):
                ids, timestamps = readout_ids_and_timestamps(batch)
                if info["count"] == 0:
                    info["first_id"], info["first_ts"] = int(ids[0]), int(timestamps[0])
                info["last_id"], info["last_ts"] = int(ids[-1]), int(timestamps[-1])
                info["count"] += len(ids)
            if apx.truncated is not None:
                info["truncated"] = str(apx.truncated)
    return info


class _Plan:
    """Where each readout of each pass goes: its id, its timestamp and its
    send time (seconds after the start, None: as soon as possible)."""

    def __init__(self, info: dict, *, rate, speed, fast, keep_ids):
        self.info = info
        n = info["count"]
        span = max(0, info["last_ts"] - info["first_ts"])
        # One recorded period past the last readout before the next pass.
        self.interval_ns = span // (n - 1) if n > 1 and span > 0 else 1_000_000
        self.pass_ns = span + self.interval_ns
        self.pass_ids = (info["last_id"] - info["first_id"]) % _U32 + 1
        self.recorded_rate = (n - 1) / (span / 1e9) if n > 1 and span > 0 else None
        self.keep_ids = keep_ids
        self.fast = fast
        self.rate = rate
        self.speed = speed

    @property
    def requested_rate(self) -> float | None:
        if self.fast:
            return None
        if self.rate is not None:
            return self.rate
        return None if self.recorded_rate is None else self.recorded_rate * self.speed

    def targets(self, first_index: int, pass_number: int, timestamps: np.ndarray) -> np.ndarray | None:
        """Send times (seconds after the start) of a batch of readouts whose
        first is the ``first_index``-th sent (all passes); None: at once."""
        if self.fast:
            return None
        if self.rate is not None:
            return (first_index + np.arange(len(timestamps), dtype=np.float64)) / self.rate
        # Nanoseconds since the first readout of the file: u64 arithmetic
        # wraps, read as int64 it is the exact signed difference.
        elapsed = (timestamps.astype(np.uint64) - np.uint64(self.info["first_ts"])).view(np.int64)
        elapsed = elapsed + pass_number * self.pass_ns
        return np.maximum(elapsed, 0) / 1e9 / self.speed

    def renumber(self, records: list[bytes], pass_number: int) -> list[bytes]:
        if self.keep_ids or pass_number == 0:
            return records
        out = []
        id_shift = pass_number * self.pass_ids
        ts_shift = pass_number * self.pass_ns
        for record in records:
            readout = AstroPix4Readout.from_bytes(record)
            readout.readout_id = (readout.readout_id + id_shift) % _U32
            readout.timestamp = (readout.timestamp + ts_shift) % _U64
            out.append(readout.to_bytes())
        return out


async def _replay(sender, path: str, plan: _Plan, loops: int, counts: dict) -> None:
    """Send the passes; ``counts`` is updated as datagrams go out.

    Per batch of records read from the file, their headers give the
    timestamps (read all at once, no hit decoded), the send times are computed for the whole
    batch, and whatever is due is sent at once with ``send_many``; then the
    task sleeps until the next send time (absolute, on the trio clock: no
    drift accumulates, over a pass or across passes)."""
    start = trio.current_time()
    counts["start"] = start
    pass_number = 0
    last_target = 0.0
    with warnings.catch_warnings(), open_apx(path) as apx:
        warnings.simplefilter("ignore", TruncatedRecordWarning)  # said once, by the command
        while loops == 0 or pass_number < loops:
            for batch in apx.batches(_BATCH):
                _ids, timestamps = readout_ids_and_timestamps(batch)
                targets = plan.targets(counts["readouts"], pass_number, timestamps)
                records = plan.renumber(batch, pass_number)
                if targets is None:
                    await _send(sender, records, counts)
                    continue
                # Timestamps that go backwards are sent at once, in order.
                targets = np.maximum.accumulate(np.maximum(targets, last_target))
                last_target = float(targets[-1])
                i = 0
                while i < len(records):
                    now = trio.current_time() - start
                    due = int(np.searchsorted(targets, now, side="right"))
                    if due > i:
                        await _send(sender, records[i:due], counts)
                        i = due
                    else:
                        await trio.sleep_until(start + float(targets[i]))
            pass_number += 1
            counts["passes"] = pass_number
            if counts["readouts"] == 0:
                break  # an empty file: nothing to loop over


async def _send(sender, datagrams: list[bytes], counts: dict) -> None:
    await sender.send_many(datagrams)
    now = trio.current_time()
    if counts["readouts"] == 0:
        counts["first"] = now
    counts["last"] = now
    counts["readouts"] += len(datagrams)


def _summary(counts: dict, plan: _Plan) -> dict:
    n = counts["readouts"]
    elapsed = (counts["last"] - counts["start"]) if n else 0.0
    requested = plan.requested_rate
    # The first readout is due at the start, the last one n - 1 intervals
    # later: the rate over the run, start-up latency included.
    if plan.fast:
        achieved = n / elapsed if elapsed > 0 else None
    else:
        achieved = (n - 1) / elapsed if n > 1 and elapsed > 0 else None
    return {
        "file": counts["file"],
        "readouts": n,
        "passes": counts["passes"],
        "seconds": elapsed,
        "requested_rate": requested,
        "achieved_rate": achieved,
        "deviation": (achieved / requested - 1) if achieved and requested else None,
        "recorded_rate": plan.recorded_rate,
        "mode": "fast" if plan.fast else ("rate" if plan.rate is not None else "speed"),
        "speed": None if plan.fast or plan.rate is not None else plan.speed,
        "renumbered": not plan.keep_ids,
        "datagrams_sent": counts.get("datagrams_sent", 0),
        "send_errors": counts.get("send_errors", 0),
        "group": counts["group"],
    }


def _format(summary: dict) -> str:
    text = (f"replay: {summary['readouts']:,} readouts from {summary['file']} ({summary['passes']} "
            f"pass{'es' if summary['passes'] != 1 else ''}) to {summary['group']} in "
            f"{summary['seconds']:.2f} s")
    achieved, requested = summary["achieved_rate"], summary["requested_rate"]
    if achieved is not None:
        text += f", {achieved:,.1f} readouts/s"
        if requested:
            text += f" (requested {requested:,.1f}/s, {summary['deviation'] * 100:+.2f} %)"
        else:
            text += " (as fast as possible)"
    if summary["send_errors"]:
        text += f", {summary['send_errors']} send errors"
    return text


async def _main(network, path, plan, loops, as_json) -> None:
    counts = {"readouts": 0, "passes": 0, "start": 0.0, "first": 0.0, "last": 0.0, "file": path,
              "group": _endpoint_text(network)}
    async with open_sender(network.group, network.port, framing="raw", **network.sender_options()) as sender:
        async with trio.open_nursery() as nursery:
            await nursery.start(stop_on_signals, nursery.cancel_scope)
            await _replay(sender, path, plan, loops, counts)
            nursery.cancel_scope.cancel()
    stats = sender.statistics()
    counts["datagrams_sent"] = stats.datagrams
    counts["send_errors"] = stats.errors
    summary = _summary(counts, plan)
    if as_json:
        emit_json(summary)
    else:
        click.echo(_format(summary))


@click.command("replay")
@click.argument("file", metavar="FILE.apx")
@network_options(sender=True)
@click.option("--speed", type=SPEED, default=None,
              help="Multiple of the recorded pace (0.5: half as fast) [default: 1].")
@click.option("--rate", type=RATE, default=None,
              help="Fixed rate in readouts per second instead of the recorded pace.")
@click.option("--fast", is_flag=True, help="As fast as possible (batches of 1024).")
@click.option("--loop", "loops", type=COUNT_OR_UNLIMITED, default=1, show_default=True, metavar="N",
              help="Send the file N times (0: until Ctrl-C).")
@click.option("--keep-ids", is_flag=True,
              help="On later passes resend readout ids and timestamps as they are (default: continue "
                   "them, so receivers see one continuous run).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def replay_command(network, file, speed, rate, fast, loops, keep_ids, as_json):
    """Multicast the readouts of an .apx file again.

    By default at the recorded pace (from the readouts' timestamps), or at
    --speed times it, at a fixed --rate, or --fast. Pacing holds the
    requested rate within 2 % over a run: every readout is sent at its own
    target time, and what is due is sent together. With --loop, the readout
    ids and timestamps of later passes continue after the previous pass
    (gaps in the file stay gaps), unless --keep-ids.

    \b
    Examples:
      mcast-trio replay run.apx                    # at the recorded pace
      mcast-trio replay run.apx --speed 0.5        # half as fast
      mcast-trio replay run.apx --rate 5000 --loop 0   # 5000/s until Ctrl-C
      mcast-trio replay run.apx --fast --loop 10 --json
      mcast-trio replay run.apx --group 127.0.0.1  # to astropix-analysis' apx_udprec
    """
    chosen = [name for name, value in (("--speed", speed), ("--rate", rate), ("--fast", fast or None))
              if value is not None]
    if len(chosen) > 1:
        raise click.UsageError(f"{' and '.join(chosen)} exclude each other; give at most one")
    with said_once("replay"):  # numpy's or the library's: never raw (truncation: said below)
        try:
            info = _scan(file)
        except OSError as exc:
            raise fail(f"{file}: {exc.strerror or exc}") from None
        except ValueError as exc:  # MalformedReadout: not an .apx file, or damaged
            raise fail(f"{file}: {exc}") from None
        if info["truncated"]:
            click.echo(f"replay: note: {file}: {info['truncated']}; the complete records before it are sent",
                       err=True)
        plan = _Plan(info, rate=rate, speed=1.0 if speed is None else speed, fast=fast, keep_ids=keep_ids)
        if plan.requested_rate is None and not fast and info["count"] > 1:
            raise fail(f"{file}: the readouts' timestamps do not advance; give --rate or --fast")
        run(_main, network, file, plan, loops, as_json)


COMMANDS = [replay_command]
