"""The ``mcast-trio`` click group; every subcommand lives in its own module
and is added here."""

from __future__ import annotations

import importlib

import click

from .. import __version__
from . import _signals

#: The subcommand modules, in the order ``--help`` lists them; each defines
#: ``COMMANDS``, a list of click commands.
_MODULES = ("_simulate", "_replay", "_listen", "_record", "_monitor", "_files", "_probe", "_bench",
            "_demo")


#: The subcommands that run until stopped: SIGINT or SIGTERM, at any moment
#: (from the first instant of the process), ends them cleanly with exit 0
#: and their summary (:func:`._common.run`). The others are interrupted
#: (``KeyboardInterrupt``: click's ``Aborted!``, exit 1).
STOPPED_BY_SIGNALS = frozenset({"simulate", "replay", "listen", "record", "monitor", "probe", "demo"})


class _Group(click.Group):
    """The group: the subcommands not in :data:`STOPPED_BY_SIGNALS` are
    interrupted by signals; a reader of standard output that goes away (``| head``)
    ends any subcommand quietly, exit 0 (click's own handling says exit 1);
    standard output that cannot be written (a full disk) ends it with one
    line naming standard output, exit 1."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        if name not in STOPPED_BY_SIGNALS:
            _signals.interruptible()
        return name, command, rest

    def invoke(self, ctx: click.Context):
        from ._output import is_reader_gone, is_stdout_error, reader_gone

        try:
            return super().invoke(ctx)
        except (OSError, BaseExceptionGroup) as exc:
            error = is_stdout_error(exc)
            if error is not None:  # a full disk: one line naming standard output, exit 1
                reader_gone()  # (and the flush at exit goes nowhere)
                click.echo(f"Error: {error.strerror}", err=True)
                raise SystemExit(1) from None
            if not is_reader_gone(exc):
                raise
            reader_gone()
            raise SystemExit(0) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mcast-trio")
def cli() -> None:
    """Multicast AstroPix readouts to passive monitors, and watch them.

    \b
    Examples:
      mcast-trio simulate --rate 1000              # a DAQ stand-in
      mcast-trio monitor                           # the live monitor
      mcast-trio record run.apx --rotate-size 1GB  # record what arrives
      mcast-trio decode run.apx --to csv           # hits as a table

    Every network command takes --group/--port/--interface (loopback by
    default); `mcast-trio COMMAND --help` says more.
    """


for _name in _MODULES:
    try:
        _module = importlib.import_module(f".{_name}", __package__)
    except ModuleNotFoundError as exc:  # a subcommand not written yet
        if exc.name != f"{__package__}.{_name}":
            raise
        continue
    for _command in _module.COMMANDS:
        cli.add_command(_command)
