"""``mcast-trio decode``, ``info``, ``check`` and ``plot``, run as a user runs
them (subprocesses) on real files: the shared golden run, a simulated run
with many split hits, and damaged copies."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from mcast_trio import HIT_DTYPE, ApxReader, ApxWriter, decode_readouts
from mcast_trio.sim import DaqSimulator

APX = "20250723_092534_data.apx"
CSV = "20250723_092534_data.csv"


def run(cli, *args, timeout=60):
    return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A simulated run: the file, its records and the exact hits in it."""
    sim = DaqSimulator(seed=21, mean_hits=3.0, split_fraction=0.3)
    batch = sim.generate(3000)
    path = tmp_path_factory.mktemp("sim") / "sim.apx"
    with ApxWriter(path, {"run": 7}) as writer:
        writer.write_many(batch.datagrams())
    return path, batch.datagrams(), batch.truth


def _damaged_copy(source, target, index=40):
    """``source`` with one bit flipped in the length field of record ``index``."""
    with ApxReader(source) as reader:
        offset = [o for o, _ in reader.records_with_offsets()][index]
    content = bytearray(source.read_bytes())
    content[offset + 15 + 1] ^= 0x04
    target.write_bytes(bytes(content))
    return target


def _csv_hits(path):
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    table = list(csv.DictReader(lines))
    hits = np.zeros(len(table), HIT_DTYPE)
    for name in HIT_DTYPE.names:
        hits[name] = [float(row[name]) if name == "tot_us" else int(row[name]) for row in table]
    return hits


# -- decode --------------------------------------------------------------------------------------


def test_decode_csv_of_the_shared_run_equals_the_golden_csv(mcast_trio_cli, astropix_data, tmp_path):
    out = tmp_path / "golden.csv"
    result = run(mcast_trio_cli, "decode", str(astropix_data / APX), "--to", "csv", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "775 readouts, 776 hits" in result.stderr
    assert out.read_bytes() == (astropix_data / CSV).read_bytes()  # every byte: header, columns, values


def test_decode_csv_carries_split_hits(mcast_trio_cli, simulated, tmp_path):
    path, _records, truth = simulated
    out = tmp_path / "sim.csv"
    result = run(mcast_trio_cli, "decode", str(path), "-o", str(out))
    assert result.returncode == 0, result.stderr
    hits = _csv_hits(out)
    assert len(hits) == len(truth)
    for name in HIT_DTYPE.names:
        np.testing.assert_array_equal(hits[name], truth[name], err_msg=name)
    assert out.read_text().splitlines()[0] == '#{"readout_uid": 4000, "run": 7}'


def _read_table(fmt, out):
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        header = json.loads(table.schema.metadata[b"apx_header"])
        return {name: table.column(name).to_numpy() for name in HIT_DTYPE.names}, header
    if fmt == "hdf5":
        import h5py

        with h5py.File(out, "r") as f:
            rows = f["hits"][:]
            header = json.loads(f.attrs["apx_header"])
        return {name: rows[name] for name in HIT_DTYPE.names}, header
    with np.load(out) as npz:
        return {name: npz[name] for name in HIT_DTYPE.names}, json.loads(str(npz["apx_header"]))


@pytest.mark.parametrize("fmt, suffix", [("parquet", ".parquet"), ("hdf5", ".h5"), ("npz", ".npz")])
def test_decode_formats_round_trip_the_hits(mcast_trio_cli, simulated, tmp_path, fmt, suffix):
    path, _records, truth = simulated
    copy = tmp_path / "run.apx"
    copy.write_bytes(path.read_bytes())
    result = run(mcast_trio_cli, "decode", str(copy), "--to", fmt, "--progress")
    assert result.returncode == 0, result.stderr
    out = tmp_path / ("run" + suffix)  # the default output name
    columns, header = _read_table(fmt, out)
    assert header == {"readout_uid": 4000, "run": 7}
    for name in HIT_DTYPE.names:
        assert columns[name].dtype == HIT_DTYPE[name], name
        np.testing.assert_array_equal(columns[name], truth[name], err_msg=name)
    # the output is not replaced without --force
    again = run(mcast_trio_cli, "decode", str(copy), "--to", fmt)
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        f"Error: {out}: exists (use --force to replace it)"]
    assert run(mcast_trio_cli, "decode", str(copy), "--to", fmt, "--force").returncode == 0


