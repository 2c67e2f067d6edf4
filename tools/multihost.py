#!/usr/bin/env python3
"""Several "hosts" in network namespaces, for testing mcast_trio between
separate processes: a switch, a second link and a multicast router.

Topology (every box is a network namespace; none has a link to the outside,
a default route, or any address outside the ranges below)::

        D  eth0 198.18.2.2                      link L2: veth pair A.eth1 - D.eth0
           |
           | eth1 198.18.2.1
        A  eth0 198.18.1.1  (the DAQ host)
           |
      -----+-----------+-----------+-----------+----  link L1: bridge br0 in R,
           |           |           |           |      multicast snooping off
        B  eth0 .1.2   C  .1.3     F  .1.4     R  br0 198.18.1.254
                                               |  (multicast router: kernel
                                               |   MRT/MRT6, static routes,
                                               |   forwards when TTL > 1)
                                               | eth1 198.18.3.254
        E  eth0 198.18.3.1                     +----  link L3: veth pair R.eth1 - E.eth0

Addresses: IPv4 from 198.18.0.0/15 (RFC 2544, reserved for benchmarking
networks: not one of the private ranges, never routed on the Internet),
IPv6 ULA ``fd6d:6374:0:N::/64`` (RFC 4193) plus the automatic link-local
addresses; DAD is off in every namespace, so addresses are usable at once.
The link numbers N are 1, 2, 3 (L1, L2, L3); host addresses are in
:data:`ADDRESSES`.

How it is built: each host is a ``unshare -n cat`` process holding a fresh
network namespace (it exits, and the namespace with everything in it
vanishes, when its stdin closes, so nothing is left behind even if the
parent is killed); veth pairs are created inside R or A with the peer moved
straight into the other namespace by PID (``ip link add ... netns PID``);
commands run in a host with ``nsenter -t PID -n``. The namespace this runs
in is never changed. This works as root and as the root of a user namespace
(``unshare -rn``, as ``tools/netns-run`` does for other users), where
``ip netns add`` would fail for lack of a writable ``/run/netns``.

Roles: the same file run *inside* a host (``multihost.py ROLE JSON``) is one
of the processes of a test, printing JSON events one per line:

``receive``: join a group with :func:`mcast_trio.open_receiver` (AstroPix
    readouts), record the readout ids in arrival order; stop when stdin
    closes (after 50 ms without datagrams), after ``leave_after`` readouts
    (then report, and wait for stdin to close before exiting: the process
    lives on after leaving the group) or after ``seconds``. Before it
    stops it also takes what the receive task has already decoded and
    queued, so that the ids and the statistics it reports describe the same
    readouts. With ``progress_every`` it reports ``progress`` (the count and
    the last id consumed so far) every that many readouts.
``send``: send readouts from :class:`mcast_trio.sim.DaqSimulator` in
    *phases*, each with its own sender (group, interface, TTL, loop, first
    readout id, count or "until stdin closes", rate). With
    ``progress_every`` it reports ``progress`` every that many readouts,
    once all of them up to ``last_id`` have been handed to the kernel.
``route``: a static multicast router through the kernel's MRT/MRT6 API
    (what smcroute does), for R.

Command line (as root, or inside ``tools/netns-run``; ``make multihost``)::

    python tools/multihost.py demo     # build, run a sender and receivers, report
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from typing import Any

__all__ = [
    "ADDRESSES",
    "HOSTS",
    "Host",
    "RoleProcess",
    "Topology",
    "Unavailable",
    "igmp_groups",
    "igmp6_groups",
    "start_role",
]

SCRIPT = os.path.abspath(__file__)

#: The hosts, in the order they are created.
HOSTS = ("R", "A", "B", "C", "D", "E", "F")

#: host -> interface -> (IPv4 address, IPv6 ULA address).
ADDRESSES: dict[str, dict[str, tuple[str, str]]] = {
    "A": {"eth0": ("198.18.1.1", "fd6d:6374:0:1::1"), "eth1": ("198.18.2.1", "fd6d:6374:0:2::1")},
    "B": {"eth0": ("198.18.1.2", "fd6d:6374:0:1::2")},
    "C": {"eth0": ("198.18.1.3", "fd6d:6374:0:1::3")},
    "D": {"eth0": ("198.18.2.2", "fd6d:6374:0:2::2")},
    "E": {"eth0": ("198.18.3.1", "fd6d:6374:0:3::1")},
    "F": {"eth0": ("198.18.1.4", "fd6d:6374:0:1::4")},
    "R": {"br0": ("198.18.1.254", "fd6d:6374:0:1::fe"), "eth1": ("198.18.3.254", "fd6d:6374:0:3::fe")},
}


class Unavailable(RuntimeError):
    """The namespaces or links cannot be made here (the message says why)."""


# ---------------------------------------------------------------------------
# Building the topology (synchronous; runs in the caller's namespace)
# ---------------------------------------------------------------------------


class Host:
    """One network namespace, held by a ``unshare -n cat`` process.

    Attributes:
        name: ``"A"``, ``"B"``...
        pid: the holder's PID: ``/proc/PID/net/...`` shows this namespace.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        try:
            self._holder = subprocess.Popen(["unshare", "-n", "--", "cat"], stdin=subprocess.PIPE,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as exc:
            raise Unavailable(f"cannot start `unshare -n`: {exc}") from None
        self.pid = self._holder.pid
        mine = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 5.0
        while True:
            try:
                if os.readlink(f"/proc/{self.pid}/ns/net") != mine:
                    break
            except OSError:
                pass
            if self._holder.poll() is not None:
                err = self._holder.stderr.read().decode(errors="replace").strip()
                raise Unavailable(f"`unshare -n` cannot create a network namespace (uid {os.getuid()}):"
                                  f" {err or 'exit status %d' % self._holder.returncode}")
            if time.monotonic() > deadline:
                self.close()
                raise Unavailable("`unshare -n` did not enter a new network namespace within 5 s")
            time.sleep(0.005)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run inside this namespace."""
        return ["nsenter", "-t", str(self.pid), "-n", "--", *argv]

    def sh(self, script: str) -> str:
        """Run a ``sh -e`` script inside; return its stdout.

        Raises:
            Unavailable: the script failed (the message has its stderr).
        """
        result = subprocess.run(self.command(["sh", "-ec", script]), capture_output=True, text=True,
                                timeout=30)
        if result.returncode != 0:
            raise Unavailable(f"host {self.name}: `{script.strip()}` failed:"
                              f" {result.stderr.strip() or 'exit status %d' % result.returncode}")
        return result.stdout

    def proc_net(self, name: str) -> str:
        """The text of ``/proc/net/<name>`` as this namespace sees it."""
        with open(f"/proc/{self.pid}/net/{name}") as f:
            return f.read()

    def ifindex(self, interface: str) -> int:
        """The index of ``interface`` in this namespace."""
        return int(self.sh(f"ip -o link show dev {interface}").split(":", 1)[0])

    def link_local(self, interface: str) -> str:
        """The IPv6 link-local address of ``interface`` in this namespace."""
        for line in self.proc_net("if_inet6").splitlines():
            fields = line.split()
            if fields[5] == interface and fields[0].startswith("fe80"):
                return socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0]))
        raise KeyError(f"host {self.name}: {interface!r} has no link-local address")

    def close(self) -> None:
        """Let the holder exit: the namespace goes with its last process."""
        holder = self._holder
        if holder.poll() is None:
            try:
                holder.stdin.close()
            except OSError:
                pass
            try:
                holder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
        for stream in (holder.stdin, holder.stderr):
            if stream is not None:
                stream.close()

    def __repr__(self) -> str:
        return f"<Host {self.name} pid {self.pid}>"


def _missing_tools() -> list[str]:
    return [tool for tool in ("unshare", "nsenter", "ip", "sh") if shutil.which(tool) is None]


class Topology:
    """The hosts of the module docstring, built at construction.

    Use as a context manager (or call :meth:`close`): leaving it stops every
    process started with :meth:`start_router` and lets the namespaces go.

    Raises:
        Unavailable: namespaces or veth pairs cannot be made here; the
            message says why (missing tool, no permission, ...).
    """

    def __init__(self) -> None:
        if not sys.platform.startswith("linux"):
            raise Unavailable("network namespaces are a Linux feature")
        missing = _missing_tools()
        if missing:
            raise Unavailable(f"missing command(s): {', '.join(missing)} (util-linux, iproute2)")
        self.hosts: dict[str, Host] = {}
        self._router: subprocess.Popen | None = None
        try:
            for name in HOSTS:
                self.hosts[name] = Host(name)
            self._build()
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        h = self.hosts
        common = ("ip link set lo up\n"
                  "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0\n")
        for host in h.values():
            host.sh(common)
        # R: the switch of L1 (bridge, snooping off: a hub for multicast) and
        # the router to L3. The peers land in A, B, C, F and E as eth0.
        h["R"].sh(
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1\n"
            "ip link add br0 type bridge mcast_snooping 0 stp_state 0\n"
            f"ip link add to-a type veth peer name eth0 netns {h['A'].pid}\n"
            f"ip link add to-b type veth peer name eth0 netns {h['B'].pid}\n"
            f"ip link add to-c type veth peer name eth0 netns {h['C'].pid}\n"
            f"ip link add to-f type veth peer name eth0 netns {h['F'].pid}\n"
            f"ip link add eth1 type veth peer name eth0 netns {h['E'].pid}\n"
            "for port in to-a to-b to-c to-f; do ip link set $port master br0; ip link set $port up; done\n"
            + self._addressing("R")
        )
        # A's second link, L2, to D.
        h["A"].sh(f"ip link add eth1 type veth peer name eth0 netns {h['D'].pid}\n")
        for name in ("A", "B", "C", "D", "E", "F"):
            h[name].sh(self._addressing(name))
        self._wait_ready()

    @staticmethod
    def _addressing(name: str) -> str:
        lines = []
        for iface, (v4, v6) in ADDRESSES[name].items():
            lines.append(f"ip addr add {v4}/24 dev {iface}")
            lines.append(f"ip -6 addr add {v6}/64 dev {iface} nodad")
            lines.append(f"ip link set {iface} up")
        return "\n".join(lines) + "\n"

    def _wait_ready(self) -> None:
        """Wait (at most 5 s) until every interface is up with its IPv6
        link-local address and none is tentative."""
        deadline = time.monotonic() + 5.0
        while True:
            pending = []
            for name, host in self.hosts.items():
                text = host.sh("ip -o link show up; ip -o -6 addr show")
                for iface in ADDRESSES[name]:
                    if f"{iface}: " not in text and f"{iface}@" not in text:
                        pending.append(f"{name}.{iface} not up")
                    elif not any(f" {iface} " in line and "fe80::" in line for line in text.splitlines()):
                        pending.append(f"{name}.{iface} has no link-local address yet")
                if "tentative" in text:
                    pending.append(f"{name}: tentative addresses")
            if not pending:
                return
            if time.monotonic() > deadline:
                raise Unavailable("links did not come up within 5 s: " + "; ".join(pending))
            time.sleep(0.05)

    def start_router(self, ipv4: list[tuple[str, str]] = (), ipv6: list[tuple[str, str]] = (),
                     timeout: float = 10.0) -> None:
        """Start R's static multicast router for (source, group) pairs, each
        routed from L1 (``br0``) to L3 (``eth1``) when the TTL / hop limit
        is above 1; returns once the routes are installed.

        Raises:
            Unavailable: the kernel has no multicast routing.
            RuntimeError: the router failed (the message has its stderr).
        """
        if self._router is not None:
            raise RuntimeError("the router is already running")
        spec = {"interfaces": ["br0", "eth1"],
                "ipv4": [[s, g, "br0"] for s, g in ipv4],
                "ipv6": [[s, g, "br0"] for s, g in ipv6]}
        self._router = proc = subprocess.Popen(
            self.hosts["R"].command([sys.executable, SCRIPT, "route", json.dumps(spec)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else b""
        if line.startswith(b'{"event": "unavailable"'):
            proc.communicate()
            self._router = None
            raise Unavailable(json.loads(line)["reason"])
        if not line.startswith(b'{"event": "routing"'):
            proc.kill()
            _, err = proc.communicate()
            self._router = None
            raise RuntimeError(f"the multicast router did not start: {line!r} {err.decode(errors='replace')}")

    def close(self) -> None:
        """Stop the router and release every namespace. Idempotent."""
        if self._router is not None:
            proc, self._router = self._router, None
            try:
                proc.communicate(timeout=5)  # closes its stdin: it exits
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        for host in self.hosts.values():
            host.close()


def igmp_groups(text: str) -> set[tuple[str, str]]:
    """(interface, group) pairs joined, from the text of ``/proc/net/igmp``."""
    out = set()
    device = None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if not fields:
            continue
        if not line.startswith(("\t", " ")):
            device = fields[1]
        elif len(fields[0]) == 8:
            out.add((device, socket.inet_ntoa(struct.pack("=I", int(fields[0], 16)))))
    return out


def igmp6_groups(text: str) -> set[tuple[str, str]]:
    """(interface, group) pairs joined, from the text of ``/proc/net/igmp6``."""
    out = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            out.add((fields[1], socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[2]))))
    return out


# ---------------------------------------------------------------------------
# Processes of a test, seen from the parent (trio)
# ---------------------------------------------------------------------------


class RoleProcess:
    """A role (``send``/``receive``) running in a host, with its JSON events.

    Made by :func:`start_role`. ``events`` holds every event read so far.
    """

    def __init__(self, process, name: str, stderr_path: str) -> None:
        self.process = process
        self.name = name
        self.events: list[dict] = []
        self._buffer = b""
        self._eof = False
        self._stderr_path = stderr_path

    def stderr(self) -> str:
        """What the process wrote on stderr so far."""
        try:
            with open(self._stderr_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    async def _read_event(self) -> dict | None:
        while b"\n" not in self._buffer:
            if self._eof:
                return None
            data = await self.process.stdout.receive_some(65536)
            if not data:
                self._eof = True
                continue
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        event = json.loads(line)
        self.events.append(event)
        return event

    async def event(self, kind: str, timeout: float = 10.0, **match) -> dict:
        """Wait for the next event of type ``kind`` (whose fields equal
        ``match``) and return it; earlier events are kept in ``events``.

        Raises:
            RuntimeError: the process ended first or ``timeout`` passed (the
                message has its stderr).

        Cancellation: safe; events read so far are kept.
        """
        import trio

        with trio.move_on_after(timeout):
            while True:
                event = await self._read_event()
                if event is None:
                    break
                if event["event"] == kind and all(event.get(k) == v for k, v in match.items()):
                    return event
        raise RuntimeError(f"{self.name}: no {kind!r} event {match or ''} within {timeout} s;"
                           f" events: {self.events[-5:]}; stderr: {self.stderr()[-2000:]}")

    async def finish(self, timeout: float = 10.0) -> dict:
        """Close the process's stdin (its signal to stop), read its events to
        the end and wait for it; return its last event.

        Raises:
            RuntimeError: it did not end in time (it is killed) or failed.

        Cancellation: the process is killed.
        """
        import trio

        try:
            await self.process.stdin.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        with trio.move_on_after(timeout):
            while await self._read_event() is not None:
                pass
            await self.process.wait()
        if self.process.returncode is None:
            self.kill()
            raise RuntimeError(f"{self.name}: still running {timeout} s after stdin closed;"
                               f" events: {self.events[-5:]}; stderr: {self.stderr()[-2000:]}")
        if self.process.returncode != 0 or not self.events:
            raise RuntimeError(f"{self.name}: exit status {self.process.returncode};"
                               f" events: {self.events[-5:]}; stderr: {self.stderr()[-2000:]}")
        return self.events[-1]

    def kill(self) -> None:
        if self.process.returncode is None:
            try:
                self.process.kill()
            except ProcessLookupError:
                pass

    async def __aenter__(self) -> RoleProcess:
        return self

    async def __aexit__(self, *exc) -> None:
        import trio

        self.kill()
        with trio.CancelScope(shield=True):
            await self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                if stream is not None:
                    await stream.aclose()


async def start_role(host: Host, role: str, spec: dict, *, stderr_dir: str, name: str | None = None,
                     env: dict | None = None) -> RoleProcess:
    """Start ``multihost.py ROLE SPEC`` inside ``host`` with this Python
    (``sys.executable``) and environment; use as ``async with``.

    Cancellation: safe (the process is killed when the ``async with`` ends).
    """
    import trio

    name = name or f"{role}@{host.name}"
    stderr_path = os.path.join(stderr_dir, f"{name.replace('@', '-')}-{time.monotonic_ns()}.stderr")
    with open(stderr_path, "wb") as err:
        process = await trio.lowlevel.open_process(
            host.command([sys.executable, SCRIPT, role, json.dumps(spec)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
    return RoleProcess(process, name, stderr_path)


# ---------------------------------------------------------------------------
# The roles (run inside a host)
# ---------------------------------------------------------------------------


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def _stdin_closed(stop) -> None:
    """Set ``stop`` when stdin reaches end of file (or any input arrives)."""
    import trio

    async with trio.lowlevel.FdStream(os.dup(0)) as stdin:
        await stdin.receive_some()
    stop.set()


class _Ranges:
    """Readout ids in arrival order, as runs ``[first, last]`` of +1 steps."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []
        self.count = 0

    def add(self, ids) -> None:
        for rid in ids:
            rid = int(rid)
            if self.runs and rid == self.runs[-1][1] + 1:
                self.runs[-1][1] = rid
            else:
                self.runs.append([rid, rid])
            self.count += 1


def _stats(stats) -> dict:
    return {
        "datagrams": stats.datagrams,
        "readouts": stats.readouts,
        "hits": stats.hits,
        "malformed": stats.malformed,
        "lost": stats.lost,
        "duplicates": stats.duplicates,
        "reordered": stats.reordered,
        "restarts": stats.restarts,
        "kernel_drops": stats.kernel_drops,
        "dropped": stats.dropped,
        "senders": [{"source": list(key), "received": s.received, "lost": s.lost,
                     "duplicates": s.duplicates, "reordered": s.reordered, "restarts": s.restarts,
                     "highest": s.highest}
                    for key, s in stats.senders.items()],
    }


async def _receive(spec: dict) -> None:
    import trio

    from mcast_trio import AstroPix4Readout, open_receiver

    leave_after = spec.get("leave_after")
    every = spec.get("progress_every")
    ranges = _Ranges()
    stop = trio.Event()

    def consume(batch) -> None:
        before = ranges.count
        rows = batch.readouts
        ranges.add(rows.readout_id[~rows.malformed].tolist())
        if every and ranges.count // every != before // every:
            _emit("progress", count=ranges.count, last_id=ranges.runs[-1][1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stdin_closed, stop)
        with trio.move_on_after(spec.get("seconds", 20.0)):
            async with open_receiver(spec["group"], spec["port"], AstroPix4Readout,
                                     interface=spec.get("interface"), source=spec.get("source"),
                                     queue_size=4096) as rx:
                _emit("joined", group=str(rx.group), interface=rx.group.interface_name)
                while leave_after is None or ranges.count < leave_after:
                    with trio.move_on_after(0.05):
                        consume(await rx.receive_batch())
                        continue
                    if stop.is_set():
                        break  # asked to stop, and 50 ms without datagrams
                # The receive task decodes (and counts in its statistics)
                # without waiting for this consumer: batches it has queued
                # are received but not yet consumed. Take them, so that the
                # ids and the statistics reported describe the same readouts.
                # A queued batch is returned without a schedule point, so the
                # receive task cannot add more meanwhile; and the snapshot
                # kept is the one the loop test just compared. (One readout
                # per datagram here: readouts - dropped - count is what is
                # still queued.)
                while True:
                    stats = rx.statistics()
                    if ranges.count >= stats.readouts - stats.dropped:
                        break
                    consume(await rx.receive_batch())
        result = {"ids": ranges.runs, "count": ranges.count, **_stats(stats)}
        if leave_after is not None:
            # The group is left and the socket closed; the process lives on.
            _emit("left", **result)
            await stop.wait()
        _emit("done", **result)
        nursery.cancel_scope.cancel()


async def _send(spec: dict) -> None:
    import trio

    from mcast_trio import open_sender
    from mcast_trio.sim import DaqSimulator

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stdin_closed, stop)
        for number, phase in enumerate(spec["phases"]):
            count = phase.get("count")  # None: until stdin closes
            rate = phase.get("rate")  # datagrams per second, None: at once
            chunk = phase.get("chunk", 10 if rate else 1000)
            every = phase.get("progress_every")
            sim = DaqSimulator(seed=number, start_id=phase.get("start_id", 0), start_ns=0, mean_hits=1.0)
            sent = 0
            async with open_sender(phase.get("group", spec.get("group")), spec["port"],
                                   interface=phase.get("interface"), ttl=phase.get("ttl", 1),
                                   loop=phase.get("loop", True)) as tx:
                start = trio.current_time()
                while (sent < count) if count is not None else not stop.is_set():
                    n = chunk if count is None else min(chunk, count - sent)
                    await tx.send_many(sim.generate(n).datagrams())
                    if every and (sent + n) // every != sent // every:
                        # Reported once every readout up to last_id is in
                        # the kernel's hands, not merely queued.
                        await tx.flush()
                        _emit("progress", phase=number, sent=sent + n, last_id=sim.next_readout_id - 1)
                    sent += n
                    if rate:
                        await trio.sleep_until(start + sent / rate)
            stats = tx.statistics()
            _emit("phase", phase=number, sent=sent, first_id=phase.get("start_id", 0),
                  last_id=sim.next_readout_id - 1, datagrams=stats.datagrams, errors=stats.errors,
                  last_error=stats.last_error)
            await trio.sleep(phase.get("pause", 0.02))
        _emit("done")
        nursery.cancel_scope.cancel()


# Kernel multicast routing API (linux/mroute.h, linux/mroute6.h).
_MRT_INIT, _MRT_ADD_VIF, _MRT_ADD_MFC = 200, 202, 204
_VIFF_USE_IFINDEX = 0x8
_MAXVIFS = 32


def _route(spec: dict) -> None:
    """A static multicast router: (source, group) from one interface to all
    the others, while the TTL / hop limit is above 1 (threshold 1)."""
    interfaces = spec["interfaces"]
    indexes = [socket.if_nametoindex(name) for name in interfaces]
    sockets = []
    if spec.get("ipv4"):
        s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IGMP)
        try:
            s4.setsockopt(socket.IPPROTO_IP, _MRT_INIT, 1)
        except OSError as exc:
            _emit("unavailable", reason=f"IPv4 multicast routing (MRT_INIT): {exc}; kernel without"
                                        " CONFIG_IP_MROUTE?")
            return
        for vif, index in enumerate(indexes):
            # struct vifctl: vifi, flags, threshold, rate_limit, lcl_ifindex, rmt_addr
            s4.setsockopt(socket.IPPROTO_IP, _MRT_ADD_VIF,
                          struct.pack("=HBBIiI", vif, _VIFF_USE_IFINDEX, 1, 0, index, 0))
        for source, group, arrives in spec["ipv4"]:
            parent = interfaces.index(arrives)
            ttls = bytes(0 if vif == parent or vif >= len(interfaces) else 1 for vif in range(_MAXVIFS))
            # struct mfcctl: origin, group, parent, ttls[32], pkt/byte/wrong_if counts, expire
            s4.setsockopt(socket.IPPROTO_IP, _MRT_ADD_MFC,
                          struct.pack("=4s4sH32s2xIIIi", socket.inet_aton(source), socket.inet_aton(group),
                                      parent, ttls, 0, 0, 0, 0))
        sockets.append(s4)
    if spec.get("ipv6"):
        s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        try:
            s6.setsockopt(socket.IPPROTO_IPV6, _MRT_INIT, 1)  # MRT6_INIT
        except OSError as exc:
            _emit("unavailable", reason=f"IPv6 multicast routing (MRT6_INIT): {exc}; kernel without"
                                        " CONFIG_IPV6_MROUTE?")
            return
        for mif, index in enumerate(indexes):
            # struct mif6ctl: mifi, flags, threshold, pifi, rate_limit
            s6.setsockopt(socket.IPPROTO_IPV6, _MRT_ADD_VIF, struct.pack("=HBBH2xI", mif, 0, 1, index, 0))

        def sockaddr_in6(address: str) -> bytes:
            return struct.pack("=H2xI16sI", socket.AF_INET6, 0, socket.inet_pton(socket.AF_INET6, address), 0)

        for source, group, arrives in spec["ipv6"]:
            parent = interfaces.index(arrives)
            bits = sum(1 << mif for mif in range(len(interfaces)) if mif != parent)
            # struct mf6cctl: origin, group, parent, if_set (256 bits)
            s6.setsockopt(socket.IPPROTO_IPV6, _MRT_ADD_MFC,
                          sockaddr_in6(source) + sockaddr_in6(group) + struct.pack("=H2x", parent)
                          + struct.pack("=8I", bits, *[0] * 7))
        sockets.append(s6)
    _emit("routing", interfaces=interfaces)
    # Route until stdin closes (the sockets' MRT_DONE on close removes it all).
    while sys.stdin.buffer.read(4096):
        pass
    for sock in sockets:
        sock.close()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

