"""mcast_trio.astropix: the blocking drop-in for astropix-analysis'
MulticastSender / MulticastReceiver (issue 7).

Real sockets and real AstroPix data, inside the private network namespace
(tools/netns-run). No trio anywhere: the module is blocking.
"""

from __future__ import annotations

import errno
import inspect
import itertools
import os
import pathlib
import re
import socket
import struct
import subprocess
import sys

import numpy as np
import pytest

from mcast_trio import open_apx
from mcast_trio.astropix import (
    DEFAULT_PORT,
    LOCAL_HOST,
    AstroPix4Readout,
    MulticastReceiver,
    MulticastSender,
    ReceiverStatistics,
)
from mcast_trio.sim import DaqSimulator
from mcast_trio.testing import isolation_problem, joined_ipv4_groups

_PROBLEM = isolation_problem()
netns = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")

_ports = itertools.count(44000 + os.getpid() % 1000 * 3)
_groups = itertools.count(1)


def _port() -> int:
    return next(_ports)


def _group() -> str:
    return f"239.255.44.{next(_groups) % 250 + 1}"


# -- the names, signatures and defaults of astropix-analysis -------------------


def test_signatures_and_defaults_match_astropix_analysis():
    sender = inspect.signature(MulticastSender)
    assert list(sender.parameters)[:3] == ["group", "port", "ttl"]
    assert [sender.parameters[n].default for n in ("group", "port", "ttl")] == ["127.0.0.1", 5007, 2]
    receiver = inspect.signature(MulticastReceiver)
    assert list(receiver.parameters)[:3] == ["readout_class", "group", "port"]
    assert receiver.parameters["readout_class"].default is inspect.Parameter.empty
    assert [receiver.parameters[n].default for n in ("group", "port")] == ["127.0.0.1", 5007]
    assert inspect.signature(MulticastReceiver.receive).parameters["max_size"].default == 65535
    assert MulticastReceiver.DEFAULT_MAX_PACKET_SIZE == 65535
    assert (LOCAL_HOST, DEFAULT_PORT) == ("127.0.0.1", 5007)
    # everything added is keyword-only, so positional calls port unchanged
    for sig, original in ((sender, 3), (receiver, 3)):
        extra = list(sig.parameters.values())[original:]
        assert extra and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)
    for name in ("send_data", "send_readout", "set_option", "close"):
        assert callable(getattr(MulticastSender, name))


@pytest.mark.parametrize(
    ("factory", "exc", "fragments"),
    [
        (lambda: MulticastSender(port=70000), ValueError, ["port=70000", "1..65535"]),
        (lambda: MulticastSender(ttl=300), ValueError, ["ttl=300", "0..255"]),
        (lambda: MulticastSender(group="224.0.0.1"), ValueError,
         ["group='224.0.0.1'", "allow_control_groups=True"]),
        (lambda: MulticastSender(timeout=0), ValueError, ["timeout=0"]),
        (lambda: MulticastReceiver(dict), TypeError, ["readout_class=", "from_bytes"]),
        (lambda: MulticastReceiver(AstroPix4Readout, group="no-such"), ValueError, ["group='no-such'"]),
        (lambda: MulticastReceiver(AstroPix4Readout, timeout="1"), TypeError, ["timeout='1'"]),
        (lambda: MulticastReceiver(AstroPix4Readout, port=0), ValueError, ["port=0"]),
        (lambda: MulticastSender(timeout=1e12), ValueError, ["timeout=1000000000000.0", "seconds in (0,"]),
        (lambda: MulticastReceiver(AstroPix4Readout, timeout=1e12), ValueError, ["timeout=1000000000000.0"]),
        (lambda: MulticastSender(group="224.0.0.1", allow_control_groups="yes"), TypeError,
         ["allow_control_groups='yes'"]),
        (lambda: MulticastReceiver(AstroPix4Readout, group="224.0.0.1", allow_control_groups=1), TypeError,
         ["allow_control_groups=1"]),
    ],
)
def test_bad_arguments_raise_before_anything_opens(factory, exc, fragments):
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(exc) as info:
        factory()
    for fragment in fragments:
        assert fragment in str(info.value)
    assert len(os.listdir("/proc/self/fd")) == before


