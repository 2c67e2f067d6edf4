"""``mcast-trio listen``: print readouts and their hits as they arrive (or,
with ``--messages``, any other traffic), human-readable or as JSON lines.

The text goes to standard output through a :class:`~mcast_trio.Sink`
(``cli/_output.py``): the receive loop never waits for the reader."""

from __future__ import annotations

import collections
import datetime
import re

import click
import trio

from .. import HIT_DTYPE, AstroPix4Readout, MalformedDatagram, open_receiver
from ._common import COUNT_OR_UNLIMITED, TOO_DEEP, network_options, run, stop_on_signals, strict_json
from ._output import is_reader_gone, json_line, open_stdout, reader_gone

__all__ = ["COMMANDS"]

#: Hit fields printed per hit (--hits, human-readable); JSON has them all.
_HIT_TEXT_FIELDS = ("row", "column", "tot_us", "chip_id", "decoding_order", "ts_dec1", "ts_dec2")
_HIT_FIELDS = HIT_DTYPE.names
#: Senders remembered for readouts not yet printed (see _SenderLog).
_MAX_PENDING = 1 << 16
#: Readouts (messages) waiting for standard output; beyond, they are dropped
#: and counted ("output dropped" in the summary): a reader that stalls never
#: stops the receiver.
OUTPUT_QUEUE = 16384


