"""``python -m mcast_trio.cli``: the same as the ``mcast-trio`` command."""

from . import main

raise SystemExit(main())
