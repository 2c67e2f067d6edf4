"""``mcast-trio monitor`` and ``mcast-trio demo``: the accumulator (sans
I/O, table-driven), the headless JSON reports against a known stream, the
terminal screen driven in a real pseudo-terminal, and the demo."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import socket
import subprocess
import time

import numpy as np
import pytest
import trio

from mcast_trio import AstroPix4Readout, ReceiverStatistics, SenderStats, open_sender
from mcast_trio.cli._accumulate import (
    MAX_COLUMNS,
    MAX_ROWS,
    Accumulator,
    scaled_map,
    shade_rows,
    sparkline,
    text_bars,
)
from mcast_trio.sim import DaqSimulator
from mcast_trio import HIT_DTYPE

_counter = itertools.count()


def unique_group() -> tuple[str, int]:
    n = next(_counter)
    pid = os.getpid()
    return f"239.255.{(pid % 200) + 20}.{n % 250 + 1}", 20000 + (pid * 13 + n * 101) % 40000


def hits(*triples) -> np.ndarray:
    """Hits with (row, column, tot_us)."""
    out = np.zeros(len(triples), dtype=HIT_DTYPE)
    for i, (row, column, tot) in enumerate(triples):
        out[i]["row"], out[i]["column"], out[i]["tot_us"] = row, column, tot
    return out.view(np.recarray)


def stats(readouts=0, hits=0, bytes=0, datagrams=None, senders=None, **other) -> ReceiverStatistics:
    senders = senders or {}
    sums = {name: sum(getattr(s, name) for s in senders.values())
            for name in ("lost", "duplicates", "reordered", "restarts")}
    sums.update(other)
    return ReceiverStatistics(datagrams=readouts if datagrams is None else datagrams, bytes=bytes,
                              readouts=readouts, hits=hits, senders=senders, **sums)


# -- the accumulator -------------------------------------------------------------


@pytest.mark.parametrize("given, expected_counts, shape, hottest", [
    ([], {}, (1, 1), []),
    ([(0, 0, 1.0)], {(0, 0): 1}, (1, 1), [(0, 0, 1)]),
    ([(5, 7, 1.0)] * 3 + [(2, 3, 1.0)], {(5, 7): 3, (2, 3): 1}, (6, 8), [(5, 7, 3), (2, 3, 1)]),
    ([(31, 31, 5.0), (31, 31, 5.0), (0, 31, 5.0)], {(31, 31): 2, (0, 31): 1}, (32, 32),
     [(31, 31, 2), (0, 31, 1)]),
    ([(1, 2, 0.5), (2, 1, 0.5)], {(1, 2): 1, (2, 1): 1}, (3, 3), [(1, 2, 1), (2, 1, 1)]),
])
def test_known_hits_give_the_map_counts(given, expected_counts, shape, hottest):
    acc = Accumulator()
    acc.add(hits(*given), readouts=2)
    expected = np.zeros((MAX_ROWS, MAX_COLUMNS), dtype=np.int64)
    for (r, c), n in expected_counts.items():
        expected[r, c] = n
    assert (acc.hitmap == expected).all()
    assert acc.shape == shape
    assert acc.hottest(5) == hottest
    assert acc.hits == len(given) and acc.readouts == 2


def test_batches_add_up():
    acc = Accumulator()
    for _ in range(3):
        acc.add(hits((5, 7, 2.0), (5, 7, 2.0), (4, 1, 3.0)), readouts=1)
    assert acc.hitmap[5, 7] == 6 and acc.hitmap[4, 1] == 3 and acc.hitmap.sum() == 9
    assert acc.readouts == 3 and acc.tot_mean == pytest.approx(7 / 3)


@pytest.mark.parametrize("counts, log, expected", [
    ([0, 1, 10, 100], False, [0, 0.01, 0.1, 1.0]),
    ([0, 1, 10, 100], True, [0, math.log(2) / math.log(101), math.log(11) / math.log(101), 1.0]),
    ([0, 0], True, [0, 0]),
    ([7], False, [1.0]),
])
def test_linear_and_log_scale(counts, log, expected):
    assert scaled_map(np.array(counts), log=log) == pytest.approx(expected)


def test_log_scale_shows_what_linear_hides():
    counts = np.array([[0, 1, 1000]])
    assert shade_rows(counts, log=False, width=1) == [" ░█"]  # any hit is visible
    linear = shade_rows(np.array([[0, 10, 1000]]), log=False, width=1)[0]
    log = shade_rows(np.array([[0, 10, 1000]]), log=True, width=1)[0]
    assert linear == " ░█" and log == " ▒█"
    assert shade_rows(np.array([[2, 0]]), log=True, width=2) == ["██  "]


@pytest.mark.parametrize("tot, bin_index", [
    (0.0, 0), (1.99, 0), (2.0, 1), (50.0, 25), (99.99, 49), (100.0, 50), (1e4, 50), (-1.0, 0),
])
def test_tot_histogram_bins(tot, bin_index):
    acc = Accumulator(tot_max_us=100.0, tot_bins=50)
    acc.add(hits((0, 0, tot)), readouts=1)
    expected = np.zeros(51, dtype=np.int64)
    expected[bin_index] = 1  # the last bin is the overflow
    assert (acc.tot_counts == expected).all()


def test_reset_empties_the_accumulators_and_counts_from_there():
    acc = Accumulator()
    sender = SenderStats(received=100, lost=2)
    acc.observe(0.0, stats(readouts=100, hits=300, malformed=1, senders={("127.0.0.1", 9): sender}))
    acc.add(hits((5, 7, 3.0)), readouts=1)
    acc.reset(0.5)
    assert acc.hitmap.sum() == 0 and acc.tot_counts.sum() == 0 and acc.hits == 0 and acc.readouts == 0
    assert acc.hottest() == [] and math.isnan(acc.tot_mean) and acc.resets == 1
    assert acc.counters()["readouts"] == 0 and acc.counters()["malformed"] == 0
    acc.observe(1.0, stats(readouts=150, hits=400, malformed=1,
                           senders={("127.0.0.1", 9): SenderStats(received=150, lost=2)}))
    since = acc.counters()
    assert since["readouts"] == 50 and since["hits"] == 100 and since["lost"] == 0
    assert acc.counters(since_reset=False)["readouts"] == 150
    (view,) = acc.senders(1.0)
    assert view.counters["received"] == 50 and view.counters["lost"] == 0


@pytest.mark.parametrize("t1, after, expected", [
    (1.0, dict(readouts=1000, hits=4000, bytes=2_000_000), (1000.0, 4000.0, 2.0)),
    (2.0, dict(readouts=1000, hits=4000, bytes=2_000_000), (500.0, 2000.0, 1.0)),
    (0.5, dict(readouts=1000, hits=4000, bytes=2_000_000), (0.0, 0.0, 0.0)),  # before the rate period
])
def test_rates_from_statistics_deltas(t1, after, expected):
    acc = Accumulator(rate_period=1.0)
    key = ("127.0.0.1", 4000)
    acc.observe(10.0, stats(senders={key: SenderStats()}))
    acc.observe(10.0 + t1, stats(senders={key: SenderStats(received=after["readouts"], hits=after["hits"],
                                                              bytes=after["bytes"])}, **after))
    assert (acc.rates.readouts, acc.rates.hits, acc.rates.mbytes) == pytest.approx(expected)
    (view,) = acc.senders(10.0 + t1)
    # per sender, from the sender's own counters
    assert (view.readouts_per_s, view.hits_per_s, view.mbytes_per_s) == pytest.approx(expected)
    assert list(acc.history) == ([pytest.approx(expected[0])] if t1 >= 1.0 else [])


def test_forced_rate_point():
    acc = Accumulator(rate_period=100.0)
    acc.observe(0.0, stats())
    acc.observe(0.5, stats(readouts=10), rate_point=False)
    assert acc.rates.readouts == 0
    acc.observe(2.0, stats(readouts=100), rate_point=True)
    assert acc.rates.readouts == pytest.approx(50.0)


def test_a_restart_resets_the_accumulators():
    acc = Accumulator()
    key = ("127.0.0.1", 5000)
    acc.observe(0.0, stats(readouts=10, senders={key: SenderStats(received=10)}))
    acc.add(hits((5, 7, 1.0)), readouts=10)
    assert acc.observe(0.25, stats(readouts=20, senders={key: SenderStats(received=20)})) == []
    assert acc.hitmap.sum() == 1
    events = acc.observe(0.5, stats(readouts=25, senders={key: SenderStats(received=25, restarts=1)}))
    assert len(events) == 1 and "127.0.0.1:5000 restarted" in events[0]
    assert acc.hitmap.sum() == 0 and acc.auto_resets == 1 and acc.counters()["readouts"] == 0
    assert acc.observe(0.75, stats(readouts=30, senders={key: SenderStats(received=30, restarts=1)})) == []
    assert acc.auto_resets == 1


@pytest.mark.parametrize("lost, received, threshold, alarm", [
    (0, 100, 0.01, False), (1, 99, 0.01, False), (2, 98, 0.01, True), (1, 9, 0.2, False), (3, 7, 0.2, True),
])
def test_loss_alarm(lost, received, threshold, alarm):
    acc = Accumulator(loss_alarm=threshold)
    acc.observe(0.0, stats(readouts=received, senders={("h", 1): SenderStats(received=received, lost=lost)}))
    assert any("loss" in a for a in acc.alarms(0.0)) == alarm


def test_a_silent_sender_goes_stale():
    acc = Accumulator(stale=2.0)
    key = ("127.0.0.1", 7)
    acc.observe(0.0, stats(readouts=5, senders={key: SenderStats(received=5)}))
    acc.observe(1.5, stats(readouts=5, senders={key: SenderStats(received=5)}))
    assert acc.senders(1.5)[0].alive and acc.alarms(1.5) == []
    acc.observe(2.5, stats(readouts=5, senders={key: SenderStats(received=5)}))
    (view,) = acc.senders(2.5)
    assert not view.alive and acc.alarms(2.5) == ["127.0.0.1:7 silent for 2 s"]
    acc.observe(3.0, stats(readouts=6, senders={key: SenderStats(received=6)}))
    assert acc.senders(3.0)[0].alive


@pytest.mark.parametrize("values, width, expected", [
    ([], None, ""), ([0, 0], None, "▁▁"), ([0, 7, 14], None, "▁▅█"), ([1, 2, 3, 4], 2, "▆█"),
])
def test_sparkline(values, width, expected):
    assert sparkline(values, width) == expected


def test_text_bars():
    assert text_bars([0, 1, 10], width=10) == ["", "█", "█" * 10]
    assert text_bars([0, 0]) == ["", ""]


# -- a known stream -------------------------------------------------------------------


def known_stream(n_background: int = 1000, n_hot: int = 200, hot=(5, 7), seed: int = 3, first_id: int = 0):
    """Simulator readouts (8 x 8 pixels) plus ``n_hot`` readouts whose hits
    are all at ``hot``, renumbered 0.. so that the receiver sees one
    continuous run. Returns (readouts, hit map of what was sent)."""
    sim = DaqSimulator(seed=seed, rows=8, columns=8, mean_hits=1.0, split_fraction=0.0)
    batch = sim.generate(60_000)
    truth = batch.truth
    order = np.argsort(truth.readout_id, kind="stable")
    ids = batch.readout_ids
    starts = np.searchsorted(truth.readout_id[order], ids, side="left")
    ends = np.searchsorted(truth.readout_id[order], ids, side="right")
    data = batch.data()
    background, hot_ones = [], []
    for i in range(len(ids)):
        mine = truth[order[starts[i]:ends[i]]]
        if len(background) < n_background:
            background.append((i, mine))
        elif len(mine) and (mine.row == hot[0]).all() and (mine.column == hot[1]).all():
            hot_ones.append((i, mine))
        if len(background) == n_background and len(hot_ones) == n_hot:
            break
    assert len(hot_ones) == n_hot
    chosen = background + hot_ones
    hitmap = np.zeros((MAX_ROWS, MAX_COLUMNS), dtype=np.int64)
    readouts = []
    for new_id, (i, mine) in enumerate(chosen):
        np.add.at(hitmap, (mine.row.astype(int), mine.column.astype(int)), 1)
        readouts.append(AstroPix4Readout(data[i], first_id + new_id, int(batch.timestamps[i])))
    return readouts, hitmap


async def send_readouts(group: str, port: int, *runs) -> None:
    """Send each run of readouts from one sender, with a pause between runs
    (a DAQ restarting)."""
    async with open_sender(group, port, framing="raw") as sender:
        for n, readouts in enumerate(runs):
            if n:
                await trio.sleep(0.3)
            for i in range(0, len(readouts), 100):
                await sender.send_many(readouts[i:i + 100])
                await trio.sleep(0.002)  # a paced DAQ, not a flood: nothing may be lost here
            await sender.flush()


def wait_for_line(stream, pattern: str, timeout: float = 20.0) -> str:
    """Read lines from a subprocess pipe until one matches (bounded)."""
    import selectors

    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                line = stream.readline()
                if not line:
                    break
                if re.search(pattern, line):
                    return line
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s")


def run_headless(cli, *runs, args=("--json",), seconds=3):
    """Start the headless monitor, send the runs when it listens, return its
    reports (JSON objects, or lines)."""
    group, port = unique_group()
    proc = subprocess.Popen([*cli, "monitor", "--headless", *args, "--seconds", str(seconds),
                             "--group", f"{group}:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(proc.stderr, "listening on")
        trio.run(send_readouts, group, port, *runs)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()] if "--json" in args else out.splitlines()


def test_headless_json_counts_what_was_sent(mcast_trio_cli):
    readouts, hitmap = known_stream()
    reports = run_headless(mcast_trio_cli, readouts)
    final = reports[-1]
    assert final["final"] and not any(r["final"] for r in reports[:-1])
    total = final["total"]
    assert total["readouts"] == len(readouts) == 1200
    assert total["hits"] == hitmap.sum() and total["datagrams"] == len(readouts)
    for name in ("lost", "duplicates", "reordered", "restarts", "malformed", "dropped", "kernel_drops"):
        assert total[name] == 0, name
    (sender,) = final["senders"].values()
    assert sender["received"] == len(readouts) and sender["lost"] == 0 and sender["alive"]
    assert final["hottest"][0] == {"row": 5, "column": 7, "hits": int(hitmap[5, 7])}
    assert final["map"]["hits"] == hitmap.sum() and final["map"]["readouts"] == len(readouts)
    assert (final["map"]["rows"], final["map"]["columns"]) == (8, 8)
    assert final["alarms"] == []
    assert max(r["rates"]["readouts_per_s"] for r in reports) > 0


def test_a_new_run_resets_the_map(mcast_trio_cli):
    first, _ = known_stream(first_id=1000)  # ids 1000..2199, (5, 7) hottest
    second, second_map = known_stream(n_background=300, n_hot=0, seed=4)  # ids 0..299: a restart
    reports = run_headless(mcast_trio_cli, first, second)
    final = reports[-1]
    assert final["total"]["readouts"] == 1500 and final["total"]["restarts"] == 1
    assert final["map"]["auto_resets"] == 1
    assert final["map"]["readouts"] == 300 and final["map"]["hits"] == second_map.sum()
    assert final["hottest"][0]["hits"] == second_map.max() < 50
    assert any("new run" in event for report in reports for event in report["events"])


def test_headless_text_lines(mcast_trio_cli):
    readouts, hitmap = known_stream()
    lines = run_headless(mcast_trio_cli, readouts, args=())
    assert len(lines) >= 2
    last = lines[-1]
    assert f"readouts {len(readouts):,} " in last and f"hits {int(hitmap.sum()):,} " in last
    assert f"hottest r5 c7={int(hitmap[5, 7]):,}" in last and "lost 0 " in last and "senders 1/1 alive" in last


def test_usage_errors(mcast_trio_cli):
    bad = subprocess.run([*mcast_trio_cli, "monitor", "--interval", "0"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "--interval" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([*mcast_trio_cli, "monitor", "--loss-alarm", "2"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "--loss-alarm" in bad.stderr
    bad = subprocess.run([*mcast_trio_cli, "monitor", "--group", "0.0.0.0"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "group='0.0.0.0'" in bad.stderr
    bad = subprocess.run([*mcast_trio_cli, "monitor", "--run", "../elsewhere"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "'../elsewhere' is not a run name" in bad.stderr


def test_a_busy_unicast_port_is_one_line_exit_1(mcast_trio_cli):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        result = subprocess.run([*mcast_trio_cli, "monitor", "--headless", "--seconds", "1", "--group",
                                 f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1


# -- the terminal screen in a pseudo-terminal -----------------------------------------------


def test_terminal_monitor_screen_and_keys(mcast_trio_cli, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    readouts, hitmap = known_stream()
    group, port = unique_group()
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="140", LINES="50")
    child = pexpect.spawn(mcast_trio_cli[0], [*mcast_trio_cli[1:], "monitor", "--group", f"{group}:{port}",
                                              "--snapshot-dir", str(tmp_path), "--run", "shift",
                                              "--fps", "10", "--stale", "2"],
                          env=env, dimensions=(50, 140), encoding="utf-8", timeout=20)
    try:
        child.expect("waiting for data")
        child.expect(r"scale: linear")
        trio.run(send_readouts, group, port, readouts)
        hot = int(hitmap[5, 7])
        child.expect(rf"since reset: readouts {len(readouts):,}  hits {int(hitmap.sum()):,}")
        child.expect(rf"hottest: row 5 col 7: {hot:,}")
        child.expect(r"127\.0\.0\.1:\d+(?:\s|\x1b\[[0-9;]*m)+alive")  # a cell of the sender table
        child.expect(r"alarms: none")
        # the stream has ended: 2 s later the sender is stale and the alarm line says so
        child.expect(r"ALARM: 127\.0\.0\.1:\d+ silent for [23] s")
        child.expect(r"127\.0\.0\.1:\d+(?:\s|\x1b\[[0-9;]*m)+stale [23]s")

        child.send("l")
        child.expect(r"scale: log")
        child.expect(r"log scale, max")

        child.send("s")
        child.expect(r"snapshot \S*shift-001")  # shown once the files are written
        npz = tmp_path / "shift-001.npz"
        assert npz.exists()
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            assert not (tmp_path / "shift-001.png").exists()
        else:
            assert (tmp_path / "shift-001.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with np.load(npz) as saved:
            assert (saved["hitmap"] == hitmap).all()
            assert int(saved["readouts"]) == len(readouts) and int(saved["hits"]) == hitmap.sum()

        child.send("r")
        child.expect(r"since reset: readouts 0  hits 0")
        child.expect(r"hottest: none yet")

        child.send("q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True) if child.isalive() else child.close()
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus)


# -- the demo -------------------------------------------------------------------------


def test_demo_headless_lines(mcast_trio_cli):
    group, port = unique_group()
    result = subprocess.run([*mcast_trio_cli, "demo", "--seconds", "2", "--group", f"{group}:{port}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    counts = [int(m.group(1).replace(",", "")) for m in re.finditer(r" readouts ([\d,]+) ", result.stdout)]
    assert len(counts) >= 2 and counts[-1] > 0, result.stdout
    assert "malformed" in result.stdout


def test_malformed_datagrams_are_counted_per_sender_and_reset():
    acc = Accumulator()
    a, b = ("127.0.0.1", 4001), ("127.0.0.1", 4002)
    acc.observe(0.0, stats(readouts=2, senders={a: SenderStats(received=1), b: SenderStats(received=1)}))
    for source in (a, a, b):
        acc.add_malformed(source)  # what the receiver's on_malformed hook calls
    views = {v.name: v.counters["malformed"] for v in acc.senders(0.0)}
    assert views == {"127.0.0.1:4001": 2, "127.0.0.1:4002": 1}
    acc.reset(0.5)
    acc.add_malformed(b)
    assert {v.name: v.counters["malformed"] for v in acc.senders(0.5)} == {"127.0.0.1:4001": 0,
                                                                         "127.0.0.1:4002": 1}
    assert {v.name: v.counters["malformed"] for v in acc.senders(0.5, since_reset=False)} == {
        "127.0.0.1:4001": 2, "127.0.0.1:4002": 2}


def _tot_rows(acc):
    """The TOT rows of the drawn screen: [(lower edge, '-' or '+', count)]."""
    import pathlib
    import tempfile

    from rich.console import Console

    from mcast_trio.cli._monitor import UiState, render_frame

    ui = UiState(log=False, run="r", title="t", started=0.0, snapshot_dir=pathlib.Path(tempfile.gettempdir()))
    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    console.print(render_frame(acc, 1.0, ui))
    text = console.export_text()
    rows = [re.search(r"(\d+)([-+]) [^\d]*?(\d[\d,]*)\s*$", line) for line in text.splitlines()]
    return [(int(m.group(1)), m.group(2), int(m.group(3).replace(",", ""))) for m in rows if m], text


def test_tot_rows_draw_every_entry_once_with_the_overflow():
    # 50 bins drawn 3 at a time: the last drawn row used to add the overflow
    # bin to the last real bins (775 overflow hits showed as "96- 775" and "100+ 775").
    acc = Accumulator(tot_max_us=100.0, tot_bins=50)
    acc.add(hits(*[(0, 0, 2.0 * i + 1.0) for i in range(50)]), readouts=1)  # one hit in every bin
    acc.add(hits(*[(0, 0, 150.0)] * 7), readouts=1)  # seven in overflow
    rows, text = _tot_rows(acc)
    assert rows[-1] == (100, "+", 7), text
    assert [sign for _edge, sign, _n in rows[:-1]] == ["-"] * (len(rows) - 1)
    assert sum(n for _edge, _sign, n in rows[:-1]) == 50, text
    assert rows[-2][2] == 2  # 96-100: bins 48 and 49 only
    assert "raise --tot-max" not in text


def test_a_spectrum_mostly_in_overflow_says_so_and_the_default_holds_real_tot():
    acc = Accumulator(tot_max_us=100.0)
    acc.add(hits(*[(0, 0, 250.0)] * 9, (0, 0, 10.0)), readouts=1)
    rows, text = _tot_rows(acc)
    assert rows[-1] == (100, "+", 9) and "most hits are above 100 us: raise --tot-max" in text
    # Real AstroPix 4 hits (TOT about 180-295 us) fall inside the default range.
    acc = Accumulator()
    acc.add(hits((0, 0, 180.0), (0, 0, 295.0)), readouts=1)
    assert acc.tot_counts[-1] == 0 and acc.tot_counts.sum() == 2
