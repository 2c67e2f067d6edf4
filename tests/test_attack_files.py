"""Attacks on the ``.apx`` reader and the file tools after the fixes of
issue 13 (points 5, 7, 11, 12, 13), by a tester who did not write them.

Every test states what should hold; each failed on the code it was written
against.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import struct
import subprocess
import time
import warnings

import pytest

from mcast_trio._apx import ApxReader

HEADER = b"\xfe\xdc\xba"


def run(cli, *args, timeout=60, **kwargs):
    return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def rec(i: int, data: bytes, length: int | None = None) -> bytes:
    """A serialized readout (id ``i``), its length field ``length`` if given."""
    return HEADER + struct.pack("<IQI", i, 1_700_000_000_000_000_000 + i, len(data) if length is None else length) + data


def apx(body: bytes, header: bytes = b'{"readout_uid": 4000}') -> bytes:
    return b"%APXDF" + struct.pack("<I", len(header)) + header + body


def read(data: bytes, recover: bool = True):
    """(offset, size) of every record delivered, and the statistics."""
    reader = ApxReader(io.BytesIO(data), recover=recover)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = [(offset, len(record)) for offset, record in reader.records_with_offsets()]
    return got, reader.statistics()


def _tiles(body_records: list[bytes], data_offset: int) -> list[tuple[int, int]]:
    out, at = [], data_offset
    for r in body_records:
        out.append((at, len(r)))
        at += len(r)
    return out


# -- genuine records whose data holds record headers ---------------------------------------------


def test_a_clean_record_whose_data_ends_with_a_record_is_not_reported_damaged():
    """A record written by a healthy writer, whose data happens to end with
    the bytes of a complete record (hit bytes are arbitrary: ``fe`` is the
    start byte of chip 30), is read as the record it is; the file is clean.
    Found: record 1 reported as damage ("records start inside it") and the
    fake record in its data delivered as a record of its own."""
    records = [rec(0, b"a" * 8), rec(1, b"\xe0" * 8 + rec(99, b"Q" * 5)), rec(2, b"b" * 8)]
    data = apx(b"".join(records))
    got, stats = read(data)
    assert stats.damaged == ()
    assert got == _tiles(records, len(data) - sum(map(len, records)))


def test_one_flipped_length_bit_onto_a_record_inside_the_data_is_not_read_silently():
    """One flipped bit of a length field (40 -> 8) makes record 1 end where
    its data holds a complete record (32 bytes) that ends exactly at record
    2. Found: the file reads as four clean records, record 1 cut at the
    wrong place and delivered as good, and its tail delivered as a record:
    no damage reported. What should hold: the cut record is not delivered
    as good without damage being reported (the promise of the format page:
    a flipped length byte never yields a wrongly cut record delivered as
    good)."""
    fake = rec(99, b"Q" * 13)
    assert len(fake) == 32
    r1 = bytearray(rec(1, b"\xe0" * 8 + fake))
    assert r1[15] == 40
    r1[15] ^= 32  # one bit
    records = [rec(0, b"a" * 8), bytes(r1), rec(2, b"b" * 8)]
    data = apx(b"".join(records))
    got, stats = read(data)
    start = len(data) - sum(map(len, records))
    wrong_cut = (start + len(records[0]), 19 + 8)
    assert not (wrong_cut in got and stats.damaged == ()), (got, stats.damaged)


@pytest.mark.parametrize("second", [2, 17], ids=["header-byte", "length-byte"])
def test_a_length_flip_and_a_flip_in_the_next_record_are_not_read_silently(tmp_path, mcast_trio_cli, second):
    """Two flipped bits in two adjacent records of random data: bit 5 of
    record 3's length (13 -> 45 data bytes, so it spans record 4) and one
    bit of record 4's ``fe dc ba`` or of its length field (byte 2 of it,
    bit 0). Found: 9 clean records, record 3 delivered with record 4 inside
    it; ``check`` says clean, exit 0 (a census of 3,000 random double and
    triple flips of a simulated file: 4 such silent wrong cuts). What should
    hold: the damage is reported (record 4's fixed part, with the next id
    and timestamp, lies whole inside record 3)."""
    import random

    rnd = random.Random(1)
    records = [rec(i, bytes(rnd.randrange(256) for _ in range(13))) for i in range(10)]
    r3, r4 = bytearray(records[3]), bytearray(records[4])
    r3[15] ^= 32
    r4[second] ^= 1
    records[3], records[4] = bytes(r3), bytes(r4)
    data = apx(b"".join(records))
    got, stats = read(data)
    assert stats.damaged != (), got
    path = tmp_path / "double.apx"
    path.write_bytes(data)
    result = run(mcast_trio_cli, "check", str(path))
    assert result.returncode == 1, result.stdout + result.stderr


# -- time out of proportion ----------------------------------------------------------------------


def _nested_plausible(n: int) -> bytes:
    """``n`` record fixed parts back to back (y_i), each plausible (its
    length leads to a record header T_i) and each holding, far inside, a
    chain of records (x, then z to the end of the file): each is damage,
    found only after checking every later y_j. The T_i are record headers
    with a length past the end of the file, inside x's data."""
    body = bytearray()
    for i in range(n):
        # y_i at 19 i, T_i at 19 n + 19 + 19 i (x's data): 19 n data bytes
        body += HEADER + struct.pack("<IQI", i, 0, 19 * n)
    xdata = (HEADER + b"\0" * 12 + struct.pack("<I", 0xFFFFFFF0)) * n
    body += rec(n, xdata) + rec(n + 1, b"z" * 10)
    return bytes(body)


