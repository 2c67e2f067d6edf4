"""``mcast-trio decode``, ``info``, ``check`` and ``plot``: work on ``.apx``
files offline.

All four read the file with the library's :class:`~mcast_trio.ApxReader`
(streaming: a file of any size is read in batches of records) and decode with
:func:`~mcast_trio.decode_readouts`, carrying the extra bytes of a hit split
across two readouts into the next readout when its id follows
(``carry="consecutive"``; astropix-analysis' own converter loses these
hits). They run synchronously, outside trio: nothing here touches the
network.

Exit codes: 0 success; 1 a missing or unreadable file, a damaged file
(``check``; see there), a missing extra; 2 usage.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pathlib
import secrets
import stat
import sys
from collections.abc import Iterator

import click
import numpy as np

from .. import (
    HIT_DTYPE,
    ApxReader,
    ApxWriter,
    DecodingStatus,
    MalformedReadout,
    decode_readouts,
)
from ._common import emit_json, fail, said_once, strict_json
from ._output import reader_gone
from ._common import Number, OutputFile  # the option types

__all__ = ["COMMANDS", "decode", "info", "check", "plot"]

#: Records decoded together (one ``decode_readouts`` call).
_BATCH = 8192

#: Output formats of ``decode``: suffix, and the extra that provides the writer.
_FORMATS = {"csv": (".csv", None), "parquet": (".parquet", "parquet"), "hdf5": (".h5", "hdf5"),
            "npz": (".npz", None)}

#: Rows and columns of the chip matrix the format can address (5-bit fields).
_MATRIX = 32


def _require(module: str, extra: str):
    """Import a heavy optional module or fail naming the extra that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise fail(f"this needs the {extra!r} extra ({exc.name or module} is missing): "
                   f"pip install 'mcast_trio[{extra}]'") from None


def _open(path: pathlib.Path, *, recover: bool = False) -> ApxReader:
    try:
        return ApxReader(path, recover=recover)
    except OSError as exc:
        raise fail(f"{path}: {exc.strerror or exc}") from None
    except MalformedReadout as exc:
        raise fail(f"{path}: not a readable .apx file: {exc}") from None


@contextlib.contextmanager
def _progress(path: pathlib.Path, wanted: bool | None, what: str):
    """A rich progress bar on stderr (when it is a terminal, or asked for with
    ``--progress``); yields ``advance(nbytes)``."""
    if wanted is None:
        wanted = sys.stderr.isatty()
    if not wanted:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    total = os.path.getsize(path)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(f"{what} {path.name}", total=total)
        yield lambda n: bar.advance(task, n)
        bar.update(task, completed=total)


def _decoded(reader: ApxReader, advance=lambda n: None) -> Iterator:
    """Decode the file's records batch by batch, carrying split hits from
    batch to batch exactly as one ``decode_readouts`` call over the whole
    file would (``carry="consecutive"``)."""
    extra, last = None, -1
    for records in reader.batches(_BATCH):
        batch = decode_readouts(records, extra_bytes=extra, last_id=last, carry="consecutive")
        extra, last = batch.extra_bytes, batch.last_id
        advance(sum(map(len, records)))
        yield batch


def _read_error(path, exc: MalformedReadout) -> click.ClickException:
    return fail(f"{path}: damaged: {exc} (`mcast-trio check {path} --repair OUT.apx` recovers the rest)")


# -- decode --------------------------------------------------------------------------------------


def _columns(hits) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(hits[name]) for name in HIT_DTYPE.names}


class _CsvSink:
    """The CSV of astropix-analysis: ``#`` + the JSON header, the column
    names, then one line per hit; floats as Python prints them."""

    def __init__(self, path, header: dict, mode: str = "x") -> None:
        self.f = open(path, mode, newline="")
        self.f.write("#" + json.dumps(header) + "\n" + ",".join(HIT_DTYPE.names) + "\n")

    def write(self, hits) -> None:
        if len(hits):
            columns = [hits[name].tolist() for name in HIT_DTYPE.names]
            self.f.write("".join(",".join(map(str, row)) + "\n" for row in zip(*columns)))

    def close(self) -> None:
        self.f.close()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()