# -- sending and receiving ------------------------------------------------------


@netns
def test_real_data_round_trip_to_two_monitors(astropix_data):
    """Every readout of the real chip data reaches two monitors on one group,
    with the hits of the compiled decoder, and nothing counted lost."""
    with open_apx(astropix_data / "20250723_092534_data.apx") as reader:
        readouts = list(reader)
    assert len(readouts) > 100
    group, port = _group(), _port()
    with MulticastReceiver(AstroPix4Readout, group, port, timeout=5) as one, \
            MulticastReceiver(AstroPix4Readout, group, port, timeout=5) as two, \
            MulticastSender(group, port) as sender:
        assert group in joined_ipv4_groups()
        sizes = []
        for k, readout in enumerate(readouts):
            sizes.append(sender.send_readout(readout))
            if k % 64 == 63:  # stay within the receive buffers
                got_one = [one.receive() for _ in range(64)]
                got_two = [two.receive() for _ in range(64)]
                assert got_one == got_two == readouts[k - 63:k + 1]
        rest = len(readouts) % 64
        got_one = [one.receive() for _ in range(rest)]
        assert got_one == readouts[len(readouts) - rest:]
        assert [two.receive() for _ in range(rest)] == got_one
        stats = one.statistics()
    assert sizes == [len(r.to_bytes()) for r in readouts]
    assert isinstance(stats, ReceiverStatistics)
    assert stats.readouts == len(readouts) and stats.datagrams == len(readouts)
    assert stats.lost == 0 and stats.malformed == 0 and stats.duplicates == 0
    assert stats.bytes == sum(sizes)
    assert len(stats.senders) == 1
    # the hits are the compiled decoder's, equal to decoding the originals
    for a, b in zip(got_one, readouts[len(readouts) - rest:]):
        assert np.array_equal(a.decode(), b.decode())


@netns
def test_unmodified_astropix_daq_at_its_defaults_is_received():
    """A plain socket doing what astropix-analysis' sender does at its defaults
    (sendto 127.0.0.1:5007, unicast) reaches MulticastReceiver(readout_class)."""
    readouts = DaqSimulator(seed=11).readouts(100)
    with MulticastReceiver(AstroPix4Readout, timeout=5) as receiver:
        assert receiver.spec.unicast
        daq = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        daq.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        try:
            for readout in readouts:
                daq.sendto(readout.to_bytes(), ("127.0.0.1", 5007))
        finally:
            daq.close()
        got = [receiver.receive() for _ in readouts]
        stats = receiver.statistics()
    assert got == readouts
    assert stats.lost == 0 and stats.readouts == 100


@netns
def test_losses_and_malformed_datagrams_are_counted_and_skipped():
    group, port = _group(), _port()
    with MulticastReceiver(AstroPix4Readout, group, port, timeout=5) as receiver, \
            MulticastSender(group, port) as sender:
        sender.send_readout(AstroPix4Readout(b"\xbc", 0))
        assert sender.send_data(b"not a readout") == 13
        good = AstroPix4Readout(b"\xbc\xbc", 1).to_bytes()
        sender.send_data(good[:15] + struct.pack("<I", 99) + good[19:])  # length lies
        sender.send_readout(AstroPix4Readout(b"\xbc", 1))
        sender.send_readout(AstroPix4Readout(b"\xbc", 5))  # ids 2..4 lost
        ids = [receiver.receive().readout_id for _ in range(3)]
        stats = receiver.statistics()
    assert ids == [0, 1, 5]
    assert stats.datagrams == 5 and stats.readouts == 3 and stats.malformed == 2
    assert stats.lost == 3
    assert "length field" in stats.last_error


@netns
def test_truncated_datagrams_are_counted_and_skipped():
    group, port = _group(), _port()
    with MulticastReceiver(AstroPix4Readout, group, port, timeout=5) as receiver, \
            MulticastSender(group, port) as sender:
        sender.send_readout(AstroPix4Readout(b"\xbc" * 500, 0))
        sender.send_readout(AstroPix4Readout(b"\xbc", 1))
        assert receiver.receive(max_size=100).readout_id == 1
        stats = receiver.statistics()
    assert stats.truncated == 1 and stats.malformed == 0
    assert "max_size=100" in stats.last_error


