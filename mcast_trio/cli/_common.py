"""What every subcommand shares: the network options, their validation (the
library's own), the trio runner with its exit codes and one-line errors, and
stopping cleanly on Ctrl-C or SIGTERM.

Subcommands use them like this::

    @click.command()
    @network_options()
    @click.option("--rate", ...)
    def simulate(network, rate):
        run(_simulate, network, rate)

``network`` is a :class:`Network`: the validated ``GroupSpec`` plus the raw
option values to pass on to ``open_sender``/``open_receiver``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click
import trio

from .. import GroupSpec, MalformedDatagram, resolve_group

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_PORT",
    "Network",
    "network_options",
    "parse_endpoint",
    "run",
    "stop_on_signals",
    "emit_json",
    "fail",
]

#: The default group and port of every network command: an organization-local
#: multicast group (any number of monitors may listen), on loopback unless
#: --interface names another interface. astropix-analysis' own default,
#: unicast 127.0.0.1:5007, is accepted with --group 127.0.0.1.
DEFAULT_GROUP = "239.255.0.1"
DEFAULT_PORT = 5007


@dataclasses.dataclass(frozen=True)
class Network:
    """The validated network options of one command."""

    spec: GroupSpec
    group: str
    port: int
    interface: Any
    source: str | None
    ttl: int

    def receiver_options(self) -> dict:
        """Keyword arguments for :func:`mcast_trio.open_receiver`."""
        return dict(interface=self.interface, source=self.source)

    def sender_options(self) -> dict:
        """Keyword arguments for :func:`mcast_trio.open_sender`."""
        return dict(interface=self.interface, ttl=self.ttl)


def parse_endpoint(text: str) -> tuple[str, int | None]:
    """``"239.255.0.1:5007"``, ``"[ff12::1%mc0]:5007"``, ``"239.255.0.1"`` or
    ``"ff12::1%mc0"`` -> ``(group, port or None)``."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise click.BadParameter(f"{text!r}: missing ']'; write [ff12::1%mc0]:5007")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise click.BadParameter(f"{text!r}: expected :PORT after ]")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        return text, None
    try:
        return host, int(port_text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: the port {port_text!r} is not an integer") from None


def _resolve(ctx: click.Context, group: str, port: int, interface, source, ttl: int) -> Network:
    """Validate like the library (it is the library); an invalid value is a
    usage error (exit 2) whose message is the library's."""
    if isinstance(interface, str) and interface.isdigit():
        interface = int(interface)
    try:
        spec = resolve_group(group, port, interface=interface, source=source, ttl=ttl,
                             allow_unicast=False)
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc), ctx) from None
    return Network(spec, group, port, interface, source, ttl)


def network_options(*, sender: bool = False) -> Callable:
    """Add ``--group``, ``--port``, ``--interface``, and ``--source``
    (receivers) or ``--ttl`` (senders); the command function receives one
    ``network`` argument (a :class:`Network`) instead."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*, group: str, port: int | None, interface, source: str | None = None, ttl: int = 1,
                    **kwargs):
            ctx = click.get_current_context()
            host, named_port = parse_endpoint(group)
            if named_port is not None and port is not None and port != named_port:
                raise click.UsageError(f"--group {group!r} names port {named_port} but --port is {port}", ctx)
            port = named_port if named_port is not None else (port if port is not None else DEFAULT_PORT)
            network = _resolve(ctx, host, port, interface, source, ttl)
            return function(network=network, **kwargs)

        options = [
            click.option("--group", "-g", default=DEFAULT_GROUP, show_default=True, metavar="GROUP[:PORT]",
                         help="Multicast group (IPv4, or IPv6 with its interface: ff12::1%mc0), or a "
                              "loopback unicast address (astropix-analysis' 127.0.0.1)."),
            click.option("--port", "-p", type=int, default=None,
                         help=f"UDP port [default: {DEFAULT_PORT}]."),
            click.option("--interface", "-i", default=None,
                         help="Interface name, index or address [default: loopback]."),
            click.option("--ttl", type=int, default=1, show_default=True,
                         help="Multicast TTL (hop limit); 1 stays on the local link.") if sender else
            click.option("--source", default=None,
                         help="Receive only from this sender (source-specific multicast)."),
        ]
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


def fail(message: str) -> click.ClickException:
    """A one-line failure (exit 1) without traceback."""
    return click.ClickException(message)


def run(async_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run ``async_fn(*args)`` under trio and turn what goes wrong into the
    exit codes of the command line.

    * Ctrl-C (``KeyboardInterrupt``): the command stops where it is and exits
      0 (commands that must not lose data stop on SIGINT/SIGTERM themselves,
      with :func:`stop_on_signals`, and flush first);
    * ``OSError`` (a busy port, a missing file, ...), ``MalformedDatagram``
      (a damaged file), ``ValueError``/``TypeError`` from the library: one
      line ``Error: ...``, exit 1;
    * a nursery's group holding a single exception counts as that exception;
      several at once (a genuine concurrent failure) keep their traceback.
    """
    try:
        try:
            return trio.run(async_fn, *args)
        except BaseExceptionGroup as group:
            # A nursery wraps even a single failure (a busy port, a file
            # that cannot be written): report that one as itself.
            raise _single(group) from None
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        raise SystemExit(0) from None
    except (click.ClickException, BrokenPipeError):
        raise  # a broken pipe: the reader went away (the click group ends quietly)
    except (OSError, MalformedDatagram, ValueError, TypeError) as exc:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
            text = f"{exc.filename}: {text}"
        raise fail(text) from None


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one exception inside ``group`` (however nested), or ``group``
    itself when it holds several (a genuine concurrent failure: traceback)."""
    leaves: list[BaseException] = []
    pending = [group]
    while pending:
        for exc in pending.pop().exceptions:
            if isinstance(exc, BaseExceptionGroup):
                pending.append(exc)
            else:
                leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else group


async def stop_on_signals(cancel_scope: trio.CancelScope, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Cancel ``cancel_scope`` on the first SIGINT or SIGTERM (start it in the
    nursery whose work must end cleanly, with ``nursery.start``: its
    ``finally`` blocks then flush and close files, and the command exits 0).

    Cancellation: stops listening for the signals.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _signum in signals:
            cancel_scope.cancel()
            return


def emit_json(record: dict) -> None:
    """Print one JSON line and flush (for pipes)."""
    sys.stdout.write(json.dumps(record, separators=(",", ":"), default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "items"):
        return {str(k): v for k, v in value.items()}
    return str(value)
