"""Bounded fuzzing of mcast_trio's parsers: ``make fuzz`` runs this.

Usage::

    python fuzz/run.py [--engine auto|atheris|mutate] [--runs N] [--seconds S]
                       [--rss-limit-mb M] [--artifacts DIR] [TARGET ...]
    python fuzz/run.py --replay build/fuzz/crash-batch-....bin batch

Targets (default: all): ``readout`` (AstroPix4Readout.from_bytes + decode),
``batch`` (decode_readouts, compiled == reference), ``native`` (parse_header,
NativeDecoder.feed), ``mcl`` (MclDecoder.feed), ``apx`` (open_apx/ApxReader
on io.BytesIO). See ``fuzz_targets.py`` for what each one checks.

Each target runs in its own process, for ``--runs`` inputs (default one
million) or ``--seconds`` seconds, whichever comes first, with atheris
(libFuzzer, coverage of the Python code) when it is installed, else with the
pure-Python mutational engine (``--engine`` forces one). The run fails if a
target raises an undocumented exception, violates an oracle, or if the
process' resident memory grows by more than ``--rss-limit-mb`` MiB per
million inputs after the warm-up. Failing inputs, shrunk reproducers and the
libFuzzer logs go to ``--artifacts`` (default ``build/fuzz``).

The package under test is the one ``import mcast_trio`` finds (``make fuzz``
runs it against the installed package, like ``make test``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULT_PREFIX = "FUZZRESULT "
ALL_TARGETS = ("readout", "batch", "native", "mcl", "apx")


def _atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range; allowed: >= 1")
    return value


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="*", metavar="TARGET", help=f"some of {', '.join(ALL_TARGETS)} (default: all)")
    p.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto")
    p.add_argument("--runs", type=_positive_int, default=1_000_000, help="inputs per target (default 1000000)")
    p.add_argument("--seconds", type=float, default=0.0, help="time limit per target; 0: none (default)")
    p.add_argument("--rss-limit-mb", type=float, default=4.0,
                   help="allowed RSS growth per million inputs after warm-up, MiB (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mutational engine")
    p.add_argument("--artifacts", type=pathlib.Path, default=pathlib.Path("build/fuzz"))
    p.add_argument("--progress", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--replay", type=pathlib.Path, metavar="FILE",
                   help="run the (single) TARGET on the input saved in FILE and show what happens")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [t for t in args.targets if t not in ALL_TARGETS]
    if bad:
        p.error(f"unknown target(s) {', '.join(bad)}; allowed: {', '.join(ALL_TARGETS)}")
    if args.seconds < 0:
        p.error(f"--seconds={args.seconds} is out of range; allowed: >= 0")
    args.targets = args.targets or list(ALL_TARGETS)
    return args


def _worker(args) -> int:
    target = args.targets[0]
    artifacts = args.artifacts.resolve()
    if args.engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["mcast_trio"]):
            import mcast_trio  # noqa: F401
        import fuzz_engine

        fuzz_engine.run_atheris(target, runs=args.runs, seconds=args.seconds or None,
                                rss_limit_mb=args.rss_limit_mb, workdir=artifacts / "work", artifacts=artifacts,
                                progress=args.progress)
        return 2  # not reached
    import fuzz_engine

    try:
        result = fuzz_engine.run_mutational(target, runs=args.runs, seconds=args.seconds or None, seed=args.seed,
                                            rss_limit_mb=args.rss_limit_mb, artifacts=artifacts,
                                            progress=args.progress)
    except fuzz_engine.FuzzCrash as crash:
        print(f"FUZZCRASH {crash}", flush=True)
        return 1
    from dataclasses import asdict

    print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)
    return 0 if result.ok else 1


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker:
        return _worker(args)
    if args.replay:
        if len(args.targets) != 1:
            print("--replay needs exactly one TARGET", file=sys.stderr)
            return 2
        import fuzz_targets

        data = args.replay.read_bytes()
        print(f"{args.targets[0]}({len(data)} bytes: {data[:64].hex()}{'...' if len(data) > 64 else ''})")
        print("outcome:", sorted(fuzz_targets.TARGETS[args.targets[0]](data), key=repr))
        return 0
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if _atheris_available() else "mutate"
        if engine == "mutate":
            print("atheris is not installed: using the pure-Python mutational engine (no coverage feedback)")
    elif engine == "atheris" and not _atheris_available():
        print("--engine=atheris but atheris cannot be imported (pip install atheris)", file=sys.stderr)
        return 2
    import mcast_trio

    print(f"fuzzing mcast_trio {mcast_trio.__version__} from {pathlib.Path(mcast_trio.__file__).parent} "
          f"(decoder: {mcast_trio.decoder_backend()}), engine {engine}, {args.runs} inputs"
          f"{f' or {args.seconds:g} s' if args.seconds else ''} per target", flush=True)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    results, failed = [], []
    total_start = time.perf_counter()
    for target in args.targets:
        cmd = [sys.executable, str(HERE / "run.py"), "--worker", target, "--engine", engine,
               "--runs", str(args.runs), "--seconds", str(args.seconds), "--rss-limit-mb", str(args.rss_limit_mb),
               "--seed", str(args.seed), "--artifacts", str(args.artifacts), "--progress", str(args.progress)]
        log = args.artifacts / f"{target}.log"
        # A hard bound even if a worker hangs: its own limits plus a margin.
        timeout = (args.seconds * 1.5 + 300) if args.seconds else 4 * 3600
        print(f"--- {target} (log: {log})", flush=True)
        result = None
        with open(log, "wb") as logf:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, cwd=os.getcwd())
            try:
                for raw in proc.stdout:
                    line = raw.decode(errors="replace").rstrip("\n")
                    if line.startswith(RESULT_PREFIX):
                        result = json.loads(line[len(RESULT_PREFIX):])
                    else:
                        print(line, flush=True)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                print(f"{target}: killed after {timeout:.0f} s", flush=True)
        if result is None:
            tail = log.read_bytes()[-4000:].decode(errors="replace")
            print(f"{target}: FAILED (exit {proc.returncode}); last lines of {log}:\n{tail}", flush=True)
            failed.append(target)
            continue
        import fuzz_engine

        res = fuzz_engine.Result(**result)
        results.append(res)
        print(res.line(), flush=True)
        if not res.ok or proc.returncode != 0:
            failed.append(target)
    print(f"\n=== fuzz summary ({time.perf_counter() - total_start:.0f} s)")
    for res in results:
        print(res.line())
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    print(f"all {len(results)} targets passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