def test_recovering_a_small_hostile_file_takes_time_in_proportion():
    """800 plausible record headers (30 KB): recovering reads are
    quadratic in them (each damaged record's inner-chain search walks every
    later header). Found: ~13 s for 57 KB, 22 s for 76 KB, 65 s for 152 KB
    (``mcast-trio check``/``info``, which read with recover=True); a 1 MB
    file would take hours. What should hold: a 57 KB file is read in well
    under 1 s (found: ~3 s; 1,500 headers, 57 KB: ~13 s)."""
    data = apx(_nested_plausible(800))
    assert len(data) < 31_000
    t = time.monotonic()
    got, stats = read(data)
    elapsed = time.monotonic() - t
    assert stats.finished
    assert elapsed < 1.0, f"{elapsed:.1f} s for {len(data)} bytes"


# -- decode onto a full disk, every format ---------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "npz", "parquet", "hdf5"])
def test_decode_onto_a_full_disk_is_one_line_in_every_format(mcast_trio_cli, astropix_data, tmp_path, fmt):
    """decode onto a full 12 KiB tmpfs: one line, exit 1, nothing left.
    Found for hdf5: a traceback (RuntimeError from h5py's close), h5py's
    'Exception ignored' blocks, then a segmentation fault (exit 139)."""
    pytest.importorskip({"parquet": "pyarrow", "hdf5": "h5py"}.get(fmt, "numpy"))
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare for a private tmpfs")
    src = tmp_path / "run.apx"
    shutil.copyfile(astropix_data / "20250723_092534_data.apx", src)
    disk = tmp_path / "full"
    disk.mkdir()
    argv = " ".join(f"'{a}'" for a in mcast_trio_cli)
    script = (
        f"mount -t tmpfs -o size=12k tmpfs '{disk}' && "
        f"{argv} decode '{src}' --to {fmt} -o '{disk}/out.{fmt}'; echo \"rc=$?\"; ls -A '{disk}'"
    )
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    lines = result.stdout.strip().splitlines()
    assert lines and lines[0] == "rc=1", result.stdout + result.stderr
    assert lines[1:] == [], f"left in the full disk: {lines[1:]}"
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# -- memory out of proportion ----------------------------------------------------------------------

_HWM = r"""
import sys, runpy
sys.argv = ["mcast-trio", *sys.argv[1:]]
try:
    runpy.run_module("mcast_trio.cli", run_name="__main__")
except SystemExit:
    pass
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        print("HWM", int(line.split()[1]), file=sys.stderr)
"""


def _peak_kb(cli_python, *args) -> int:
    result = subprocess.run([cli_python, "-c", _HWM, *args], capture_output=True, text=True, timeout=60,
                            env={**os.environ})
    line = [x for x in result.stderr.splitlines() if x.startswith("HWM ")]
    assert line, result.stderr[-2000:]
    return int(line[-1].split()[1])