def test_decode_of_a_damaged_file_fails_in_one_line(mcast_trio_cli, simulated, tmp_path):
    damaged = _damaged_copy(simulated[0], tmp_path / "bad.apx")
    result = run(mcast_trio_cli, "decode", str(damaged))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "damaged" in lines[0] and "--repair" in lines[0]
    assert not (tmp_path / "bad.csv").exists()


@pytest.mark.parametrize("command", [["decode"], ["info"], ["check"], ["plot"], ["decode", "--to", "npz"]])
def test_missing_file_is_one_line_exit_1(mcast_trio_cli, tmp_path, command):
    missing = tmp_path / "nope.apx"
    result = run(mcast_trio_cli, command[0], str(missing), *command[1:])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"Error: {missing}: No such file or directory"]


def test_not_an_apx_file(mcast_trio_cli, tmp_path):
    path = tmp_path / "text.apx"
    path.write_text("hello, world\n")
    result = run(mcast_trio_cli, "info", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a readable .apx file" in lines[0]


def test_invalid_format_is_a_usage_error(mcast_trio_cli, simulated):
    result = run(mcast_trio_cli, "decode", str(simulated[0]), "--to", "xlsx")
    assert result.returncode == 2 and "--to" in result.stderr and "xlsx" in result.stderr


# -- info ----------------------------------------------------------------------------------------


def test_info_of_the_shared_run(mcast_trio_cli, astropix_data):
    result = run(mcast_trio_cli, "info", str(astropix_data / APX), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    with ApxReader(astropix_data / APX) as reader:
        records = list(reader.records())
        header = reader.header
    batch = decode_readouts(records, carry="consecutive")
    ts = batch.readouts.timestamp
    assert info["header"] == header
    assert (info["records"], info["hits"], info["malformed"]) == (775, 776, 0)
    assert info["span_s"] == pytest.approx((int(ts.max()) - int(ts.min())) / 1e9)
    assert info["rate_hz"] == pytest.approx(774 / info["span_s"])
    assert info["flags"] == {"none": 775}
    assert (info["damaged_regions"], info["bytes_skipped"], info["id_gaps"]) == (0, 0, 0)
    text = run(mcast_trio_cli, "info", str(astropix_data / APX))
    assert text.returncode == 0
    assert "readouts      775" in text.stdout and "hits          776" in text.stdout


def test_info_counts_flags_and_damage(mcast_trio_cli, simulated, tmp_path):
    path, records, truth = simulated
    result = run(mcast_trio_cli, "info", str(path), "--json")
    info = json.loads(result.stdout)
    batch = decode_readouts(records, carry="consecutive")
    assert (info["records"], info["hits"]) == (3000, len(truth))
    assert info["flags"]["VALID_EXTRA_BYTES"] == int(np.count_nonzero(batch.readouts.status & 8))
    assert info["flags"]["ORPHAN_BYTES_MATCHED"] == int(np.count_nonzero(batch.readouts.status & 1)) > 0
    damaged = _damaged_copy(path, tmp_path / "bad.apx")
    info = json.loads(run(mcast_trio_cli, "info", str(damaged), "--json").stdout)
    assert info["records"] == 2999 and info["damaged_regions"] == 1
    assert info["bytes_skipped"] == len(records[40])
    assert info["id_gaps"] == 1  # the readout lost to the damage


# -- check ---------------------------------------------------------------------------------------


def test_check_clean_file(mcast_trio_cli, astropix_data):
    result = run(mcast_trio_cli, "check", str(astropix_data / APX))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{astropix_data / APX}: clean, 775 records"


def test_check_finds_damage_and_repairs(mcast_trio_cli, simulated, tmp_path):
    path, records, _ = simulated
    damaged = _damaged_copy(path, tmp_path / "bad.apx")
    result = run(mcast_trio_cli, "check", str(damaged))
    assert result.returncode == 1
    assert "DAMAGED, 1 regions" in result.stdout and "2999 records recovered" in result.stdout
    repaired = tmp_path / "fixed.apx"
    result = run(mcast_trio_cli, "check", str(damaged), "--repair", str(repaired), "--json")
    assert result.returncode == 1  # the input was damaged, whatever the repair
    report = json.loads(result.stdout)
    assert report["clean"] is False and report["records"] == 2999 and report["repaired"] == str(repaired)
    assert report["damaged_regions"][0]["index"] == 40
    assert report["bytes_skipped"] == len(records[40])
    with ApxReader(repaired, strict=True) as reader:
        assert list(reader.records()) == records[:40] + records[41:]
        assert reader.header == {"readout_uid": 4000, "run": 7}
    assert run(mcast_trio_cli, "check", str(repaired)).returncode == 0
    # --repair never replaces a file
    again = run(mcast_trio_cli, "check", str(damaged), "--repair", str(repaired))
    assert again.returncode == 1 and "exists" in again.stderr


def test_check_truncated_file(mcast_trio_cli, simulated, tmp_path):
    path = tmp_path / "cut.apx"
    path.write_bytes(simulated[0].read_bytes()[:-5])
    result = run(mcast_trio_cli, "check", str(path), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["records"] == 2999 and report["truncated"]["size"] == len(simulated[1][-1]) - 5


# -- plot ----------------------------------------------------------------------------------------


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("damage", [False, True])
def test_plot_writes_three_pngs(mcast_trio_cli, astropix_data, tmp_path, damage):
    source = astropix_data / APX
    if damage:
        source = _damaged_copy(source, tmp_path / "bad.apx", index=100)
    out = tmp_path / "plots"
    result = run(mcast_trio_cli, "plot", str(source), "--out", str(out), "--log")
    assert result.returncode == 0, result.stderr
    stem = source.stem
    names = [f"{stem}-hitmap.png", f"{stem}-tot.png", f"{stem}-rate.png"]
    assert result.stdout.split() == [str(out / name) for name in names]
    for name in names:
        width, height = _png_size(out / name)
        assert width >= 400 and height >= 300


def test_help_has_examples(mcast_trio_cli):
    for command in ("decode", "info", "check", "plot", "record"):
        result = run(mcast_trio_cli, command, "--help")
        assert result.returncode == 0 and "Examples:" in result.stdout and f"mcast-trio {command}" in result.stdout


# -- file tools attacked again (issue 13, points 9, 11 and the tools agreeing on damage) --------
#    (moved from the attacker's tests/test_attack_files.py)

HEADER = b"\xfe\xdc\xba"


def test_plot_of_a_damaged_file_says_the_damage(mcast_trio_cli, tmp_path):
    """A file with one damaged record header in the middle (record 20 of
    50): ``check`` reports it (exit 1), ``decode`` and ``replay`` stop on it
    with its offset; ``plot`` reads with recover=True, draws the 49 other
    records and says nothing at all (exit 0), so the plots pass for the
    whole run. What should hold: plot says the damaged region (its offset)
    in its own words, as info does."""
    pytest.importorskip("matplotlib")
    from mcast_trio import open_apx
    from mcast_trio.sim import DaqSimulator

    records = DaqSimulator(3, start_ns=1_700_000_000_000_000_000).datagrams(50)
    buf = io.BytesIO()
    with open_apx(buf, "wb") as out:
        out.write_many(records)
    data = bytearray(buf.getvalue())
    at = len(data) - sum(map(len, records)) + sum(map(len, records[:20]))
    data[at + 1] ^= 4
    path = tmp_path / "damaged.apx"
    path.write_bytes(bytes(data))
    check = run(mcast_trio_cli, "check", str(path))
    assert check.returncode == 1 and f"offset {at}" in check.stdout + check.stderr
    result = run(mcast_trio_cli, "plot", str(path), "-o", str(tmp_path / "plots"))
    assert "Traceback" not in result.stderr
    assert f"offset {at}" in result.stderr, (result.returncode, result.stderr)


def _needs_unshare():
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare for a private mount namespace")


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_decode_to_dev_stdout_redirected_to_a_file(mcast_trio_cli, astropix_data, tmp_path, force):
    """``decode run.apx -o /dev/stdout > run.csv``: the help says an output
    that is a device or a pipe (``-o /dev/stdout``) is written in place; with
    stdout redirected to a regular file, /dev/stdout resolves to that file,
    so decode takes the rename path. Found: without --force "Error:
    /dev/stdout: exists (use --force to replace it)"; with --force it
    writes ``/dev/.stdout.XXXX.part`` and renames it onto ``/dev/stdout``,
    replacing the system's symlink with a regular file holding the CSV,
    leaves run.csv empty and says "-> /dev/stdout", exit 0. (Run in a
    private mount namespace with a tmpfs on /dev, so no real /dev is
    touched.) What should hold: the CSV goes to run.csv, /dev/stdout is
    left alone."""
    _needs_unshare()
    src = tmp_path / "run.apx"
    shutil.copyfile(astropix_data / "20250723_092534_data.apx", src)
    golden = (astropix_data / "20250723_092534_data.csv").read_text()
    csv = tmp_path / "run.csv"
    argv = " ".join(f"'{a}'" for a in mcast_trio_cli)
    script = (
        "mount -t tmpfs tmpfs /dev && ln -s /proc/self/fd/1 /dev/stdout && ln -s /proc/self/fd/2 /dev/stderr && "
        f"{{ {argv} decode '{src}' -o /dev/stdout {'--force' if force else ''} > '{csv}'; echo \"rc=$?\" >&2; }}; "
        "if [ -L /dev/stdout ]; then echo link >&2; else echo clobbered >&2; fi"
    )
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert "rc=0" in result.stderr, result.stderr
    assert "link" in result.stderr.split(), result.stderr
    assert csv.stat().st_size > 0, result.stderr
    assert len(csv.read_text().splitlines()) >= len(golden.splitlines()) - 1


def test_decode_to_a_pipe_whose_reader_goes_away_exits_quietly(mcast_trio_cli, astropix_data, tmp_path):
    """``decode run.apx --to npz -o /dev/stdout | head -c 10``: issue 13
    point 9 says a reader that goes away ends any printing subcommand
    quietly with exit 0 (listen, monitor do). Found: "Error: /dev/stdout:
    Broken pipe", exit 1."""
    src = tmp_path / "run.apx"
    shutil.copyfile(astropix_data / "20250723_092534_data.apx", src)
    proc = subprocess.Popen([*mcast_trio_cli, "decode", str(src), "--to", "npz", "-o", "/dev/stdout"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Broken pipe" not in err and "Traceback" not in err, err


def test_check_repair_onto_a_full_disk_leaves_no_partial_file(mcast_trio_cli, astropix_data, tmp_path):
    """``check DAMAGED --repair OUT`` onto a full 12 KiB tmpfs (the real run,
    one record header damaged). Found: exit 1 with a 40-line traceback
    (OSError ENOSPC from ApxWriter.close's flush, during handling of which
    another exception occurred), and OUT is left behind: 12,288 bytes, 312
    of the 774 recovered records and a truncated last record, a file that
    passes for a repair of a shorter run (Ctrl-C during a repair leaves a
    partial OUT too). What should hold (as for decode, issue 13 point 11):
    one line, exit 1, no partial OUT."""
    _needs_unshare()
    data = bytearray((astropix_data / "20250723_092534_data.apx").read_bytes())
    at = data.find(HEADER, 20000)
    data[at + 1] ^= 4
    src = tmp_path / "damaged.apx"
    src.write_bytes(bytes(data))
    disk = tmp_path / "full"
    disk.mkdir()
    argv = " ".join(f"'{a}'" for a in mcast_trio_cli)
    script = (
        f"mount -t tmpfs -o size=12k tmpfs '{disk}' && "
        f"{argv} check '{src}' --repair '{disk}/r.apx'; echo \"rc=$?\"; ls -A '{disk}'"
    )
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    lines = [x for x in result.stdout.strip().splitlines() if x.startswith("rc=") or x == "r.apx"]
    assert "rc=1" in lines, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    assert "r.apx" not in lines, "a partial repaired file is left: " + result.stdout + result.stderr

