"""``mcast-trio simulate``, ``replay``, ``listen``, ``probe`` and ``bench``, run
as a user runs them: subprocesses inside the private network namespace, real
datagrams, real ``.apx`` files. The receiving end is the library's own
receiver in the test process (joined before the command starts, so nothing
is missed) or ``mcast-trio listen`` (which says on stderr when it has
joined)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess

import pytest
import trio

from mcast_trio import AstroPix4Readout, decode_readouts, open_apx, open_receiver, open_sender
from mcast_trio.sim import DaqSimulator

_counter = itertools.count(1)


def _endpoint() -> tuple[str, int]:
    """A group and port no other test (of this run or another) uses."""
    n = next(_counter)
    pid = os.getpid()
    return f"239.255.{40 + pid % 150}.{n % 250 + 1}", 20000 + (pid * 37 + n * 101) % 40000


def _run(cli, *args, timeout=60):
    return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=timeout)


async def _run_async(cli, *args):
    proc = await trio.run_process([*cli, *args], capture_stdout=True, capture_stderr=True, check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def _write_apx(path, n: int, period_ns: int = 2_000_000, start_id: int = 100) -> list[bytes]:
    """An .apx of ``n`` simulator readouts ``period_ns`` apart; returns the
    records as written."""
    sim = DaqSimulator(seed=5, mean_hits=3.0, split_fraction=0.05, start_id=start_id,
                       start_ns=1_750_000_000_000_000_000, period_ns=period_ns)
    records = sim.datagrams(n)
    with open_apx(path, "wb", {"run": 1}) as out:
        out.write_many(records)
    return records


async def _collect(group, port, n, *, timeout=20, task_status=trio.TASK_STATUS_IGNORED):
    """Receive ``n`` readouts: (serialized bytes, arrival time) pairs."""
    got = []
    async with open_receiver(group, port, readout_class=AstroPix4Readout) as rx:
        task_status.started(rx)
        with trio.move_on_after(timeout):
            async for readout in rx:
                got.append((readout.to_bytes(), trio.current_time()))
                if len(got) >= n:
                    break
    return got


async def _receive_while(cli, args, group, port, n, timeout=20):
    """Run the command while a receiver collects ``n`` readouts."""
    result = {}

    async def receive(task_status=trio.TASK_STATUS_IGNORED):
        result["got"] = await _collect(group, port, n, timeout=timeout, task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(receive)
        result["process"] = await _run_async(cli, *args)
    return result["process"], result["got"]


def _rate(times) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


# -- simulate ----------------------------------------------------------------------------------


async def test_simulate_sends_consecutive_readouts(mcast_trio_cli):
    group, port = _endpoint()
    proc, got = await _receive_while(
        mcast_trio_cli, ["simulate", "-g", f"{group}:{port}", "--rate", "2000", "--seconds", "0.5", "--json"],
        group, port, 1000)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["readouts"] == 1000 and summary["datagrams"] == 1000
    ids = [AstroPix4Readout.from_bytes(data).readout_id for data, _ in got]
    assert ids == list(range(1000))
    assert summary["hits"] == len(decode_readouts([data for data, _ in got]).hits) > 0


async def test_simulate_garbage_is_counted(mcast_trio_cli):
    group, port = _endpoint()
    async with open_receiver(group, port, readout_class=AstroPix4Readout) as rx:
        proc = await _run_async(mcast_trio_cli, "simulate", "-g", group, "-p", str(port), "--rate", "1000",
                                "--seconds", "0.2", "--garbage-every", "50")
        assert proc.returncode == 0, proc.stderr
        assert "200 readouts" in proc.stdout and "204 datagrams" in proc.stdout
        with trio.fail_after(5):
            while rx.statistics().datagrams < 204:
                await trio.sleep(0.01)
        stats = rx.statistics()
    assert stats.readouts == 200 and stats.malformed == 4 and stats.lost == 0


async def test_simulate_stops_cleanly_on_sigterm(mcast_trio_cli):
    group, port = _endpoint()
    async with open_receiver(group, port, readout_class=AstroPix4Readout) as rx:
        proc = await trio.lowlevel.open_process(
            [*mcast_trio_cli, "simulate", "-g", f"{group}:{port}", "--rate", "500", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            with trio.fail_after(15):
                while rx.statistics().readouts < 20:  # it is sending
                    await trio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            out = bytearray()
            with trio.fail_after(10):
                while chunk := await proc.stdout.receive_some():
                    out.extend(chunk)
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0
        summary = json.loads(out)
        # Everything it says it sent arrives (nothing in flight is lost).
        with trio.fail_after(5):
            while rx.statistics().readouts < summary["readouts"]:
                await trio.sleep(0.01)
        stats = rx.statistics()
    assert stats.readouts == summary["readouts"] >= 20 and stats.lost == 0


def test_bad_group_is_a_usage_error_naming_it(mcast_trio_cli):
    for command in (["simulate"], ["replay", "x.apx"], ["listen"]):
        result = _run(mcast_trio_cli, *command, "--group", "240.1.2.3")
        assert result.returncode == 2, (command, result.stderr)
        assert "240.1.2.3" in result.stderr and "Traceback" not in result.stderr
    result = _run(mcast_trio_cli, "simulate", "--rate", "-5")
    assert result.returncode == 2 and "--rate" in result.stderr


# -- replay ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pace, n, passes, expected_rate", [
    (["--rate", "1000"], 1000, 1, 1000.0),
    (["--speed", "0.5"], 250, 1, 250.0),  # recorded 500/s (2 ms apart), half as fast: 1 s
    # Below 1x and across loops: the pace holds over the pass boundary.
    (["--speed", "0.5", "--loop", "2", "--keep-ids"], 125, 2, 250.0),
])
async def test_replay_is_identical_and_paced(mcast_trio_cli, tmp_path, pace, n, passes, expected_rate):
    path = tmp_path / "run.apx"
    records = _write_apx(path, n)
    group, port = _endpoint()
    n *= passes
    proc, got = await _receive_while(mcast_trio_cli, ["replay", str(path), "-g", f"{group}:{port}", *pace,
                                                      "--json"], group, port, n)
    assert proc.returncode == 0, proc.stderr
    assert [data for data, _ in got] == records * passes  # the file's records, byte for byte, in order
    achieved = _rate([t for _, t in got])
    assert abs(achieved / expected_rate - 1) < 0.02, achieved
    summary = json.loads(proc.stdout)
    assert summary["readouts"] == n and summary["requested_rate"] == pytest.approx(expected_rate)
    assert abs(summary["deviation"]) < 0.02


async def test_replay_loop_continues_ids_and_keep_ids_repeats_them(mcast_trio_cli, tmp_path):
    path = tmp_path / "run.apx"
    records = _write_apx(path, 100, start_id=4_294_967_246)  # the ids wrap in the second pass
    readouts = [AstroPix4Readout.from_bytes(r) for r in records]
    group, port = _endpoint()
    proc, got = await _receive_while(mcast_trio_cli, ["replay", str(path), "-g", f"{group}:{port}", "--rate",
                                                      "2000", "--loop", "2"], group, port, 200)
    assert proc.returncode == 0, proc.stderr
    received = [AstroPix4Readout.from_bytes(data) for data, _ in got]
    assert [r.readout_id for r in received] == [(4_294_967_246 + i) % 2**32 for i in range(200)]
    stamps = [r.timestamp for r in received]
    assert all(b - a == 2_000_000 for a, b in zip(stamps, stamps[1:]))  # one run, one period apart
    assert [r.data() for r in received] == [r.data() for r in readouts] * 2
    assert "200 readouts" in proc.stdout and "2 passes" in proc.stdout

    proc, got = await _receive_while(mcast_trio_cli, ["replay", str(path), "-g", f"{group}:{port}", "--fast",
                                                      "--loop", "2", "--keep-ids"], group, port, 200)
    assert proc.returncode == 0, proc.stderr
    assert [data for data, _ in got] == records * 2


async def test_replay_of_a_truncated_file_sends_the_complete_records(mcast_trio_cli, tmp_path):
    path = tmp_path / "killed.apx"
    records = _write_apx(path, 20)
    path.write_bytes(path.read_bytes()[:-5])  # a writer killed inside the last record
    group, port = _endpoint()
    proc, got = await _receive_while(mcast_trio_cli, ["replay", str(path), "-g", f"{group}:{port}", "--fast"],
                                     group, port, 19)
    assert proc.returncode == 0, proc.stderr
    assert [data for data, _ in got] == records[:19]
    assert "truncated" in proc.stderr and "Warning" not in proc.stderr and "19 readouts" in proc.stdout


def test_replay_of_a_missing_file_fails_in_one_line(mcast_trio_cli, tmp_path):
    missing = tmp_path / "nope.apx"
    result = _run(mcast_trio_cli, "replay", str(missing))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    result = _run(mcast_trio_cli, "replay", str(missing), "--fast", "--rate", "10")
    assert result.returncode == 2


# -- listen ------------------------------------------------------------------------------------


async def _listen(cli, group, port, args, datagrams):
    """Start ``listen``, wait until it says it joined, send ``datagrams``,
    return (returncode, stdout, stderr) once it exits (``--count``)."""
    proc = await trio.lowlevel.open_process([*cli, "listen", "-g", f"{group}:{port}", *args],
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = bytearray(), bytearray()
    try:
        async with trio.open_nursery() as nursery:
            async def drain(stream, buffer):
                while chunk := await stream.receive_some():
                    buffer.extend(chunk)

            nursery.start_soon(drain, proc.stdout, out)
            nursery.start_soon(drain, proc.stderr, err)
            with trio.fail_after(15):
                while b"joined" not in err:
                    assert proc.poll() is None, err.decode()
                    await trio.sleep(0.01)
            async with open_sender(group, port, framing="raw") as sender:
                await sender.send_many(datagrams)
            with trio.fail_after(15):
                await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode()


async def test_listen_prints_what_was_sent_as_json(mcast_trio_cli):
    sent = DaqSimulator(seed=9, mean_hits=3.0, start_id=7, start_ns=1_700_000_000_000_000_000).datagrams(5)
    truth = decode_readouts(sent)
    group, port = _endpoint()
    code, out, err = await _listen(mcast_trio_cli, group, port, ["--json", "--count", "5"],
                                   [sent[0], b"not a readout", *sent[1:]])
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["readout_id"] for r in records] == list(range(7, 12))
    assert [r["timestamp"] for r in records] == truth.readouts.timestamp.tolist()
    assert [r["n_hits"] for r in records] == truth.readouts.n_hits.tolist()
    hits = [h for r in records for h in r["hits"]]
    assert [(h["row"], h["column"], h["tot_us"]) for h in hits] == list(
        zip(truth.hits.row.tolist(), truth.hits.column.tolist(), truth.hits.tot_us.tolist()))
    assert all(r["sender"].startswith("127.0.0.1:") for r in records)
    assert "malformed 1" in err and "lost 0" in err


async def test_listen_prints_readouts_and_hits_as_text(mcast_trio_cli):
    sent = DaqSimulator(seed=2, mean_hits=2.0, start_ns=1_700_000_000_000_000_000).datagrams(3)
    truth = decode_readouts(sent)
    group, port = _endpoint()
    code, out, err = await _listen(mcast_trio_cli, group, port, ["--hits", "--count", "3"], sent)
    assert code == 0, err
    lines = out.splitlines()
    heads = [line for line in lines if not line.startswith("  ")]
    assert [h.split()[1:3] for h in heads] == [["readout", str(i)] for i in range(3)]
    assert "2023-11-14T22:13:20" in heads[0]  # the timestamp, in UTC
    hit_lines = [line.split() for line in lines if line.startswith("  ")]
    assert len(hit_lines) == len(truth.hits)
    assert [(int(h[1]), int(h[3])) for h in hit_lines] == list(zip(truth.hits.row.tolist(),
                                                                   truth.hits.column.tolist()))


async def test_listen_filter_and_messages(mcast_trio_cli):
    group, port = _endpoint()
    code, out, err = await _listen(mcast_trio_cli, group, port,
                                   ["--messages", "--framing", "raw", "--filter", "keep", "--count", "2"],
                                   [b"drop this", b"keep 1", b"nope", b"keep 2"])
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and "b'keep 1'" in lines[0] and "b'keep 2'" in lines[1]
    assert "filtered 2" in err


async def test_listen_on_a_busy_unicast_port_fails_in_one_line(mcast_trio_cli):
    port = _endpoint()[1]
    async with open_receiver("127.0.0.1", port, readout_class=AstroPix4Readout):
        result = await _run_async(mcast_trio_cli, "listen", "-g", f"127.0.0.1:{port}", "--count", "1")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and str(port) in lines[0], result.stderr


# -- probe -------------------------------------------------------------------------------------


async def test_probe_finds_traffic_on_loopback(mcast_trio_cli):
    group, port = _endpoint()
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(lambda task_status: trio.run_process(
            [*mcast_trio_cli, "simulate", "-g", f"{group}:{port}", "--rate", "500", "--seconds", "20"],
            capture_stdout=True, capture_stderr=True, check=False, task_status=task_status))
        async with open_receiver(group, port, readout_class=AstroPix4Readout) as rx:
            with trio.fail_after(15):
                while rx.statistics().readouts < 10:  # the simulator is sending
                    await trio.sleep(0.01)
        probe = await _run_async(mcast_trio_cli, "probe", f"{group}:{port}", "--seconds", "1", "--json")
        text = await _run_async(mcast_trio_cli, "probe", group, "--port", str(port), "--seconds", "0.5")
        sim.send_signal(signal.SIGTERM)
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout)
    assert report["receiving"] == ["lo"]
    lo = next(r for r in report["interfaces"] if r["interface"] == "lo")
    assert 350 < lo["rate"] < 650 and lo["readout_fraction"] == 1.0
    assert len(lo["senders"]) == 1 and next(iter(lo["senders"])).startswith("127.0.0.1:")
    assert report["answer"].startswith("traffic arrives on lo from 127.0.0.1:")
    assert text.returncode == 0 and "traffic arrives on lo" in text.stdout


async def test_probe_finds_ipv6_traffic_on_the_veth_pair(mcast_trio_cli):
    port = _endpoint()[1]
    group = f"ff12::7:{os.getpid() % 0xffff:x}"
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(lambda task_status: trio.run_process(
            [*mcast_trio_cli, "simulate", "-g", f"[{group}%mc0]:{port}", "--rate", "300", "--seconds", "20"],
            capture_stdout=True, capture_stderr=True, check=False, task_status=task_status))
        async with open_receiver(f"{group}%mc1", port, readout_class=AstroPix4Readout) as rx:
            with trio.fail_after(15):
                while rx.statistics().readouts < 5:
                    await trio.sleep(0.01)
        probe = await _run_async(mcast_trio_cli, "probe", f"[{group}]:{port}", "--seconds", "0.5", "--json")
        sim.send_signal(signal.SIGTERM)
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout)
    assert "mc1" in report["receiving"]  # the sender on mc0 reaches mc1 over the veth pair
    lo = next(r for r in report["interfaces"] if r["interface"] == "lo")
    assert not lo["joined"] and "loopback" in lo["error"]  # said why, not crashed


def test_probe_says_when_nothing_arrives(mcast_trio_cli):
    group, port = _endpoint()
    result = _run(mcast_trio_cli, "probe", f"{group}:{port}", "--seconds", "0.3")
    assert result.returncode == 0, result.stderr
    assert "nothing arrived on any interface" in result.stdout and " lo " in result.stdout


# -- bench -------------------------------------------------------------------------------------


def test_bench_decode_prints_ratios(mcast_trio_cli):
    result = _run(mcast_trio_cli, "bench", "decode", "--readouts", "2000", "--repeats", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {row["case"]: row for row in report["rows"]}
    assert rows["per readout (from_bytes + decode)"]["ratio"] == 1.0
    # Batches beat one readout object at a time (measured: ~20x at 1024).
    assert rows["decode_readouts, batches of 1024"]["ratio"] > 2
    assert report["hits"] > 0
    text = _run(mcast_trio_cli, "bench", "decode", "--readouts", "500", "--repeats", "1")
    assert text.returncode == 0 and "x\n" in text.stdout and "hits/s" in text.stdout


def test_bench_transport_runs_on_loopback(mcast_trio_cli):
    group, port = _endpoint()
    result = _run(mcast_trio_cli, "bench", "transport", "--datagrams", "5000", "-g", group, "-p", str(port),
                  "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [row["case"] for row in rows][0].startswith("mcast_trio")
    assert all(row["sent"] == 5000 and row["received"] > 0 for row in rows)


def test_every_source_command_has_help_with_examples(mcast_trio_cli):
    for command in ("simulate", "replay", "listen", "probe", "bench"):
        result = _run(mcast_trio_cli, command, "--help")
        assert result.returncode == 0 and "Examples:" in result.stdout, command
