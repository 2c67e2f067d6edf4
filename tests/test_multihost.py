"""Senders and receivers as separate processes on separate "hosts" (network
namespaces built by ``tools/multihost.py``): TTL and hop limits, the choice
of interface, joining late and leaving.

The hosts (see ``tools/multihost.py``): A, B, C, F and R on one switched
link L1; A and D on a veth link L2; E behind R, a multicast router, on L3.
Addresses: IPv4 198.18.0.0/15 (RFC 2544 benchmarking range), IPv6 ULA
``fd6d:6374::/48`` and link-local; groups 239.255.18.x, ff12::18:x and
ff15::18:x. The namespaces have no link to anything else, so nothing sent
here can leave them, wherever the suite runs.

Every datagram is a serialized AstroPix readout with a known readout id; a
receiver reports the ids it got, in arrival order, as runs ``[first, last]``.
A receiver that must get nothing from one sender always gets something from
another (a *control*), so "nothing arrived" cannot mean "it was not
listening". Receivers stop only after the senders are done and 50 ms passed
without datagrams.

These tests skip (saying why) only where the namespaces cannot be built
outside ``tools/netns-run``; inside it (``make test``) that is a failure.
The two tests through the router also skip where the kernel has no
multicast routing (``CONFIG_IP_MROUTE``/``CONFIG_IPV6_MROUTE``).

Run (about 15 s)::

    PYTHONPATH=$PWD tools/netns-run python -m pytest tests/test_multihost.py -v
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import os
import pathlib

import pytest
import trio

REPO = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("multihost", REPO / "tools" / "multihost.py")
multihost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(multihost)

NETNS_RUN = os.environ.get("NETNS_RUN_INSIDE") == "1"

A4, A6 = multihost.ADDRESSES["A"]["eth0"]  # A on L1
A4_L2, _ = multihost.ADDRESSES["A"]["eth1"]  # A on L2

G_TTL4 = "239.255.18.10"
G_ROUTED4 = "239.255.18.16"  # routed by R
G_IF4 = "239.255.18.11"
G_LATE4 = "239.255.18.12"
G_VETH6 = "ff12::18:13"
G_SITE6 = "ff15::18:14"  # site scope, routed by R
G_LINK6 = "ff12::18:15"  # link scope; R has a route for it all the same

#: Readouts the late joiner must have received before the sender stops.
LATE_AT_LEAST = 100


@pytest.fixture(scope="module")
def net():
    try:
        topology = multihost.Topology()
    except multihost.Unavailable as exc:
        if NETNS_RUN:
            pytest.fail(f"inside tools/netns-run the namespaces must be buildable: {exc}")
        pytest.skip(f"cannot build network namespaces here: {exc}")
    with topology:
        topology.router_problem = None
        try:
            topology.start_router(ipv4=[(A4, G_ROUTED4)],
                                  ipv6=[(A6, G_SITE6), (topology["A"].link_local("eth0"), G_LINK6)])
        except multihost.Unavailable as exc:
            topology.router_problem = f"no multicast routing in this kernel: {exc}"
        yield topology


def _need_router(net) -> None:
    if net.router_problem is not None:
        pytest.skip(net.router_problem)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _memberships(host, group: str) -> set[str]:
    """Interfaces on which ``host``'s namespace has joined ``group``."""
    if ":" in group:
        table = multihost.igmp6_groups(host.proc_net("igmp6"))
        want = ipaddress.IPv6Address(group)
        return {iface for iface, g in table if ipaddress.IPv6Address(g) == want}
    return {iface for iface, g in multihost.igmp_groups(host.proc_net("igmp")) if g == group}


