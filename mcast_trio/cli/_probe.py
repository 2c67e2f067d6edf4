"""``mcast-trio probe GROUP[:PORT]``: join a group on every multicast-capable
interface for a few seconds and say where traffic arrives, from whom, at what
rate, and whether it looks like AstroPix readouts."""

from __future__ import annotations

import socket

import click
import trio

from .. import AstroPix4Readout, MalformedDatagram, open_receiver, resolve_group
from ._common import DEFAULT_PORT, PORT, SECONDS, emit_json, parse_endpoint, run, stop_on_signals

__all__ = ["COMMANDS"]

#: Readouts checked per interface for well-formedness (then sampled).
_CHECK_ALL = 10_000
_SAMPLE = 100


def _address(address) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _candidates(group: str, port: int, source) -> tuple[list, list]:
    """(interfaces to join on as (name, spec), skipped as (name, reason))."""
    joins, skipped = [], []
    try:
        spec = resolve_group(group, port, source=source)
    except (ValueError, TypeError):
        spec = None  # e.g. an IPv6 group whose scope needs an interface: per interface below
    if spec is not None and spec.unicast:
        return [(spec.interface_name or "lo", dict(interface=None))], []
    for _index, name in socket.if_nameindex():
        try:
            resolve_group(group, port, interface=name, source=source)
        except (ValueError, TypeError, OSError) as exc:
            skipped.append((name, str(exc)))
            continue
        joins.append((name, dict(interface=name)))
    return joins, skipped


def _new_result(name: str) -> dict:
    return {"interface": name, "joined": False, "error": None, "datagrams": 0, "bytes": 0, "rate": 0.0,
            "checked": 0, "well_formed": 0, "senders": {}}


async def _watch(group, port, source, name, options, result, task_status=trio.TASK_STATUS_IGNORED):
    """Receive on one interface until cancelled, counting into ``result``."""
    started = False
    try:
        async with open_receiver(group, port, framing="raw", source=source, **options) as receiver:
            result["joined"] = True
            started = True
            task_status.started()
            senders = result["senders"]
            async for message in receiver:
                result["datagrams"] += 1
                result["bytes"] += len(message.payload)
                key = _address(message.address) if message.address is not None else "?"
                senders[key] = senders.get(key, 0) + 1
                n = result["datagrams"]
                if n <= _CHECK_ALL or n % _SAMPLE == 0:
                    result["checked"] += 1
                    try:
                        AstroPix4Readout.from_bytes(message.payload)
                    except MalformedDatagram:
                        continue
                    result["well_formed"] += 1
    except (OSError, ValueError, TypeError) as exc:
        result["error"] = str(exc) or type(exc).__name__
        if not started:
            task_status.started()


def _answer(results: list[dict], seconds: float) -> str:
    receiving = [r for r in results if r["datagrams"]]
    if not receiving:
        return ("nothing arrived on any interface: check --interface, the sender's TTL, IGMP snooping, "
                "firewall")
    parts = []
    for r in receiving:
        senders = sorted(r["senders"], key=r["senders"].get, reverse=True)
        who = ", ".join(senders[:3]) + (f" and {len(senders) - 3} more" if len(senders) > 3 else "")
        parts.append(f"on {r['interface']} from {who} at {r['rate']:,.0f} datagrams/s"
                     f" ({r['readout_fraction'] * 100:.0f} % AstroPix readouts)")
    return "traffic arrives " + "; ".join(parts)


async def _main(group, port, source, seconds, as_json) -> None:
    joins, skipped = _candidates(group, port, source)
    results = []
    with trio.CancelScope() as outer:
        async with trio.open_nursery() as nursery:
            await nursery.start(stop_on_signals, outer)
            async with trio.open_nursery() as receivers:
                for name, options in joins:
                    result = _new_result(name)
                    results.append(result)
                    await receivers.start(_watch, group, port, source, name, options, result)
                start = trio.current_time()
                await trio.sleep(seconds)
                receivers.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    elapsed = max(trio.current_time() - start, 1e-9) if results else seconds
    for r in results:
        r["rate"] = r["datagrams"] / elapsed
        r["readout_fraction"] = r["well_formed"] / r["checked"] if r["checked"] else 0.0
    for name, reason in skipped:
        r = _new_result(name)
        r["error"] = reason
        r["readout_fraction"] = 0.0
        results.append(r)
    answer = _answer(results, elapsed)
    if as_json:
        emit_json({"group": group, "port": port, "seconds": elapsed, "interfaces": results,
                   "receiving": [r["interface"] for r in results if r["datagrams"]], "answer": answer})
        return
    where = f"[{group}]:{port}" if ":" in group else f"{group}:{port}"
    click.echo(f"probe {where} for {elapsed:.1f} s")
    for r in results:
        if r["error"] is not None and not r["joined"]:
            click.echo(f"  {r['interface']:<8} not joined: {r['error']}")
            continue
        senders = ", ".join(f"{k} ({v:,})" for k, v in sorted(r["senders"].items(), key=lambda kv: -kv[1]))
        click.echo(f"  {r['interface']:<8} {r['datagrams']:>9,} datagrams {r['rate']:>10,.1f}/s "
                   f"{r['bytes'] / elapsed / 1e6:>7.2f} MB/s  readouts {r['readout_fraction'] * 100:5.1f} %"
                   + (f"  from {senders}" if senders else "")
                   + (f"  (stopped: {r['error']})" if r["error"] else ""))
    click.echo(answer)


def _parse(ctx, param, value):
    group, port = parse_endpoint(value)
    return group, port


@click.command("probe")
@click.argument("endpoint", metavar="GROUP[:PORT]", callback=_parse)
@click.option("--port", "-p", type=PORT, default=None, help=f"UDP port [default: {DEFAULT_PORT}].")
@click.option("--source", default=None, help="Receive only from this sender (source-specific multicast).")
@click.option("--seconds", type=SECONDS, default=3.0, show_default=True,
              help="How long to listen.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as one JSON object.")
def probe_command(endpoint, port, source, seconds, as_json):
    """Say on which interface a group's traffic arrives, and from whom.

    Joins the group on every multicast-capable interface for --seconds and
    reports, per interface, datagrams, rate, senders and whether they look
    like AstroPix readouts: the answer to "am I receiving anything, and on
    which interface?". Interfaces where joining fails are listed with the
    reason. An IPv6 group is probed on every interface that takes it.

    \b
    Examples:
      mcast-trio probe 239.255.0.1:5007
      mcast-trio probe 239.255.0.1 --seconds 10
      mcast-trio probe '[ff12::1%mc0]:5007' --json
    """
    group, named_port = endpoint
    if named_port is not None and port is not None and port != named_port:
        raise click.UsageError(f"GROUP {group}:{named_port} names port {named_port} but --port is {port}")
    port = named_port if named_port is not None else (port if port is not None else DEFAULT_PORT)
    # Validate like every other command (the library's checks): the group
    # must be valid on at least one interface (an IPv6 group is not on
    # loopback); a scope (ff12::1%mc0) is dropped: every interface is probed.
    bare = group.split("%")[0] if ":" in group else group
    try:
        resolve_group(group, port, source=source)
    except (ValueError, TypeError) as exc:
        if bare != group or not any(_valid_on(bare, port, source, name) for _index, name in socket.if_nameindex()):
            raise click.UsageError(str(exc)) from None
    run(_main, bare, port, source, seconds, as_json)


def _valid_on(group, port, source, interface) -> bool:
    try:
        resolve_group(group, port, interface=interface, source=source)
    except (ValueError, TypeError, OSError):
        return False
    return True


COMMANDS = [probe_command]