class _ParquetSink:
    def __init__(self, path, header: dict, mode: str = "x") -> None:
        self.pa = _require("pyarrow", "parquet")
        self.pq = _require("pyarrow.parquet", "parquet")
        self.schema = self.pa.schema([(name, self.pa.from_numpy_dtype(HIT_DTYPE[name])) for name in HIT_DTYPE.names],
                                     metadata={b"apx_header": json.dumps(header).encode()})
        self.f = open(path, mode + "b")
        self.writer = self.pq.ParquetWriter(self.f, self.schema)

    def write(self, hits) -> None:
        if len(hits):
            columns = _columns(hits)
            self.writer.write_table(self.pa.table([columns[n] for n in HIT_DTYPE.names], schema=self.schema))

    def close(self) -> None:
        self.writer.close()
        self.f.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(OSError):
            self.f.close()


class _Hdf5Sink:
    """The HDF5 file is built in memory (gzip-compressed chunks) and written
    to ``path`` in one go when complete: a write that fails (a full disk)
    is then a plain ``OSError`` of ours, never a failure inside HDF5's own
    I/O, after which h5py can leave the interpreter in a state that crashes
    (a segmentation fault on a full disk)."""

    def __init__(self, path, header: dict, mode: str = "x") -> None:
        h5py = _require("h5py", "hdf5")
        packed = np.dtype([(name, HIT_DTYPE[name]) for name in HIT_DTYPE.names])
        self.packed = packed
        self.out = open(path, mode + "b")
        self.f = h5py.File(f"{path}.in-memory", "w", driver="core", backing_store=False)
        self.f.attrs["apx_header"] = json.dumps(header)
        self.d = self.f.create_dataset("hits", shape=(0,), maxshape=(None,), dtype=packed, chunks=(65536,),
                                       compression="gzip")

    def write(self, hits) -> None:
        if len(hits):
            rows = np.empty(len(hits), dtype=self.packed)
            for name in HIT_DTYPE.names:
                rows[name] = hits[name]
            n = self.d.shape[0]
            self.d.resize((n + len(rows),))
            self.d[n:] = rows

    def close(self) -> None:
        self.f.flush()
        image = self.f.id.get_file_image()
        self.f.close()
        self.out.write(image)
        self.out.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.f.close()
        with contextlib.suppress(OSError):
            self.out.close()


class _NpzSink:
    """One array per column plus ``apx_header`` (a JSON string); collected in
    memory, written at the end (npz is a zip of whole arrays)."""

    def __init__(self, path, header: dict, mode: str = "x") -> None:
        self.f = open(path, mode + "b")
        self.header = header
        self.parts: list[np.ndarray] = []

    def write(self, hits) -> None:
        if len(hits):
            self.parts.append(np.asarray(hits).copy())

    def close(self) -> None:
        hits = np.concatenate(self.parts) if self.parts else np.zeros(0, HIT_DTYPE)
        np.savez_compressed(self.f, apx_header=np.array(json.dumps(self.header)), **_columns(hits))
        self.f.close()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()


_SINKS = {"csv": _CsvSink, "parquet": _ParquetSink, "hdf5": _Hdf5Sink, "npz": _NpzSink}

_progress_option = click.option("--progress/--no-progress", default=None,
                                help="Progress bar on stderr [default: when stderr is a terminal].")


@click.command()
@click.argument("file", type=click.Path(path_type=pathlib.Path))
@click.option("--to", "fmt", type=click.Choice(sorted(_FORMATS)), default="csv", show_default=True,
              help="Output format.")
@click.option("--out", "-o", type=OutputFile(), default=None,
              help="Output file [default: FILE with the format's suffix].")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@_progress_option
