"""What every subcommand shares: the network options, their validation (the
library's own), the trio runner with its exit codes and one-line errors, and
stopping cleanly on Ctrl-C or SIGTERM, and the click parameter types of every
numeric option (:class:`Number`, :class:`ByteSize`, :class:`OutputFile`).

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

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import sys
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import click
import trio

from .. import GroupSpec, MalformedDatagram, TruncatedRecordWarning, resolve_group
from .._format import CLOCK_CYCLES_PER_US, CLOCK_ROLLOVER, HEADER_SIZE, HIT_SIZE
from .._protocol._message import MAX_UDP_PAYLOAD
from .._validate import check_int, check_number
from . import _signals
from ._stdio import StdoutError

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_PORT",
    "Network",
    "Number",
    "ByteSize",
    "OutputFile",
    "parse_size",
    "network_options",
    "parse_endpoint",
    "run",
    "stop_on_signals",
    "emit_json",
    "strict_json",
    "TOO_DEEP",
    "fail",
    "said_once",
]

#: The default group and port of every network command: an organization-local
#: multicast group (any number of monitors may listen), on loopback unless
#: --interface names another interface. astropix-analysis' own default,
#: unicast 127.0.0.1:5007, is accepted with --group 127.0.0.1.
DEFAULT_GROUP = "239.255.0.1"
DEFAULT_PORT = 5007


# -- the parameter types of every numeric option --------------------------------------------------


def _option_name(param: click.Parameter | None) -> str:
    """``--rate`` (the longest spelling of an option), ``FILE`` (an
    argument), or ``value`` without a parameter."""
    if param is None:
        return "value"
    if isinstance(param, click.Option) and param.opts:
        return max(param.opts, key=len)
    return (param.name or "value").upper()


def _number_text(value: float | int) -> str:
    if isinstance(value, int) and value > 10**12 and (value + 1) & value == 0:
        return f"2**{value.bit_length()}-1"
    return str(value) if isinstance(value, int) else f"{value:g}"


class Number(click.ParamType):
    """A finite number (``integer``: an integer) in ``low..high``
    (``low_open``: strictly above ``low``), or exactly ``off`` (a value that
    switches the feature off, like ``--status 0``).

    The one owner of "is this number acceptable?" on the command line:
    every numeric option of every subcommand has this type, and it checks
    with the library's own :func:`~mcast_trio._validate.check_number` /
    :func:`~mcast_trio._validate.check_int` (NaN and the infinities are
    never finite), so a bad value is a usage error (exit 2) whose message
    names the option, the value and what is allowed. Where the library
    validates the same value (a port, a TTL, a queue size, the simulator's
    mean number of hits) the range is the library's.
    """

    def __init__(self, low: float | int, high: float | int, *, integer: bool = False, low_open: bool = False,
                 off: float | int | None = None, off_means: str = "off") -> None:
        self.low, self.high, self.integer, self.low_open = low, high, integer, low_open
        self.off, self.off_means = off, off_means
        self.name = "integer" if integer else "float"
        low_text = _number_text(low)
        text = f"{'> ' + low_text + ' and <= ' if low_open else low_text + '..'}{_number_text(high)}"
        self.allowed = f"{_number_text(off)} ({off_means}) or {text}" if off is not None else text

    def allows(self, value: float | int) -> bool:
        """Whether ``value`` is acceptable (what :meth:`convert` returns it for)."""
        try:
            self._check("value", value)
        except (TypeError, ValueError):
            return False
        return True

    def _check(self, name: str, number: Any) -> float | int:
        if self.off is not None and not isinstance(number, bool) and number == self.off:
            return self.off
        if self.integer:
            return check_int(name, number, self.low, self.high, allowed=self.allowed)
        return check_number(name, number, self.low, self.high, low_open=self.low_open, allowed=self.allowed)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | int:
        name = _option_name(param)
        number = value
        if isinstance(value, str):
            try:
                number = int(value.strip(), 10) if self.integer else float(value)
            except ValueError:
                kind = "an integer" if self.integer else "a number"
                self.fail(f"{name}={value!r} is not {kind}; allowed: {self.allowed}", param, ctx)
        try:
            return self._check(name, number)
        except (TypeError, ValueError) as exc:
            message = str(exc)
            said = f"{name}={number!r}"
            if isinstance(value, str) and message.startswith(said):  # as typed: 1e30, not 1e+30
                message = f"{name}={value.strip()}{message[len(said):]}"
            self.fail(message, param, ctx)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str | None:
        return "INTEGER" if self.integer else "FLOAT"

    def __repr__(self) -> str:
        return f"Number({self.allowed})"


#: The longest time any option takes (seconds): about 31 years.
MAX_SECONDS = 1e9
#: The shortest time an option takes (seconds): trio's timers are not finer.
MIN_SECONDS = 1e-3
#: The largest count (readouts, passes, N of --garbage-every): a signed 64-bit integer.
MAX_COUNT = 2**63 - 1

#: A duration in seconds (--seconds, --rotate-time, --stale, ...).
SECONDS = Number(MIN_SECONDS, MAX_SECONDS)
#: A period in seconds, or 0: never (--status).
SECONDS_OR_NEVER = Number(MIN_SECONDS, MAX_SECONDS, off=0, off_means="never")
#: Readouts per second the simulated DAQ and replay send: at most one
#: readout per nanosecond tick of the timestamps is far beyond a sender's
#: reach; 1e7/s is the simulator's practical top; at least one per 1000 s.
RATE = Number(1e-3, 1e7)
#: A multiple of a recorded pace (replay --speed).
SPEED = Number(1e-3, 1e3)
#: A fraction (--loss-alarm).
FRACTION = Number(0.0, 1.0)
#: Mean number of hits per simulated readout: the simulator's own range
#: (:class:`mcast_trio.sim.DaqSimulator` ``mean_hits``).
MEAN_HITS = Number(0.0, 1e6)


def _max_sent_mean_hits() -> float:
    """The largest mean number of hits per simulated readout whose
    readouts one raw datagram carries: 65,507 bytes of UDP payload, less the
    readout header and the simulator's leading and trailing IDLE bytes, at
    most 10 bytes a hit (8, and up to 2 IDLE bytes after it), with room for
    six standard deviations of the Poisson spread: ``m + 6 sqrt(m) <= hits``."""
    hits = (MAX_UDP_PAYLOAD - HEADER_SIZE - 2 - 6) // (HIT_SIZE + 2)
    return float(math.floor((math.sqrt(9 + hits) - 3) ** 2))


#: Mean number of hits per readout that is sent (simulate, bench): within
#: the simulator's range, and no more than one raw datagram carries
#: (:func:`_max_sent_mean_hits`: 6080), so that a mean whose readouts
#: cannot be sent is a usage error at once, not a failure seconds later.
SENT_MEAN_HITS = Number(0.0, _max_sent_mean_hits())
#: A seed of numpy's generator (non-negative; 64 bits are plenty).
SEED = Number(0, 2**64 - 1, integer=True)
#: A UDP port, and a multicast TTL: the library's ranges (``resolve_group``).
PORT = Number(1, 65535, integer=True)
TTL = Number(0, 255, integer=True)
#: A count of at least 1 (--count of record).
COUNT = Number(1, MAX_COUNT, integer=True)
#: A count, or 0: no limit (--count of listen, --loop of replay).
COUNT_OR_UNLIMITED = Number(1, MAX_COUNT, integer=True, off=0, off_means="no limit")
#: Every N readouts, or 0: never (--garbage-every).
EVERY_OR_NEVER = Number(1, MAX_COUNT, integer=True, off=0, off_means="never")
#: Receive batches buffered (the library's ``queue_size`` range).
QUEUE = Number(1, 1 << 20, integer=True)
#: A TOT in microseconds: one clock cycle up to the largest TOT that decodes.
TOT_US = Number(1 / CLOCK_CYCLES_PER_US, (CLOCK_ROLLOVER - 1) / CLOCK_CYCLES_PER_US)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


_SIZE_ALLOWED = "a number of bytes with an optional unit (100MB, 1GB, 512MiB), 1 byte..2**63-1 bytes"


def parse_size(text: str) -> int:
    """``"100MB"`` -> 100_000_000; ``"1GiB"`` -> 2**30; plain bytes too.
    Decimal units (kB, MB, GB, TB), binary ones (KiB, MiB, GiB, TiB); at
    least 1 byte, at most 2**63-1 (a file's largest size).

    Raises:
        ValueError: anything else (``"{text!r} is not a size; allowed: ..."``).
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; allowed: {_SIZE_ALLOWED}")
    number = float(match.group(1)) * _UNITS[unit]
    if not 1 <= number < 2**63:
        raise ValueError(f"{text!r} is out of range; allowed: {_SIZE_ALLOWED}")
    return int(number)


class ByteSize(click.ParamType):
    """A size in bytes with an optional unit (:func:`parse_size`)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 2**63:
            return value
        text = str(value)
        try:
            return parse_size(text)
        except ValueError as exc:
            message = str(exc)
            if message.startswith(repr(text)):
                message = f"{_option_name(param)}={text.strip()}{message[len(repr(text)):]}"
            self.fail(message, param, ctx)


#: Characters a command may add to an output file's name for the files it
#: writes: a temporary name (``decode``: ``.NAME.xxxxxxxx.part``), a
#: rotation number and a sender (``record``: ``STEM-sender64-0001.capture``).
NAME_ROOM = 24


def _name_max(path: pathlib.Path) -> int:
    """The longest file name (bytes) the file system of ``path`` takes."""
    for parent in (path.parent, *path.parent.parents):
        try:
            return os.pathconf(parent if str(parent) else ".", "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


class OutputFile(click.ParamType):
    """The path of a file to write: not empty, naming a file (not ``.``,
    ``..``, ``/`` or a name ending in ``/``), not an existing directory, a
    name the file system takes (with :data:`NAME_ROOM` characters to spare).
    Whether it may exist is the command's business."""

    name = "path"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> pathlib.Path:
        text = str(value)
        path = pathlib.Path(text)
        why = None
        if not text.strip():
            why = "is empty; give a file name"
        elif text.endswith(("/", "/.", "/..")) or path.name in ("", ".", ".."):
            why = "names a directory, not a file"
        elif any(len(os.fsencode(part)) > 255 for part in path.parent.parts) or \
                len(os.fsencode(path.name)) + NAME_ROOM > _name_max(path):
            why = (f"is too long: a file name takes at most {_name_max(path) - NAME_ROOM} bytes here "
                   f"(the file system's {_name_max(path)}, less {NAME_ROOM} for the names derived from it)")
        elif path.is_dir():
            why = "is a directory; give a file name"
        if why is not None:
            self.fail(f"{text!r} {why}", param, ctx)
        return path


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
            click.option("--port", "-p", type=PORT, default=None,
                         help=f"UDP port [default: {DEFAULT_PORT}]."),
            click.option("--interface", "-i", default=None,
                         help="Interface name, index or address [default: loopback]."),
            click.option("--ttl", type=TTL, default=1, show_default=True,
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

    * SIGINT (Ctrl-C) and SIGTERM, from the first instant of the process
      (:mod:`._signals`) to the end of ``trio.run``: the cancel scopes the
      command registered with :func:`stop_on_signals` are cancelled (its
      ``finally`` blocks flush and close, it prints its summary, exit 0);
      a signal that came before it registered one (during start-up, while
      its socket opens) cancels them as they are registered; a command that
      registers none within :data:`GRACE` seconds is cancelled whole;
    * ``OSError`` (a busy port, a missing file, ...), ``MalformedDatagram``
      (a damaged file), ``ValueError``/``TypeError`` from the library: one
      line ``Error: ...``, exit 1;
    * a nursery's group holding a single exception counts as that exception;
      several at once (a genuine concurrent failure) keep their traceback.
    """
    try:
        try:
            result = trio.run(_supervised, async_fn, args)
            if _signals.received and _signals.raising():
                raise KeyboardInterrupt  # a command that is not stopped by signals: interrupted
            return result
        except BaseExceptionGroup as group:
            # A nursery wraps even a single failure (a busy port, a file
            # that cannot be written): report that one as itself.
            raise _single(group) from None
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        raise SystemExit(0) from None
    except (click.ClickException, BrokenPipeError, StdoutError):
        raise  # a broken pipe: the reader went away (the click group ends quietly); stdout: said by the group
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


#: Seconds a signal waits for the command to register a scope with
#: :func:`stop_on_signals` before the whole command is cancelled.
GRACE = 1.0


class _Stopping:
    """Inside :func:`run`: the scopes a signal cancels, and the command's
    outermost scope (the fallback)."""

    def __init__(self, outer: trio.CancelScope) -> None:
        self.outer = outer
        self.scopes: list[trio.CancelScope] = []

    def stop(self) -> None:
        if self.scopes:
            for scope in self.scopes:
                scope.cancel()
        else:
            self.outer.deadline = min(self.outer.deadline, trio.current_time() + GRACE)


_stopping: _Stopping | None = None


async def _supervised(async_fn: Callable[..., Awaitable[Any]], args: tuple) -> Any:
    global _stopping
    result = None
    with trio.open_signal_receiver(*_signals.STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            outer = trio.CancelScope()
            _stopping = _Stopping(outer)
            nursery.start_soon(_watch, signals, _stopping)
            try:
                with outer:
                    result = await async_fn(*args)
            finally:
                _stopping = None
                nursery.cancel_scope.cancel()
    return result


async def _watch(signals, stopping: _Stopping) -> None:
    if _signals.received:  # before trio.run: during start-up, or while parsing
        stopping.stop()
    async for signum in signals:
        _signals.received.append(signum)
        stopping.stop()


async def stop_on_signals(cancel_scope: trio.CancelScope, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Cancel ``cancel_scope`` on SIGINT or SIGTERM (start it in the
    nursery whose work must end cleanly, with ``nursery.start``: its
    ``finally`` blocks then flush and close files, and the command exits 0).
    Under :func:`run` a signal that came earlier (from the first instant of
    the process) cancels it at once.

    Cancellation: stops listening for the signals.
    """
    if _stopping is None:  # not under run(): listen here
        with trio.open_signal_receiver(*_signals.STOP_SIGNALS) as signals:
            task_status.started()
            async for _signum in signals:
                cancel_scope.cancel()
                return
        return
    stopping = _stopping
    stopping.scopes.append(cancel_scope)
    stopping.outer.deadline = math.inf  # the command stops itself now: no fallback while it cleans up
    try:
        if _signals.received:
            cancel_scope.cancel()
        task_status.started()
        await trio.sleep_forever()
    finally:
        stopping.scopes.remove(cancel_scope)


@contextlib.contextmanager
def said_once(tool: str, *, truncation: str | None = None):
    """Say the Python warnings raised inside (numpy's, the library's) in the
    tool's own words: one line on stderr per distinct message, ``TOOL:
    warning: MESSAGE``, as it happens, never the raw warning with its source
    line.

    A :class:`~mcast_trio.TruncatedRecordWarning` becomes ``TOOL: note:
    FILE: record N at offset X is truncated: ...; the complete records
    before it TRUNCATION`` (``truncation`` says what was done with them), or
    is not said at all when ``truncation`` is None (the tool reports it
    itself). The warning filters in force are kept (what Python hides stays
    hidden).
    """
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, TruncatedRecordWarning):
            if truncation is None:
                return
            text = f"{tool}: note: {message}; the complete records before it {truncation}"
        else:
            text = f"{tool}: warning: {message}"
        text = " ".join(text.split())
        if text not in seen:
            seen.add(text)
            click.echo(text, err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", TruncatedRecordWarning)
        warnings.showwarning = show
        yield


def emit_json(record: dict) -> None:
    """Print one JSON line and flush (for pipes)."""
    sys.stdout.write(json.dumps(record, separators=(",", ":"), default=_jsonable) + "\n")
    sys.stdout.flush()


#: What the tools print in place of a value nested too deeply for Python's
#: ``repr()`` and ``json`` (a :exc:`RecursionError`): an MCL payload the
#: decoder accepts may nest about a thousand lists.
TOO_DEEP = "<nested too deeply to print>"


def strict_json(value: Any) -> Any:
    """``value`` with every float that is not finite (NaN, infinities, as a
    JSON header or an MCL payload may hold) replaced by None, so that the
    JSON printed is strict (RFC 8259: no ``NaN``/``Infinity``).

    Raises:
        RecursionError: ``value`` nests too deeply (the callers print
            :data:`TOO_DEEP` instead).
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


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
