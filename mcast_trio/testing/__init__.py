"""Test harness for DAQ code and monitors built on mcast_trio.

* :class:`MemoryNetwork`: an in-memory multicast network with deterministic
  per-link faults (:class:`LinkRules`: loss, duplication, reordering, delay,
  truncation, corruption) that the real senders and receivers run over
  unchanged; install it with :func:`use_network` (or pass ``network=``).
* :func:`serve_fault_relay`: the same faults for programs that are not
  in-process: receives a group on real sockets and re-emits it on another.
* A pytest plugin (loaded automatically when mcast_trio is installed) with
  fixtures: ``mcast_group``, ``mcast_network``, ``mcast_receiver``,
  ``mcast_sender``, ``mcast_daq``. See the "Testing your DAQ code" page.
"""

from .._io._net import SocketNetwork, current_network, use_network
from ._memory import FaultCounts, LinkRules, MemoryNetwork, MemoryReceiver, MemorySender
from ._relay import serve_fault_relay, FaultRelay
from ._isolation import (
    inside_netns_run,
    isolation_problem,
    joined_ipv4_groups,
    joined_ipv6_groups,
    open_fd_count,
    veth_problem,
)

__all__ = [
    "FaultCounts",
    "FaultRelay",
    "LinkRules",
    "MemoryNetwork",
    "MemoryReceiver",
    "MemorySender",
    "SocketNetwork",
    "current_network",
    "inside_netns_run",
    "isolation_problem",
    "joined_ipv4_groups",
    "joined_ipv6_groups",
    "open_fd_count",
    "serve_fault_relay",
    "use_network",
    "veth_problem",
]

from .._metadata import fixup_module_metadata  # noqa: E402

fixup_module_metadata(globals(), __all__, "mcast_trio.testing")