def decode(file: pathlib.Path, fmt: str, out: pathlib.Path | None, force: bool, progress: bool | None) -> None:
    """Decode FILE.apx into a table of hits (one row per hit).

    The columns are those of astropix-analysis' CSV (chip_id, payload,
    readout_id, timestamp, decoding_order, row, column, ts_*, tot_us), with
    its header line ``#{json}`` in CSV; the file header is kept as metadata
    (``apx_header``) in parquet, hdf5 (attribute of the file; dataset
    ``hits``) and npz (one array per column). A hit split across two
    readouts is completed from the next readout when its id follows.
    parquet needs the 'parquet' extra, hdf5 the 'hdf5' extra. An existing
    output file is not replaced without --force, and the input file never
    is. The table is written under a temporary name beside the output
    (``.NAME.XXXXXXXX.part``) and renamed when complete: a failure (a full
    disk, damage in FILE, Ctrl-C) leaves no partial table. An output that
    is a device or a pipe, a path under /dev or /proc, or the file standard
    output already is (``-o /dev/stdout > run.csv``) is written in place;
    a reader of a pipe that goes away ends decode quietly (exit 0). npz and
    hdf5 tables are built in memory (compressed) and written when complete.

    \b
    Examples:
      mcast-trio decode run.apx                    # run.csv
      mcast-trio decode run.apx --to parquet -o /data/run.parquet
      mcast-trio decode run.apx --to hdf5 --progress
    """
    suffix, _extra = _FORMATS[fmt]
    default = out is None
    out = file.with_suffix(suffix) if default else out
    if _same_file(file, out):
        raise click.UsageError(
            f"{'the default output ' if default else '--out='}{out} is the input file {file}; "
            f"allowed: any other file (decoding into it would destroy the recording)"
        )
    reader = _open(file)
    with reader, said_once("decode", truncation="are decoded"):
        exists = f"{out}: exists (use --force to replace it)"
        sink = None
        try:
            with _output_file(out, replace=force, exists=exists) as (target, direct):
                try:
                    sink = _SINKS[fmt](target, reader.header, "w" if direct else "x")
                except FileExistsError:
                    raise fail(exists) from None
                hits = records = 0
                with _progress(file, progress, "decoding") as advance:
                    for batch in _decoded(reader, advance):
                        sink.write(batch.hits)
                        hits += len(batch.hits)
                        records += len(batch.readouts)
                sink.close()
                sink = None
        except MalformedReadout as exc:
            raise _read_error(file, exc) from None
        except OSError as exc:
            if isinstance(exc, BrokenPipeError) and direct_output(out):
                # The reader of a pipe went away: a quiet end (exit 0).
                reader_gone()
                return
            where = exc.filename if exc.filename is not None and not str(exc.filename).startswith(
                str(out.with_name(f".{out.name}."))) else out
            raise fail(f"{where}: {exc.strerror or exc}") from None
        finally:
            if sink is not None:
                sink.abort()
    click.echo(f"{file}: {records} readouts, {hits} hits -> {out}", err=True)


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Whether ``a`` and ``b`` are the same existing file (same inode, also
    through symlinks and other spellings of the path)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _output_file(out: pathlib.Path, *, replace: bool, exists: str) -> Iterator[tuple[pathlib.Path, bool]]:
    """The one owner of how the file tools write an output file: yields
    ``(path to write, written in place)``.

    The output is written under a temporary name beside it
    (``.NAME.XXXXXXXX.part``) and renamed onto ``out`` when the block ends
    without an exception; otherwise (a full disk, damage, Ctrl-C) the
    temporary file is removed: no partial output is ever left that would
    pass for a complete one. An existing ``out`` is replaced only with
    ``replace`` (else ``exists`` is the error, also when it appeared
    meanwhile: never replaced then). An output that is a device, a pipe,
    a path under /dev or /proc, or the file standard output or standard
    error is (``-o /dev/stdout > run.csv``) is written in place
    (:func:`direct_output`)."""
    direct = direct_output(out)
    if not direct:
        if out.is_dir():
            raise fail(f"{out}: is a directory")
        if not replace and (out.exists() or out.is_symlink()):
            raise fail(exists)
    target = out if direct else out.with_name(f".{out.name}.{secrets.token_hex(4)}.part")
    done = False
    try:
        yield target, direct
        if not direct:
            if replace:
                os.replace(target, out)
            else:
                try:
                    os.link(target, out)  # never replaces what appeared meanwhile
                except FileExistsError:
                    raise fail(exists) from None
                except OSError:  # a file system without hard links
                    if out.exists() or out.is_symlink():
                        raise fail(exists) from None
                    os.rename(target, out)
                else:
                    os.unlink(target)
        done = True
    finally:
        if not done and not direct:
            with contextlib.suppress(OSError):
                os.unlink(target)