async def _scenario(net, tmp_path, port: int, receivers: dict[str, tuple[str, str, str]],
                    senders: list[tuple[str, dict]]) -> tuple[dict[str, dict], list[dict]]:
    """Start ``receivers`` (label -> (host, group, interface)), wait until all
    joined, run ``senders`` ((host, spec) one after the other), then stop the
    receivers; return their results (their last event, plus the interface
    they joined on) and the senders' phase events."""
    results: dict[str, dict] = {}
    phases: list[dict] = []
    async with contextlib.AsyncExitStack() as stack:
        procs = {}
        for label, (host, group, interface) in receivers.items():
            spec = {"group": group, "port": port, "interface": interface, "seconds": 20}
            procs[label] = await stack.enter_async_context(await multihost.start_role(
                net[host], "receive", spec, stderr_dir=str(tmp_path), name=f"receiver {label}"))
        for label, proc in procs.items():
            joined = await proc.event("joined")
            host, group, interface = receivers[label]
            assert joined["interface"] in _memberships(net[host], group), f"{label}: {joined}"
        for number, (host, spec) in enumerate(senders):
            async with await multihost.start_role(net[host], "send", {"port": port, **spec},
                                                  stderr_dir=str(tmp_path), name=f"sender {number}") as tx:
                await tx.event("done")
                await tx.finish()
                phases.extend(e for e in tx.events if e["event"] == "phase")

        async def collect(label, proc):
            results[label] = dict(await proc.finish(), interface=proc.events[0]["interface"])

        async with trio.open_nursery() as nursery:
            for label, proc in procs.items():
                nursery.start_soon(collect, label, proc)
    for phase in phases:
        assert phase["datagrams"] == phase["sent"] and phase["errors"] == 0, phase
    return results, phases


def _check(result: dict, runs: list[list[int]], source: str | None = None) -> None:
    """The receiver got exactly ``runs`` of readout ids, in this order, with
    nothing lost, duplicated or malformed, all from ``source``."""
    assert result["ids"] == runs
    assert result["lost"] == 0 and result["duplicates"] == 0 and result["reordered"] == 0
    assert result["malformed"] == 0 and result["restarts"] == 0
    assert result["readouts"] == sum(b - a + 1 for a, b in runs)
    if source is not None:
        assert {s["source"][0] for s in result["senders"]} == {source}
    else:
        assert result["senders"] == []


def _phase(start_id: int, count: int = 100, **options) -> dict:
    return {"start_id": start_id, "count": count, **options}


# ---------------------------------------------------------------------------
# TTL and loopback (IPv4)
# ---------------------------------------------------------------------------


async def test_ipv4_ttl_0_stays_on_the_host_and_ttl_1_reaches_the_link(net, tmp_path):
    receivers = {
        "A": ("A", G_TTL4, "eth0"),  # on the sending host itself
        "B": ("B", G_TTL4, "eth0"),
        "C": ("C", G_TTL4, "eth0"),
        "D": ("D", G_TTL4, "eth0"),  # on A's other link
    }
    phases = [
        _phase(0, ttl=0, interface="eth0"),
        _phase(1000, ttl=1, interface="eth0"),
        _phase(2000, ttl=1, interface="eth0", loop=False),  # not looped back to A
        _phase(3000, 10, ttl=1, interface="eth1"),  # D's control
    ]
    with trio.fail_after(30):
        got, _ = await _scenario(net, tmp_path, 42101, receivers,
                                 [("A", {"group": G_TTL4, "phases": phases})])
    _check(got["A"], [[0, 99], [1000, 1099]], A4)
    for name in "BC":
        _check(got[name], [[1000, 1099], [2000, 2099]], A4)
    _check(got["D"], [[3000, 3009]], A4_L2)


async def test_ipv4_ttl_2_crosses_the_router_ttl_1_does_not(net, tmp_path):
    _need_router(net)
    receivers = {
        "B": ("B", G_ROUTED4, "eth0"),
        "E": ("E", G_ROUTED4, "eth0"),  # behind the router
    }
    phases = [
        _phase(0, ttl=1, interface="eth0"),
        _phase(1000, ttl=2, interface="eth0"),
        _phase(2000, ttl=1, interface="eth0"),
        _phase(3000, ttl=64, interface="eth0"),
    ]
    with trio.fail_after(30):
        got, _ = await _scenario(net, tmp_path, 42106, receivers,
                                 [("A", {"group": G_ROUTED4, "phases": phases})])
    _check(got["B"], [[0, 99], [1000, 1099], [2000, 2099], [3000, 3099]], A4)
    # The router forwards only TTL > 1 (the copies leave with the TTL less 1).
    _check(got["E"], [[1000, 1099], [3000, 3099]], A4)


