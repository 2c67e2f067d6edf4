"""``mcast-trio record``, run as a user runs it: the recorder is a subprocess
(inside the test run's private network namespace), the DAQ is this test
process sending simulator readouts with the library; then the files are
read back (``ApxReader``, ``mcast-trio decode``) and compared with what was
sent and with the simulator's ground truth."""

from __future__ import annotations

import csv
import itertools
import json
import os
import pathlib
import signal
import struct
import subprocess
import warnings

import numpy as np
import pytest
import trio

from mcast_trio import HIT_DTYPE, ApxReader, open_sender
from mcast_trio.sim import DaqSimulator

_counter = itertools.count(1)


def _endpoint() -> tuple[str, int]:
    """A multicast group and port of this test alone."""
    n = next(_counter)
    pid = os.getpid()
    return f"239.255.{110 + pid % 100}.{n}", 20000 + (pid * 37 + n * 101) % 40000


async def _start(cli, *args):
    return await trio.lowlevel.open_process([*cli, "record", *args], stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE)


async def _poll(predicate, timeout=15.0, what="condition"):
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if value:
                return value
            await trio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _records(path) -> list[bytes]:
    """The complete records of a (possibly growing) .apx file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with ApxReader(path) as reader:
                return list(reader.records())
    except (OSError, ValueError):
        return []


def _ready(path: pathlib.Path) -> bool:
    """The recorder writes the header once it has joined the group."""
    try:
        with ApxReader(path):
            return True
    except (OSError, ValueError):
        return False


async def _finish(process, timeout=20.0):
    """Wait for the recorder to exit; return (returncode, stdout, stderr)."""
    out, err = bytearray(), bytearray()

    async def drain(stream, into):
        async for chunk in stream:
            into.extend(chunk)

    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, process.stdout, out)
            nursery.start_soon(drain, process.stderr, err)
            await process.wait()
    return process.returncode, out.decode(), err.decode()


def _strict_records(path) -> list[bytes]:
    with ApxReader(path, strict=True) as reader:
        records = list(reader.records())
        stats = reader.statistics()
        assert stats.finished and not stats.damaged and stats.truncated is None
    return records


async def _send(group, port, datagrams, per_tick=50, pause=0.002):
    async with open_sender(group, port, framing="raw") as sender:
        for start in range(0, len(datagrams), per_tick):
            await sender.send_many(datagrams[start:start + per_tick])
            await trio.sleep(pause)


async def test_record_then_decode_equals_the_simulator_truth(mcast_trio_cli, tmp_path):
    group, port = _endpoint()
    out = tmp_path / "run.apx"
    sim = DaqSimulator(seed=11, mean_hits=3.0, split_fraction=0.2)
    batch = sim.generate(600)
    assert batch.n_split > 10  # split hits are carried across readouts
    process = await _start(mcast_trio_cli, str(out), "-g", f"{group}:{port}", "--count", "600", "--json")
    await _poll(lambda: _ready(out), what="the recorder to start")
    await _send(group, port, batch.datagrams())
    code, stdout, stderr = await _finish(process)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["readouts_written"] == 600 and summary["files"] == [str(out)]
    assert _strict_records(out) == batch.datagrams()
    with ApxReader(out) as reader:
        recorder = reader.header["recorder"]
    assert (recorder["group"], recorder["port"]) == (group, port)
    assert "record" in recorder["command"] and recorder["mcast_trio_version"]
    # decode, as a user would, and compare with the ground truth
    result = await trio.run_process([*mcast_trio_cli, "decode", str(out), "--to", "csv"], capture_stdout=True,
                                    capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr
    lines = [line for line in (tmp_path / "run.csv").read_text().splitlines() if not line.startswith("#")]
    table = list(csv.DictReader(lines))
    assert len(table) == len(batch.truth) > 600
    for name in HIT_DTYPE.names:
        got = [float(row[name]) if name == "tot_us" else int(row[name]) for row in table]
        assert got == batch.truth[name].tolist(), name


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_mid_stream_loses_no_received_readout(mcast_trio_cli, tmp_path, signum):
    group, port = _endpoint()
    out = tmp_path / "term.apx"
    sim = DaqSimulator(seed=12, mean_hits=2.0)
    sent: list[bytes] = []
    process = await _start(mcast_trio_cli, str(out), "-g", f"{group}:{port}", "--json", "--status", "0.02", "--fsync")
    await _poll(lambda: _ready(out), what="the recorder to start")
    stderr = bytearray()

    async def daq(task_status=trio.TASK_STATUS_IGNORED):
        async with open_sender(group, port, framing="raw") as sender:
            task_status.started()
            while True:  # bursts, so that the recorder has work queued when the signal comes
                datagrams = sim.generate(500).datagrams()
                await sender.send_many(datagrams)
                sent.extend(datagrams)
                await trio.sleep(0.001)

    async def read_stderr():
        async for chunk in process.stderr:
            stderr.extend(chunk)

    stdout = bytearray()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_stderr)
            await nursery.start(daq)
            # A status line that counts written readouts (the first one can come
            # before any readout is written, and a burst of 2000 can fit in
            # less than one status period).
            await _poll(lambda: len(_records(out)) >= 2000 and any(
                line.split()[0] != b"0" for line in stderr.splitlines() if b"readouts written" in line),
                        what="2000 readouts in the file and a status line counting some")
            process.send_signal(signum)  # while the DAQ keeps sending
            async for chunk in process.stdout:
                stdout.extend(chunk)
            await process.wait()
            nursery.cancel_scope.cancel()
    assert process.returncode == 0, stderr.decode()
    summary = json.loads(stdout)
    records = _strict_records(out)  # complete: no truncated record, no damage
    # every readout the receiver had taken in is in the file
    assert summary["dropped"] == 0
    assert len(records) == summary["readouts_written"] == summary["readouts"] >= 2000
    # and they are exactly what was sent, in order, none missing in between
    first = sent.index(records[0])
    assert records == sent[first:first + len(records)]
    assert len(sent) > first + len(records)  # the DAQ was still sending
    status = [line for line in stderr.decode().splitlines() if "readouts written" in line]
    assert 0 < int(status[-1].split()[0]) <= len(records)  # --status lines on stderr


async def test_rotation_by_size_never_overwrites(mcast_trio_cli, tmp_path):
    group, port = _endpoint()
    out = tmp_path / "rot.apx"
    taken = tmp_path / "rot-0002.apx"
    taken.write_bytes(b"not mine")
    batch = DaqSimulator(seed=13, mean_hits=2.0).generate(500)
    process = await _start(mcast_trio_cli, str(out), "-g", f"{group}:{port}", "--count", "500",
                           "--rotate-size", "4kB", "--json")
    first = tmp_path / "rot-0001.apx"
    await _poll(lambda: _ready(first), what="the recorder to start")
    await _send(group, port, batch.datagrams())
    code, stdout, stderr = await _finish(process)
    assert code == 0, stderr
    summary = json.loads(stdout)
    files = [pathlib.Path(name) for name in summary["files"]]
    # many rotations within a second: every one a new file
    assert len(files) >= 5 and len(set(files)) == len(files)
    assert taken not in files and taken.read_bytes() == b"not mine"
    assert sorted(tmp_path.glob("rot-*.apx")) == sorted(files + [taken])
    records = []
    for path in files:
        assert path.stat().st_size <= 4000
        part = _strict_records(path)
        assert part
        records += part
    assert records == batch.datagrams()  # all present, exactly once, in order


async def test_rotation_by_time(mcast_trio_cli, tmp_path):
    group, port = _endpoint()
    out = tmp_path / "t.apx"
    batch = DaqSimulator(seed=14).generate(400)
    process = await _start(mcast_trio_cli, str(out), "-g", f"{group}:{port}", "--count", "400",
                           "--rotate-time", "0.1", "--json")
    await _poll(lambda: _ready(tmp_path / "t-0001.apx"), what="the recorder to start")
    await _send(group, port, batch.datagrams(), per_tick=20, pause=0.005)  # about 0.1 s
    code, stdout, stderr = await _finish(process)
    assert code == 0, stderr
    files = json.loads(stdout)["files"]
    assert len(files) >= 2
    assert [r for path in files for r in _strict_records(path)] == batch.datagrams()


async def test_messages_mode_keeps_garbage_in_the_capture_file(mcast_trio_cli, tmp_path):
    group, port = _endpoint()
    out = tmp_path / "m.apx"
    readouts = DaqSimulator(seed=15).generate(30).datagrams()
    garbage = [b"\x00garbage %d" % i for i in range(5)]
    process = await _start(mcast_trio_cli, str(out), "-g", f"{group}:{port}", "--messages", "--framing", "raw",
                           "--count", "30", "--json")
    await _poll(lambda: _ready(out), what="the recorder to start")
    await _send(group, port, garbage + readouts)
    code, stdout, stderr = await _finish(process)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["captured"] == 5 and summary["capture_files"] == [str(tmp_path / "m.capture")]
    assert _strict_records(out) == readouts
    data = (tmp_path / "m.capture").read_bytes()
    assert data[:8] == b"MCTCAP01"
    header = struct.Struct("<QIH16s")
    pos, got = 8, []
    while pos < len(data):
        ns, length, src_port, address = header.unpack_from(data, pos)
        pos += header.size
        got.append(data[pos:pos + length])
        pos += length
        assert address == bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1]) and src_port > 0
        assert ns > 1_600_000_000 * 10**9
    assert got == garbage


async def test_readout_mode_keeps_malformed_datagrams_in_the_capture_file(mcast_trio_cli, tmp_path):
    # The default mode records everything received too: the receiver hands
    # each malformed datagram to the recorder (on_malformed) as it counts it.
    group, port = _endpoint()
    out = tmp_path / "g.apx"
    readouts = DaqSimulator(seed=16).generate(20).datagrams()
    garbage = [b"\x00garbage %d" % i for i in range(4)]
    stream = readouts[:5] + garbage[:2] + readouts[5:] + garbage[2:]
    process = await _start(mcast_trio_cli, str(out), "-g", f"{group}:{port}", "--seconds", "3", "--json")
    await _poll(lambda: _ready(out), what="the recorder to start")
    await _send(group, port, stream)
    code, stdout, stderr = await _finish(process)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["readouts_written"] == 20 and summary["malformed"] == 4 and summary["captured"] == 4
    assert _strict_records(out) == readouts
    data = (tmp_path / "g.capture").read_bytes()
    header = struct.Struct("<QIH16s")
    pos, got = 8, []
    while pos < len(data):
        _ns, length, _port, _address = header.unpack_from(data, pos)
        pos += header.size
        got.append(data[pos:pos + length])
        pos += length
    assert got == garbage


def _run(cli, *args):
    return subprocess.run([*cli, "record", *args], capture_output=True, text=True, timeout=30)


def test_existing_file_is_not_replaced(mcast_trio_cli, tmp_path):
    out = tmp_path / "x.apx"
    out.write_bytes(b"precious")
    result = _run(mcast_trio_cli, str(out), "--seconds", "0.1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"Error: {out}: exists; record never replaces a file"]
    assert out.read_bytes() == b"precious"


def test_existing_capture_file_is_not_replaced(mcast_trio_cli, tmp_path):
    capture = tmp_path / "c.capture"
    capture.write_bytes(b"precious")
    result = _run(mcast_trio_cli, str(tmp_path / "c.apx"), "--messages", "--seconds", "0.1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"Error: {capture}: exists; record never replaces a file"
    assert capture.read_bytes() == b"precious" and not (tmp_path / "c.apx").exists()


@pytest.mark.parametrize("option, value", [("--rotate-size", "10XB"), ("--rotate-size", "0"),
                                           ("--count", "0"), ("--rotate-time", "-1")])
def test_invalid_options_are_usage_errors(mcast_trio_cli, tmp_path, option, value):
    result = _run(mcast_trio_cli, str(tmp_path / "u.apx"), option, value)
    assert result.returncode == 2
    assert option in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "u.apx").exists()


def test_sizes():
    from mcast_trio.cli._record import parse_size

    assert parse_size("100MB") == 100_000_000
    assert parse_size("1GB") == 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5kB") == 1500
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("1 parsec")


async def test_simulate_record_decode_end_to_end(mcast_trio_cli, tmp_path):
    # The chain, every step a command as a shifter runs it:
    # `simulate` in one process, `record` in another, then `decode`; the
    # decoded table holds every readout the simulator sent, in order, and
    # exactly the hits its ground truth says it sent.
    group, port = _endpoint()
    out = tmp_path / "run.apx"
    recorder = await _start(mcast_trio_cli, str(out), "--group", f"{group}:{port}")
    await _poll(lambda: _ready(out), what="the recorder to join")
    simulate = await trio.run_process(
        [*mcast_trio_cli, "simulate", "--group", f"{group}:{port}", "--rate", "4000", "--seconds", "1",
         "--seed", "11", "--json"], capture_stdout=True, capture_stderr=True)
    sent = json.loads(simulate.stdout.decode().strip().splitlines()[-1])
    assert sent["readouts"] >= 3000 and sent["hits"] > 0
    await _poll(lambda: len(_records(out)) >= sent["readouts"], what="every readout in the file")
    recorder.send_signal(signal.SIGTERM)
    code, _, err = await _finish(recorder)
    assert code == 0, err
    table = tmp_path / "run.npz"
    decoded = await trio.run_process([*mcast_trio_cli, "decode", str(out), "--to", "npz", "--out", str(table)],
                                     capture_stdout=True, capture_stderr=True, check=False)
    assert decoded.returncode == 0, decoded.stderr
    with np.load(table) as columns:
        readout_ids = np.unique(columns["readout_id"])
        n_hits = len(columns["readout_id"])
    records = _records(out)
    assert len(records) == sent["readouts"]
    assert [int.from_bytes(r[3:7], "little") for r in records] == list(range(sent["readouts"]))
    assert n_hits == sent["hits"]  # the simulator's ground truth, split hits included
    assert readout_ids.min() >= 0 and readout_ids.max() < sent["readouts"]