def direct_output(path: pathlib.Path) -> bool:
    """Whether ``path`` is written in place, never through a temporary
    file and a rename: a device or a pipe, any path under /dev or /proc
    (``/dev/stdout``, ``/proc/self/fd/1``), or the file that standard
    output or standard error already is (``-o /dev/stdout > run.csv``,
    where /dev/stdout resolves to run.csv)."""
    if _is_special(path):
        return True
    absolute = os.path.abspath(path)
    if absolute.startswith(("/dev/", "/proc/")):
        return True
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    for fd in (1, 2):
        try:
            other = os.fstat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino):
            return True
    return False


def _is_special(path: pathlib.Path) -> bool:
    """Whether ``path`` exists and is not a regular file or a directory (a
    device, a pipe): written in place, never replaced."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


# -- info ----------------------------------------------------------------------------------------


def _summary(file: pathlib.Path, progress: bool | None) -> dict:
    """Everything ``info`` reports, read in one pass (damage skipped and
    counted)."""
    reader = _open(file, recover=True)
    flags: collections.Counter = collections.Counter()
    first_ts = last_ts = None
    hits = records = malformed = id_gaps = dropped_bytes = 0
    prev_id = None
    with reader, _progress(file, progress, "reading") as advance:
        for batch in _decoded(reader, advance):
            rows = batch.readouts
            records += len(rows)
            malformed += batch.n_malformed
            good = rows[~rows.malformed]
            hits += len(batch.hits)
            dropped_bytes += int(good.dropped_bytes.sum())
            if len(good):
                ts = good.timestamp
                lo, hi = int(ts.min()), int(ts.max())
                first_ts = lo if first_ts is None else min(first_ts, lo)
                last_ts = hi if last_ts is None else max(last_ts, hi)
                ids = good.readout_id.astype(np.int64)
                if prev_id is not None:
                    id_gaps += int(ids[0] != (prev_id + 1) % (1 << 32))
                id_gaps += int(np.count_nonzero(np.diff(ids) % (1 << 32) != 1))
                prev_id = int(ids[-1])
                statuses, counts = np.unique(good.status, return_counts=True)
                for status, count in zip(statuses.tolist(), counts.tolist()):
                    for flag in DecodingStatus:
                        if status & flag:
                            flags[flag.name] += count
                    if status == 0:
                        flags["none"] += count
        stats = reader.statistics()
        header = reader.header
        data_offset = reader.data_offset
    span = (last_ts - first_ts) / 1e9 if first_ts is not None else 0.0
    return {
        "file": str(file),
        "size": os.path.getsize(file),
        "header": header,
        "data_offset": data_offset,
        "records": records,
        "record_bytes": stats.record_bytes,
        "hits": hits,
        "first_timestamp_ns": first_ts,
        "last_timestamp_ns": last_ts,
        "span_s": span,
        "rate_hz": (records - 1) / span if span > 0 else None,
        "hit_rate_hz": hits / span if span > 0 else None,
        "id_gaps": id_gaps,
        "flags": dict(flags),
        "dropped_bytes": dropped_bytes,
        "malformed": malformed,
        "damaged_regions": stats.damaged_count,
        "bytes_skipped": stats.bytes_skipped,
        "truncated_bytes": stats.truncated.size if stats.truncated is not None else 0,
    }


def _ts(ns: int | None) -> str:
    if ns is None:
        return "-"
    import datetime

    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).isoformat(timespec="milliseconds")


@click.command()
@click.argument("file", type=click.Path(path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object on stdout (strict JSON: null where a number is not finite).")
@_progress_option
def info(file: pathlib.Path, as_json: bool, progress: bool | None) -> None:
    """Summarize FILE.apx: header, readouts, hits, time span, rates, flags.

    Reads the whole file (damaged regions are skipped and counted, as
    `check` does). Time span and rates come from the readout timestamps;
    ``id gaps`` counts places where a readout id does not follow the
    previous one (lost or reordered readouts, or a new run); ``flags``
    counts readouts per DecodingStatus bit. With --json the output is strict
    JSON (RFC 8259): a value that is not a finite number (NaN or an
    infinity in the file's JSON header) is null. A truncated last record is
    noted once on stderr.

    \b
    Examples:
      mcast-trio info run.apx
      mcast-trio info run.apx --json | jq .rate_hz
    """
    with said_once("info", truncation="are counted"):
        s = _summary(file, progress)
    if as_json:
        emit_json(strict_json(s))
        return
    meta = {k: v for k, v in s["header"].items() if k != "readout_uid"}
    lines = [
        f"file          {s['file']} ({s['size']} bytes)",
        f"header        readout_uid {s['header'].get('readout_uid')}, "
        f"{len(meta)} more keys: {', '.join(meta) or '-'}",
        f"readouts      {s['records']} ({s['record_bytes']} bytes)",
        f"hits          {s['hits']}",
        f"time span     {s['span_s']:.6f} s  ({_ts(s['first_timestamp_ns'])} .. {_ts(s['last_timestamp_ns'])})",
        f"mean rate     {s['rate_hz']:.3f} readouts/s, {s['hit_rate_hz']:.3f} hits/s" if s["rate_hz"] else
        "mean rate     -",
        f"id gaps       {s['id_gaps']}",
        "flags         " + (", ".join(f"{k} {v}" for k, v in sorted(s["flags"].items())) or "-"),
        f"dropped bytes {s['dropped_bytes']}",
        f"malformed     {s['malformed']}",
        f"damage        {s['damaged_regions']} regions, {s['bytes_skipped']} bytes skipped, "
        f"{s['truncated_bytes']} bytes truncated at the end",
    ]
    recorder = meta.get("recorder")
    if isinstance(recorder, dict):
        lines.insert(2, "recorder      " + ", ".join(f"{k} {v}" for k, v in recorder.items() if k != "command"))
    click.echo("\n".join(lines))


# -- check ---------------------------------------------------------------------------------------


@click.command()
@click.argument("file", type=click.Path(path_type=pathlib.Path))
@click.option("--repair", type=OutputFile(), default=None, metavar="OUT.apx",
              help="Write the recovered records (same header) to a new file (never replaced).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout (strict JSON).")
def check(file: pathlib.Path, repair: pathlib.Path | None, as_json: bool) -> None:
    """Check FILE.apx for damage: damaged regions, bytes skipped, records
    recovered, a truncated last record.

    The first 1000 damaged regions are listed, all are counted. --repair
    writes OUT.apx as decode writes its table: under a temporary name,
    renamed when complete, so a failure (a full disk, Ctrl-C) leaves none.

    Exit status: 0 the file is clean; 1 damage was found (also with
    --repair, which still writes OUT.apx with every record that could be
    recovered, so a script can tell a repaired file from a clean one), or
    the file cannot be read at all (missing, not an .apx file).

    \b
    Examples:
      mcast-trio check run.apx && echo clean
      mcast-trio check run.apx --repair run-repaired.apx
    """
    reader = _open(file, recover=True)
    # A truncated last record is part of the report below: said once, there.
    with reader, said_once("check", truncation=None):
        if repair is None:
            for _records in reader.batches(_BATCH):
                pass
        else:
            _repair(reader, repair)
        stats = reader.statistics()
    damaged = bool(stats.damaged) or stats.truncated is not None
    result = {
        "file": str(file),
        "clean": not damaged,
        "records": stats.records,
        "record_bytes": stats.record_bytes,
        "damaged_regions": [{"offset": d.offset, "size": d.size, "index": d.index, "reason": d.reason}
                            for d in stats.damaged],
        "damaged_count": stats.damaged_count,
        "bytes_skipped": stats.bytes_skipped,
        "truncated": None if stats.truncated is None else {"offset": stats.truncated.offset,
                                                            "size": stats.truncated.size},
        "repaired": str(repair) if repair is not None else None,
    }
    if as_json:
        emit_json(strict_json(result))
    else:
        if not damaged:
            click.echo(f"{file}: clean, {stats.records} records")
        else:
            for d in stats.damaged:
                click.echo(f"damaged at offset {d.offset}: {d.size} bytes skipped (record {d.index}): {d.reason}")
            if stats.damaged_count > len(stats.damaged):
                click.echo(f"... and {stats.damaged_count - len(stats.damaged)} more damaged regions "
                           f"(the first {len(stats.damaged)} are listed)")
            if stats.truncated is not None:
                click.echo(f"truncated last record at offset {stats.truncated.offset}: {stats.truncated.size} bytes")
            click.echo(f"{file}: DAMAGED, {stats.damaged_count} regions, {stats.bytes_skipped} bytes skipped, "
                       f"{stats.records} records recovered"
                       + (f", written to {repair}" if repair is not None else ""))
    if damaged:
        raise SystemExit(1)


def _repair(reader: ApxReader, repair: pathlib.Path) -> None:
    """Write every record ``reader`` recovers to ``repair`` (a new file),
    through :func:`_output_file`: a failure leaves no partial file."""
    exists = f"{repair}: exists; --repair writes a new file"
    writer = None
    try:
        with _output_file(repair, replace=False, exists=exists) as (target, direct):
            try:
                writer = ApxWriter(target, reader.header, flush="none", mode="wb" if direct else "xb")
            except FileExistsError:
                raise fail(exists) from None
            for records in reader.batches(_BATCH):
                writer.write_many(records)
            writer.close()
    except OSError as exc:
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()
        raise fail(f"{repair}: {exc.strerror or exc}") from None


# -- plot ----------------------------------------------------------------------------------------


@click.command()
@click.argument("file", type=click.Path(path_type=pathlib.Path))
@click.option("--out", "-o", "out_dir", type=click.Path(path_type=pathlib.Path), default=None,
              help="Directory for the PNG files [default: beside FILE].")
@click.option("--log/--linear", default=False, help="Log colour scale of the hit map [default: linear].")
@click.option("--bins", type=Number(1, 10000, integer=True), default=100, show_default=True,
              help="TOT histogram bins.")
@_progress_option
def plot(file: pathlib.Path, out_dir: pathlib.Path | None, log: bool, bins: int, progress: bool | None) -> None:
    """Plot FILE.apx: hit map, TOT spectrum and rate over time, as PNG files
    (STEM-hitmap.png, STEM-tot.png, STEM-rate.png) in --out.

    The hit map is sized from the data (up to the 32 x 32 pixels that the
    format's 5-bit row and column fields can address). Damaged regions
    are skipped (as `check` finds them) and said on stderr: their number,
    bytes and the first one. Needs the 'plot' extra (matplotlib; drawn
    off-screen).

    \b
    Examples:
      mcast-trio plot run.apx --out plots/
      mcast-trio plot run.apx --out plots/ --log --bins 200
    """
    matplotlib = _require("matplotlib", "plot")
    matplotlib.use("Agg")
    plt = _require("matplotlib.pyplot", "plot")
    out_dir = out_dir if out_dir is not None else file.parent
    with said_once("plot", truncation="are plotted"):
        _plot(file, out_dir, log, bins, progress, plt)


def _say_damage(command: str, file: pathlib.Path, stats) -> None:
    """Say on stderr, in the tool's words, the damaged regions a reading
    with recover=True skipped (the first ones, and how many in all)."""
    if not stats.damaged_count:
        return
    first = stats.damaged[0]
    click.echo(f"{command}: {file}: {stats.damaged_count} damaged regions skipped ({stats.bytes_skipped} bytes), "
               f"the first at offset {first.offset} (record {first.index}): {first.reason}; "
               f"`mcast-trio check {file}` lists them", err=True)


def _save(plt, fig, path: pathlib.Path) -> None:
    """Write one PNG; a file that cannot be written is one line (exit 1)."""
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise fail(f"{path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def _plot(file: pathlib.Path, out_dir: pathlib.Path, log: bool, bins: int, progress: bool | None, plt) -> None:
    reader = _open(file, recover=True)
    hitmap = np.zeros((_MATRIX, _MATRIX), np.int64)
    tots: list[np.ndarray] = []
    stamps: list[np.ndarray] = []
    with reader, _progress(file, progress, "reading") as advance:
        for batch in _decoded(reader, advance):
            hits = batch.hits
            np.add.at(hitmap, (hits.row.astype(np.intp), hits.column.astype(np.intp)), 1)
            tots.append(np.asarray(hits.tot_us, dtype=float))
            good = batch.readouts[~batch.readouts.malformed]
            stamps.append(np.asarray(good.timestamp, dtype=np.uint64))
        _say_damage("plot", file, reader.statistics())
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(f"{out_dir}: {exc.strerror or exc}") from None
    tot = np.concatenate(tots) if tots else np.zeros(0)
    ts = np.concatenate(stamps) if stamps else np.zeros(0, np.uint64)
    used = np.argwhere(hitmap)
    n_rows = int(used[:, 0].max()) + 1 if len(used) else 1
    n_cols = int(used[:, 1].max()) + 1 if len(used) else 1
    stem = file.stem
    written = []

    fig, ax = plt.subplots(figsize=(6, 5))
    data = hitmap[:n_rows, :n_cols]
    from matplotlib.colors import LogNorm

    image = ax.imshow(np.where(data > 0, data, np.nan) if log else data, origin="lower", aspect="auto",
                      norm=LogNorm(vmin=1, vmax=max(1, int(data.max()))) if log else None, cmap="viridis")
    fig.colorbar(image, ax=ax, label="hits")
    ax.set(xlabel="column", ylabel="row", title=f"{file.name}: hit map ({int(hitmap.sum())} hits)")
    written.append(out_dir / f"{stem}-hitmap.png")
    _save(plt, fig, written[-1])

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(tot, bins=bins)
    ax.set(xlabel="TOT (us)", ylabel="hits", title=f"{file.name}: TOT spectrum")
    written.append(out_dir / f"{stem}-tot.png")
    _save(plt, fig, written[-1])

    fig, ax = plt.subplots(figsize=(6, 4))
    if len(ts):
        seconds = (ts - ts.min()).astype(np.float64) / 1e9
        span = float(seconds.max())
        width = max(span / 100, 1e-3)
        counts, edges = np.histogram(seconds, bins=max(1, int(np.ceil(span / width))) if span > 0 else 1)
        widths = np.diff(edges)
        ax.step(edges[:-1], counts / np.where(widths > 0, widths, 1), where="post")
    ax.set(xlabel="time since first readout (s)", ylabel="readouts/s", title=f"{file.name}: readout rate")
    written.append(out_dir / f"{stem}-rate.png")
    _save(plt, fig, written[-1])
    for path in written:
        click.echo(str(path))


COMMANDS = [decode, info, check, plot]
