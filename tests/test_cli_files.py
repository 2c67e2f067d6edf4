"""``mcast-trio decode``, ``info``, ``check`` and ``plot``, run as a user runs
them (subprocesses) on real files: the shared golden run, a simulated run
with many split hits, and damaged copies."""

from __future__ import annotations

import csv
import json
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