@pytest.mark.parametrize("command", ["info", "check"])
def test_many_small_damaged_regions_do_not_grow_memory_with_the_file(tmp_path, command):
    """A 4 MiB file of units "record, record, one garbage byte" (107,000
    damaged regions, as many records): ``info`` and ``check`` keep every
    DamagedRegion (with its message) in memory. Found: peak RSS +46 MB over
    a clean file of the same size (+92 MB for 8 MiB: ~11 bytes of memory
    per byte of file, so a 1 GB hostile file needs ~12 GB). What should
    hold: the reader streams; memory stays bounded (here: within 16 MB of
    reading a clean file of the same size)."""
    import sys

    unit = rec(0, b"") + rec(1, b"") + b"\x00"
    n = (4 << 20) // len(unit)
    bad = tmp_path / "bad.apx"
    bad.write_bytes(apx(unit * n))
    good = tmp_path / "good.apx"
    good.write_bytes(apx(rec(0, b"") * (len(unit) * n // 19)))
    base = _peak_kb(sys.executable, command, str(good))
    peak = _peak_kb(sys.executable, command, str(bad))
    assert peak - base < 16 * 1024, f"peak {peak} kB, clean file {base} kB"


def _read_time(data: bytes) -> float:
    t = time.monotonic()
    read(data)
    return time.monotonic() - t


def test_a_file_of_near_headers_is_read_in_time_comparable_to_a_clean_file():
    """1 MiB of ``fe dc ba`` repeated after a valid file header: every third
    byte is a candidate record header, each judged in Python with a few
    seeks and reads. Found: ~1.0 s per MiB (``info``/``check`` of 50 MiB:
    109 s and 114 s, while a clean 50 MiB file takes 1.3 s and 2.1 s, and
    50 MiB of random bytes 0.5 s): linear, but ~80x a clean file. What
    should hold: within 10x of a clean file of the same size."""
    from mcast_trio.sim import DaqSimulator

    sim = DaqSimulator(1, start_ns=1_700_000_000_000_000_000)
    clean = b""
    while len(clean) < 1 << 20:
        clean += b"".join(sim.datagrams(2000))
    hostile = HEADER * (len(clean) // 3)
    base = min(_read_time(apx(clean)) for _ in range(2))
    took = _read_time(apx(hostile))
    assert took < max(10 * base, 0.1), f"{took:.2f} s, clean file of the same size {base:.3f} s"


# -- tools agree on what is damaged ----------------------------------------------------------------


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


# -- decode's output ------------------------------------------------------------------------------


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


def test_a_huge_length_read_from_a_pipe_does_not_buffer_the_stream(tmp_path):
    """``cat run.apx | mcast-trio info /dev/stdin`` where the second record's
    length field says 0xFFFFFF00 and 24 MiB of random bytes follow: the
    reader cannot seek, so it buffers everything up to the claimed end of
    the record (the whole stream). Found: peak RSS +2 bytes per byte of the
    stream (50 MiB: 147 MB against 48 MB for the same file by path); a
    4 GB stream would need 8 GB. What should hold: memory bounded (here:
    within 16 MB of reading the same file by path)."""
    import sys

    body = rec(0, b"\xe0" * 8) + HEADER + bytes(12) + struct.pack("<I", 0xFFFFFF00) + os.urandom(24 << 20)
    path = tmp_path / "huge.apx"
    path.write_bytes(apx(body))
    by_path = _peak_kb(sys.executable, "info", str(path))
    with open(path, "rb") as f:
        cat = subprocess.Popen(["cat"], stdin=f, stdout=subprocess.PIPE)
        result = subprocess.run([sys.executable, "-c", _HWM, "info", "/dev/stdin"], stdin=cat.stdout,
                                capture_output=True, text=True, timeout=60)
        cat.stdout.close()
        cat.wait()
    line = [x for x in result.stderr.splitlines() if x.startswith("HWM ")]
    assert line, result.stderr[-2000:]
    by_pipe = int(line[-1].split()[1])
    assert "truncated" in result.stdout + result.stderr
    assert by_pipe - by_path < 16 * 1024, f"pipe {by_pipe} kB, path {by_path} kB"


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