def _address(address) -> str:
    if address is None:
        return "?"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _time(timestamp_ns: int) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(timestamp_ns / 1e9, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return str(timestamp_ns)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


class _SenderLog:
    """Which sender each readout came from.

    Decoded batches carry no source address, so the receiver's ``filter=``
    callable (called with every datagram and its source, in arrival order)
    notes ``(readout id, source)`` of the well-formed readouts it accepts; the
    printer takes them in the same order. It also applies ``--filter``.
    """

    def __init__(self, pattern: re.Pattern | None) -> None:
        self.pattern = pattern
        self.pending: collections.deque = collections.deque(maxlen=_MAX_PENDING)

    def __call__(self, payload: bytes, address) -> bool:
        if self.pattern is not None and self.pattern.search(payload) is None:
            return False
        try:
            readout = AstroPix4Readout.from_bytes(payload)
        except (MalformedDatagram, TypeError):
            return True  # the receiver counts it as malformed
        self.pending.append((readout.readout_id, address))
        return True

    def sender_of(self, readout_id: int):
        pending = self.pending
        while pending:
            rid, address = pending.popleft()
            if rid == readout_id:
                return address
        return None


def _hit_dicts(hits) -> list[dict]:
    columns = {name: hits[name].tolist() for name in _HIT_FIELDS}
    return [dict(zip(_HIT_FIELDS, values)) for values in zip(*columns.values())]


async def _readouts(network, framing, topics, log, show_hits, as_json, count, counts, out) -> None:
    options = dict(network.receiver_options(), framing=framing, filter=log)
    if topics:
        options["topics"] = topics
    async with open_receiver(network.group, network.port, readout_class=AstroPix4Readout, **options) as receiver:
        counts["receiver"] = receiver
        _ready(receiver)
        async for batch in receiver.batches():
            before = counts["readouts"]
            rows = batch.readouts
            hits = batch.hits
            lines = []
            for i in range(len(rows)):
                row = rows[i]
                rid = int(row["readout_id"])
                sender = _address(log.sender_of(rid))
                first, n = int(row["first_hit"]), int(row["n_hits"])
                if as_json:
                    record = {"sender": sender, "readout_id": rid, "timestamp": int(row["timestamp"]),
                              "n_hits": n, "status": int(row["status"]),
                              "dropped_bytes": int(row["dropped_bytes"]),
                              "hits": _hit_dicts(hits[first:first + n])}
                    lines.append(json_line(record))
                else:
                    lines.append(f"{sender} readout {rid} at {_time(int(row['timestamp']))} "
                                 f"{n} hit{'' if n == 1 else 's'}\n")
                    if show_hits:
                        for hit in hits[first:first + n]:
                            lines.append("  " + " ".join(
                                f"{name} {hit[name]:.2f}" if name == "tot_us" else f"{name} {hit[name]}"
                                for name in _HIT_TEXT_FIELDS) + "\n")
                counts["readouts"] += 1
                counts["hits"] += n
                if count and counts["readouts"] >= count:
                    break
            if lines:
                out.offer("".join(lines), weight=counts["readouts"] - before)
            if count and counts["readouts"] >= count:
                return


def _ready(receiver) -> None:
    """Say on stderr that the group is joined (scripts may wait for it)."""
    spec = receiver.group
    where = "bound" if spec.unicast else f"joined on {spec.interface_name}"
    click.echo(f"listen: {spec.group} port {spec.port} {where}", err=True)


def _payload_text(payload) -> str:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        data = bytes(payload)
        return repr(data[:200]) + ("..." if len(data) > 200 else "")
    try:
        return repr(payload)
    except RecursionError:
        return TOO_DEEP


def _message_json(record: dict, payload) -> str:
    """The JSON line of a message whose payload is an object (strict JSON:
    null for a float that is not finite; :data:`TOO_DEEP` for a payload
    nested too deeply to print)."""
    try:
        return json_line(strict_json({**record, "payload": payload}))
    except RecursionError:
        return json_line({**record, "payload": TOO_DEEP})


async def _messages(network, framing, topics, pattern, as_json, count, counts, out) -> None:
    options = dict(network.receiver_options(), framing=framing)
    if topics:
        options["topics"] = topics
    if pattern is not None:
        options["filter"] = pattern
    async with open_receiver(network.group, network.port, **options) as receiver:
        counts["receiver"] = receiver
        _ready(receiver)
        async for message in receiver:
            topic = message.topic.decode("utf-8", "backslashreplace") if message.topic is not None else None
            if as_json:
                payload = message.payload
                record = {"sender": _address(message.address), "topic": topic,
                          "sender_id": message.sender_id, "sequence": message.sequence}
                if isinstance(payload, (bytes, bytearray, memoryview)):
                    record["payload_hex"] = bytes(payload).hex()
                    record["size"] = len(payload)
                    out.offer(json_line(record))
                else:
                    out.offer(_message_json(record, payload))
            else:
                size = f" ({len(message.payload)} bytes)" if isinstance(message.payload, bytes) else ""
                out.offer(f"{_address(message.address)} topic {topic!r}{size}: "
                          f"{_payload_text(message.payload)}\n")
            counts["messages"] += 1
            if count and counts["messages"] >= count:
                return


def _statistics_line(counts: dict, output) -> str:
    receiver = counts.get("receiver")
    if receiver is None:
        return "listen: nothing received"
    s = receiver.statistics()
    what = (f"{counts['messages']:,} messages" if counts["mode"] == "messages" else
            f"{counts['readouts']:,} readouts, {counts['hits']:,} hits")
    o = output.statistics()
    what += (f" taken; output: printed {o.written:,}, dropped {o.dropped:,} (not taken by stdout), "
             f"discarded {o.discarded:,}")
    return (f"listen: {what}; received {s.datagrams:,} datagrams from {len(s.senders)} "
            f"sender{'' if len(s.senders) == 1 else 's'}: lost {s.lost}, malformed {s.malformed}, "
            f"duplicates {s.duplicates}, reordered {s.reordered}, restarts {s.restarts}, "
            f"filtered {s.filtered}, dropped {s.dropped}, kernel drops {s.kernel_drops}, "
            f"discarded at close {s.discarded}"
            + (f"; last error: {s.last_error}" if s.last_error else ""))


async def _main(network, framing, topics, pattern, show_hits, as_json, messages, count) -> None:
    counts = {"readouts": 0, "hits": 0, "messages": 0, "mode": "messages" if messages else "readouts"}
    out = None
    try:
        async with open_stdout(OUTPUT_QUEUE) as out:
            async with trio.open_nursery() as nursery:
                await nursery.start(stop_on_signals, nursery.cancel_scope)
                nursery.start_soon(_stop_when_failed, out, nursery.cancel_scope)
                if messages:
                    await _messages(network, framing, topics, pattern, as_json, count, counts, out)
                else:
                    await _readouts(network, framing, topics, _SenderLog(pattern), show_hits, as_json, count,
                                    counts, out)
                nursery.cancel_scope.cancel()
            counts["stopped"] = True  # also by a signal before the receiver opened
    finally:
        if "receiver" in counts or "stopped" in counts:
            click.echo(_statistics_line(counts, out), err=True)
    if out.error is not None:
        if is_reader_gone(out.error):
            # The reader went away (`mcast-trio listen | head`): a normal end.
            reader_gone()
            return
        raise out.error


async def _stop_when_failed(out, scope: trio.CancelScope) -> None:
    """Standard output failed (a reader that went away): stop."""
    await out.wait_failed()
    scope.cancel()


@click.command("listen")
@network_options()
@click.option("--hits", "show_hits", is_flag=True, help="Also print one line per hit.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per readout (its hits as a list) or per message.")
@click.option("--framing", type=click.Choice(["raw", "native", "mcl", "auto"]), default="auto",
              show_default=True,
              help="Datagram framing (auto: raw for readouts, native for --messages).")
@click.option("--topic", "topics", multiple=True, help="Accept only this topic (repeatable; framed modes).")
@click.option("--filter", "pattern", default=None, metavar="REGEX",
              help="Accept only payloads in which this regular expression matches (bytes).")
@click.option("--messages", is_flag=True, help="Print any traffic as messages (topic and payload), "
                                               "not readouts.")
@click.option("--count", type=COUNT_OR_UNLIMITED, default=0, metavar="N",
              help="Stop after N readouts (messages) [default: until Ctrl-C].")
def listen_command(network, show_hits, as_json, framing, topics, pattern, messages, count):
    """Print readouts and hits as they arrive.

    One line per readout: sender, readout id, timestamp (UTC), number of
    hits; with --hits one more line per hit; with --json one object per
    readout with its hits as a list (every field of the hit table). At exit
    (--count reached, Ctrl-C or SIGTERM: exit 0) the receiver's statistics
    (lost, malformed, ...) go to stderr.

    The receiver never waits for the reader of the output: up to 16384
    readouts (messages) wait to be printed; beyond, they are dropped and
    counted ("output: ... dropped" in the statistics). A reader that goes
    away (| head) ends the command, exit 0.

    \b
    Examples:
      mcast-trio listen                            # readouts on 239.255.0.1:5007
      mcast-trio listen --hits --count 10
      mcast-trio listen --json | jq .n_hits
      mcast-trio listen --group 127.0.0.1          # astropix-analysis' unicast default
      mcast-trio listen --messages --topic status  # other traffic (native framing)
    """
    regex = None
    if pattern is not None:
        try:
            regex = re.compile(pattern.encode("utf-8"))
        except re.error as exc:
            raise click.BadParameter(f"{pattern!r} is not a valid regular expression: {exc}",
                                     param_hint="'--filter'") from None
    if topics and not messages and framing in ("raw", "auto"):
        raise click.UsageError("--topic needs a framing with topics: --framing native or mcl "
                               "(raw readouts carry no topic)")
    run(_main, network, framing, list(topics), regex, show_hits, as_json, messages, count)


COMMANDS = [listen_command]