# ---------------------------------------------------------------------------
# Interface choice (IPv4)
# ---------------------------------------------------------------------------


async def test_the_chosen_interface_decides_which_link_hears_the_sender(net, tmp_path):
    eth0 = net["A"].ifindex("eth0")
    receivers = {
        "B": ("B", G_IF4, "eth0"),  # L1
        "D": ("D", G_IF4, "eth0"),  # L2
        "A on eth0": ("A", G_IF4, "eth0"),  # same host, joined on one interface each
        "A on eth1": ("A", G_IF4, A4_L2),  # (by address)
    }
    phases = [
        _phase(0, 50, interface="eth1"),
        _phase(100, 50, interface="eth0"),
        _phase(200, 50, interface=A4_L2),  # eth1, by its address
        _phase(300, 50, interface=eth0),  # eth0, by its index
    ]
    with trio.fail_after(30):
        got, _ = await _scenario(net, tmp_path, 42102, receivers,
                                 [("A", {"group": G_IF4, "phases": phases})])
    assert got["A on eth1"]["interface"] == "eth1" and got["A on eth0"]["interface"] == "eth0"
    assert _memberships(net["A"], G_IF4) == set()  # both left
    _check(got["D"], [[0, 49], [200, 249]], A4_L2)
    _check(got["B"], [[100, 149], [300, 349]], A4)
    _check(got["A on eth1"], [[0, 49], [200, 249]], A4_L2)
    _check(got["A on eth0"], [[100, 149], [300, 349]], A4)


# ---------------------------------------------------------------------------
# Late join and leave (IPv4)
# ---------------------------------------------------------------------------


async def test_late_joiner_gets_only_later_readouts_and_a_leaver_leaves_the_group(net, tmp_path):
    port = 42103
    stderr_dir = str(tmp_path)
    stream = {"group": G_LATE4, "phases": [{"interface": "eth0", "count": None, "rate": 2000,
                                            "chunk": 10, "progress_every": 50}]}

    async def receiver(host, name, **options):
        spec = {"group": G_LATE4, "port": port, "interface": "eth0", **options}
        return await stack.enter_async_context(await multihost.start_role(
            net[host], "receive", spec, stderr_dir=stderr_dir, name=name))

    with trio.fail_after(30):
        async with contextlib.AsyncExitStack() as stack:
            leaver = await receiver("B", "leaver", leave_after=300)
            stayer = await receiver("C", "stayer")
            await leaver.event("joined")
            await stayer.event("joined")
            assert _memberships(net["B"], G_LATE4) == {"eth0"}
            sender = await stack.enter_async_context(
                await multihost.start_role(net["A"], "send", {"port": port, **stream}, stderr_dir=stderr_dir))
            before_join = await sender.event("progress")
            while before_join["sent"] < 200:
                before_join = await sender.event("progress")
            late = await receiver("F", "late joiner", progress_every=50)
            await late.event("joined")
            assert _memberships(net["F"], G_LATE4) == {"eth0"}

            left = await leaver.event("left")
            # The leaver's process is still running, but its namespace is no
            # longer a member of the group; the others still are.
            assert leaver.process.returncode is None
            assert _memberships(net["B"], G_LATE4) == set()
            assert _memberships(net["C"], G_LATE4) == _memberships(net["F"], G_LATE4) == {"eth0"}
            # Keep streaming until the late joiner has received part of the
            # stream, by its own report. (The sender's progress events cannot
            # tell: those read here may have been written long before the
            # late joiner, slow to start, joined.)
            late_progress = await late.event("progress")
            while late_progress["count"] < LATE_AT_LEAST:
                late_progress = await late.event("progress")
            # And a while after the leave (by content: old events do as well).
            progress = sender.events[-1]
            while progress["event"] != "progress" or progress["last_id"] < left["ids"][-1][1] + 400:
                progress = await sender.event("progress")
            await sender.finish()
            (phase,) = [e for e in sender.events if e["event"] == "phase"]
            await trio.sleep(0.05)
            late_result = await late.finish()
            stayer_result = await stayer.finish()
            leaver_result = await leaver.finish()

    last = phase["last_id"]
    assert phase["datagrams"] == phase["sent"] == last + 1 and phase["errors"] == 0
    assert last >= left["ids"][-1][1] + 400
    # The leaver got the stream from its start to when it left, nothing after.
    count = left["count"]
    assert count >= 300
    _check(left, [[0, count - 1]], A4)
    assert leaver_result["ids"] == left["ids"]
    # The stayer got everything, before and after the leave.
    _check(stayer_result, [[0, last]], A4)
    # The late joiner: one unbroken run from after its start to the end, and
    # no loss counted for what it could never have received.
    [[first, late_last]] = late_result["ids"]
    assert first > before_join["last_id"] > 0
    assert late_last == last and late_result["count"] >= LATE_AT_LEAST
    _check(late_result, [[first, last]], A4)
    (sender_stats,) = late_result["senders"]
    assert sender_stats["received"] == last - first + 1 and sender_stats["highest"] == last


