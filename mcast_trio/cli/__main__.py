"""``python -m mcast_trio.cli``: the same as the ``mcast-trio`` command."""

from . import _signals, main

_code = main()
_signals.exiting()  # a stop signal while the process exits: ignored, exit code kept
raise SystemExit(_code)