@netns
def test_a_foreign_readout_class_that_raises_other_errors_is_counted():
    class StrictReadout:  # like a class whose parser uses struct directly
        def __init__(self, readout_id):
            self.readout_id = readout_id

        @classmethod
        def from_bytes(cls, data):
            return cls(struct.unpack("<I", data)[0])

    group, port = _group(), _port()
    with MulticastReceiver(StrictReadout, group, port, timeout=5) as receiver, \
            MulticastSender(group, port) as sender:
        sender.send_data(b"xx")
        sender.send_data(struct.pack("<I", 42))
        assert receiver.receive().readout_id == 42
        assert receiver.statistics().malformed == 1


@netns
def test_receive_times_out():
    with MulticastReceiver(AstroPix4Readout, _group(), _port(), timeout=0.2) as receiver:
        with pytest.raises(TimeoutError, match="timeout=0.2"):
            receiver.receive()


@netns
def test_send_readout_of_bytes_says_what_to_pass():
    group, port = _group(), _port()
    with MulticastSender(group, port) as sender:
        with pytest.raises(TypeError, match="send_data"):
            sender.send_readout(AstroPix4Readout(b"\xbc", 0).to_bytes())


@netns
def test_set_option_sets_the_socket_option():
    with MulticastSender(_group(), _port()) as sender:
        sender.set_option(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 7)
        view = socket.socket(fileno=os.dup(sender.fileno()))
        try:
            assert view.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL) == 7
        finally:
            view.close()
        with pytest.raises(OSError, match="setsockopt"):
            sender.set_option(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1000)


@netns
def test_close_and_context_managers_release_the_socket_and_group():
    group, port = _group(), _port()
    before = len(os.listdir("/proc/self/fd"))
    with MulticastReceiver(AstroPix4Readout, group, port) as receiver, \
            MulticastSender(group, port) as sender:
        assert group in joined_ipv4_groups()
    assert receiver.fileno() == -1 and sender.fileno() == -1
    assert group not in joined_ipv4_groups()
    assert len(os.listdir("/proc/self/fd")) == before
    receiver.close()  # idempotent
    sender.close()


@netns
def test_unicast_default_port_has_one_receiver():
    port = _port()
    with MulticastReceiver(AstroPix4Readout, "127.0.0.1", port):
        with pytest.raises(OSError) as info:
            MulticastReceiver(AstroPix4Readout, "127.0.0.1", port)
    assert type(info.value) is OSError and info.value.errno == errno.EADDRINUSE
    assert f"port {port}" in str(info.value) and "127.0.0.1" in str(info.value)


@netns
def test_astropix_analysis_receiver_holding_the_port_gives_a_clear_oserror():
    port, group = _port(), _group()
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    holder.bind(("", port))  # what astropix-analysis' receiver does: no SO_REUSEADDR
    try:
        with pytest.raises(OSError) as info:
            MulticastReceiver(AstroPix4Readout, group, port)
    finally:
        holder.close()
    assert type(info.value) is OSError and info.value.errno == errno.EADDRINUSE
    message = str(info.value)
    for fragment in (group, f"port {port}", "astropix-analysis receiver", "SO_REUSEADDR"):
        assert fragment in message, message


@netns
def test_unicast_sender_survives_nobody_listening():
    """Sending to 127.0.0.1 with nobody listening must not fail (the kernel
    answers with ICMP port unreachable); a receiver that starts later gets
    the next readouts."""
    port = _port()
    with MulticastSender("127.0.0.1", port) as sender:
        for i in range(20):
            assert sender.send_readout(AstroPix4Readout(b"\xbc", i)) == 20
        with MulticastReceiver(AstroPix4Readout, "127.0.0.1", port, timeout=5) as receiver:
            for i in range(20, 30):
                sender.send_readout(AstroPix4Readout(b"\xbc", i))
            assert [receiver.receive().readout_id for _ in range(10)] == list(range(20, 30))


# -- docs/porting.rst: the "after" code runs as written -------------------------

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "porting.rst"


def _named_block(text: str, name: str) -> str:
    match = re.search(r"\.\. code-block:: python\n   :name: " + re.escape(name)
                      + r"\n\n((?:(?:   .*)?\n)+)", text)
    assert match, f"no code block named {name} in docs/porting.rst"
    return "\n".join(line[3:] for line in match.group(1).splitlines()) + "\n"