# ---------------------------------------------------------------------------
# IPv6 hop limits
# ---------------------------------------------------------------------------


async def test_ipv6_hop_limit_over_a_veth_link(net, tmp_path):
    receivers = {
        "A": ("A", G_VETH6, "eth1"),
        "D": ("D", G_VETH6, "eth0"),
        "B": ("B", G_VETH6, "eth0"),  # another link: hears only its own control sender
    }
    a_phases = [
        _phase(0, ttl=0, interface="eth1"),  # hop limit 0: this host only
        _phase(1000, ttl=1, interface="eth1"),  # hop limit 1: the link
    ]
    control = [_phase(7000, 10, ttl=1, interface="eth0")]
    with trio.fail_after(30):
        got, _ = await _scenario(net, tmp_path, 42104, receivers, [
            ("A", {"group": G_VETH6, "phases": a_phases}),
            ("C", {"group": G_VETH6, "phases": control}),  # C is on L1 with B
        ])
    a_l2 = net["A"].link_local("eth1")  # a link-scope group: link-local source
    _check(got["A"], [[0, 99], [1000, 1099]], a_l2)
    _check(got["D"], [[1000, 1099]], a_l2)
    _check(got["B"], [[7000, 7009]], net["C"].link_local("eth0"))


async def test_ipv6_hop_limit_across_the_router_and_link_scope_stays_on_the_link(net, tmp_path):
    _need_router(net)
    receivers = {
        "B site": ("B", G_SITE6, "eth0"),
        "E site": ("E", G_SITE6, "eth0"),
        "B link": ("B", G_LINK6, "eth0"),
        "E link": ("E", G_LINK6, "eth0"),
    }
    phases = [
        _phase(0, ttl=1, interface="eth0", group=G_SITE6),
        _phase(1000, ttl=2, interface="eth0", group=G_SITE6),
        # Link scope: never forwarded, whatever the hop limit and routes say.
        _phase(5000, ttl=5, interface="eth0", group=G_LINK6),
    ]
    control = [_phase(9000, 10, ttl=1, interface="eth1", group=G_LINK6)]  # R's own, on L3
    with trio.fail_after(30):
        got, _ = await _scenario(net, tmp_path, 42105, receivers,
                                 [("A", {"phases": phases}), ("R", {"phases": control})])
    _check(got["B site"], [[0, 99], [1000, 1099]], A6)
    _check(got["E site"], [[1000, 1099]], A6)
    _check(got["B link"], [[5000, 5099]], net["A"].link_local("eth0"))
    _check(got["E link"], [[9000, 9009]], net["R"].link_local("eth1"))