_DEMO_GROUP4 = "239.255.18.1"
_DEMO_GROUP6 = "ff15::18:1"


async def _demo() -> int:
    import tempfile

    import trio

    port = 41800
    with Topology() as net, tempfile.TemporaryDirectory() as tmp:
        a4, a6 = ADDRESSES["A"]["eth0"]
        net.start_router(ipv4=[(a4, _DEMO_GROUP4)], ipv6=[(a6, _DEMO_GROUP6)])
        print("hosts:", ", ".join(f"{n} (pid {h.pid})" for n, h in net.hosts.items()))
        for group in (_DEMO_GROUP4, _DEMO_GROUP6):
            receivers = []
            for name in ("A", "B", "C", "D", "E"):
                receivers.append(await start_role(net[name], "receive",
                                                  {"group": group, "port": port, "interface": "eth0"},
                                                  stderr_dir=tmp))
            for rx in receivers:
                await rx.event("joined")
            phases = [{"interface": "eth0", "ttl": ttl, "count": 100, "start_id": 1000 * ttl}
                      for ttl in (0, 1, 2)]
            sender = await start_role(net["A"], "send", {"group": group, "port": port, "phases": phases},
                                      stderr_dir=tmp)
            await sender.event("done")
            await sender.finish()
            await trio.sleep(0.1)
            print(f"\n{group} port {port}: A sends 100 readouts with TTL/hop limit 0 (ids 0..99),"
                  " 1 (1000..1099), 2 (2000..2099) on eth0")
            for name, rx in zip("ABCDE", receivers):
                result = await rx.finish()
                runs = ", ".join(f"{a}..{b}" for a, b in result["ids"]) or "nothing"
                print(f"  receiver in {name}: {result['count']:4d} readouts: {runs}; lost {result['lost']}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] in ("receive", "send"):
        import trio

        trio.run(_receive if argv[1] == "receive" else _send, json.loads(argv[2]))
        return 0
    if len(argv) == 3 and argv[1] == "route":
        _route(json.loads(argv[2]))
        return 0
    if len(argv) == 2 and argv[1] == "demo":
        import trio

        try:
            return trio.run(_demo)
        except Unavailable as exc:
            print(f"multihost: {exc}", file=sys.stderr)
            return 2
    print(__doc__.split("\n\n")[0] + "\n\nusage: multihost.py demo | receive JSON | send JSON | route JSON",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