@netns
def test_porting_page_after_code_runs_as_written(tmp_path):
    text = DOC.read_text()
    daq = _named_block(text, "porting-after-daq")
    monitor = _named_block(text, "porting-after-monitor")
    assert "from mcast_trio.astropix import" in daq and "from mcast_trio.astropix import" in monitor
    (tmp_path / "daq.py").write_text(daq)
    (tmp_path / "monitor.py").write_text(monitor)
    env = dict(os.environ)
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    if "PYTHONPATH" in env:  # a source checkout: keep it importable
        env["PYTHONPATH"] = os.pathsep.join([root, env["PYTHONPATH"]])
    mon = subprocess.Popen([sys.executable, "monitor.py"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert mon.stdout.readline() == "listening\n", mon.stderr.read()
        ran = subprocess.run([sys.executable, "daq.py"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr
        out, err = mon.communicate(timeout=60)
    finally:
        if mon.poll() is None:
            mon.kill()
            mon.wait()
    assert mon.returncode == 0, err
    lines = out.splitlines()
    readout_lines = [line for line in lines if line.startswith("AstroPix4Readout(")]
    assert len(readout_lines) == 100
    expected = DaqSimulator(seed=1).readouts(100)
    n_hits = sum(len(r.decode()) for r in expected)
    assert n_hits > 0
    assert len(lines) == 100 + n_hits + 1  # readouts, hits, statistics
    assert lines[-1].startswith("ReceiverStatistics(") and "readouts=100," in lines[-1]
    assert " lost=0," in lines[-1] and " malformed=0," in lines[-1]


@netns
def test_control_groups_when_asked_for():
    # The error message says allow_control_groups=True overrides the refusal:
    # both classes take it.
    port = _port()
    with MulticastReceiver(AstroPix4Readout, "224.0.0.251", port, timeout=5,
                           allow_control_groups=True) as receiver, \
            MulticastSender("224.0.0.251", port, allow_control_groups=True) as sender:
        readout = AstroPix4Readout(b"\xe1\x02\x03\x04\x05\x06\x07\x08", 3, 1000)
        assert sender.send_readout(readout) == len(readout.to_bytes())
        assert receiver.receive() == readout


@netns
@pytest.mark.parametrize("timeout", [None, 5.0], ids=["blocking: compiled send", "timeout: socket.send"])
def test_send_readout_sends_exactly_to_bytes(timeout):
    # Both paths (the compiled sendmsg of header + data, and to_bytes() with
    # socket.send) put the same bytes on the wire as to_bytes(), for empty,
    # odd and large readouts.
    readouts = [AstroPix4Readout(b"", 0, 0),
                AstroPix4Readout(b"\xe1\x02\x03", 2**32 - 1, 2**64 - 1),
                AstroPix4Readout(bytes(range(250)) * 200, 123456, 1_700_000_000_123_456_789)]
    readouts += DaqSimulator(seed=5).readouts(20)
    port = _port()
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plain.bind(("127.0.0.1", port))
    plain.settimeout(5)
    try:
        with MulticastSender("127.0.0.1", port, timeout=timeout) as sender:
            for readout in readouts:
                assert sender.send_readout(readout) == len(readout.to_bytes())
        got = [plain.recv(65535) for _ in readouts]
    finally:
        plain.close()
    assert got == [r.to_bytes() for r in readouts]


@netns
def test_a_closed_sender_never_writes_to_a_reused_descriptor():
    # After close() the descriptor number may be reused by another socket of
    # the program: a send must fail, not go out through that socket.
    port, other = _port(), _port()
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", other))
    listener.setblocking(False)
    sender = MulticastSender("127.0.0.1", port)
    fd = sender.fileno()
    sender.close()
    victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the lowest free number: fd
    try:
        victim.connect(("127.0.0.1", other))
        assert victim.fileno() == fd
        with pytest.raises(OSError):
            sender.send_readout(AstroPix4Readout(b"\xe1\x02", 1, 1))
        with pytest.raises(BlockingIOError):
            listener.recv(100)  # nothing went out through the reused number
    finally:
        victim.close()
        listener.close()
