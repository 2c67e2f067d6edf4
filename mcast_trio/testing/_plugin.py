"""pytest plugin of mcast_trio (entry point ``pytest11``): fixtures for tests
of DAQ code and monitors.

Fixtures (all function-scoped):

``mcast_group``
    A fresh :class:`GroupAddress` (``group``, ``port``) for this test: an
    administratively scoped IPv4 group and a port no other test of the
    session uses.
``mcast_network``
    A :class:`~mcast_trio.testing.MemoryNetwork` (seed from the test's
    name, so failures reproduce) installed as the current network for the
    test: the real ``open_sender``/``open_receiver`` run over it. Set faults
    with ``mcast_network.set_rules(LinkRules(...))`` or
    ``mcast_network.default_rules = ...`` before opening endpoints.
``mcast_receiver``
    A receiver of AstroPix readouts on ``mcast_group``, started with
    ``await nursery.start(serve_receiver, ...)`` in pytest-trio's ``nursery``
    fixture; a :class:`~mcast_trio.MulticastReceiver`. It runs over the
    current network: the memory network if the test also uses
    ``mcast_network``, real sockets otherwise.
``mcast_sender``
    A :class:`~mcast_trio.MulticastSender` to ``mcast_group``, started with
    ``await nursery.start(serve_sender, ...)``.
``mcast_daq``
    A factory of seeded :class:`~mcast_trio.sim.DaqSimulator` streams with
    ground truth: ``mcast_daq(seed=1, **options)``.

The async fixtures need pytest-trio (``trio_mode = true``).
"""

from __future__ import annotations

import functools
import itertools
import os
import zlib
from typing import NamedTuple

import pytest

_counter = itertools.count()


class GroupAddress(NamedTuple):
    """A multicast group and port reserved for one test."""

    group: str
    port: int


@pytest.fixture
def mcast_group() -> GroupAddress:
    n = next(_counter)
    pid = os.getpid()
    # 239.255.0.0/16 is the IPv4 organization-local scope.
    group = f"239.255.{(pid >> 8) % 250 + 1}.{(pid + n) % 250 + 1}"
    port = 20000 + (pid * 7 + n) % 30000
    return GroupAddress(group, port)


@pytest.fixture
def mcast_network(request):
    from mcast_trio.testing import MemoryNetwork, use_network

    seed = zlib.crc32(request.node.nodeid.encode())
    network = MemoryNetwork(seed=seed)
    with use_network(network):
        yield network


@pytest.fixture
def mcast_daq():
    from mcast_trio.sim import DaqSimulator

    def make(seed: int = 0, **options):
        options.setdefault("keep_truth", True)
        options.setdefault("start_ns", 0)
        return DaqSimulator(seed=seed, **options)

    return make


@pytest.fixture
async def mcast_receiver(nursery, mcast_group):
    from mcast_trio import AstroPix4Readout, serve_receiver

    return await nursery.start(functools.partial(
        serve_receiver, mcast_group.group, mcast_group.port, readout_class=AstroPix4Readout,
        queue_size=1024))


@pytest.fixture
async def mcast_sender(nursery, mcast_group):
    from mcast_trio import serve_sender

    return await nursery.start(functools.partial(serve_sender, mcast_group.group, mcast_group.port))
