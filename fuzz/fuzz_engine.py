"""Fuzzing engines for the targets of ``fuzz_targets``.

* :func:`run_mutational`: a pure-Python, coverage-less mutational fuzzer:
  random inputs and stacked mutations of a seed corpus (bit flips, byte
  insert/delete, interesting bytes such as ``bc``, ``ff``, ``e0``..``fe``,
  dictionary tokens, interesting 32-bit values, chunk copies, splices,
  truncation). An input that produces an outcome feature the target never
  reported before joins the corpus: a cheap stand-in for coverage. It runs
  in-process, is deterministic for a given ``seed``, and is what the smoke
  test uses.
* :func:`run_atheris`: atheris (libFuzzer) with the Python code of
  ``mcast_trio`` instrumented for coverage (the pure-Python reference
  decoder mirrors the compiled one line by line, so its coverage guides the
  fuzzer through the compiled decoder's branches too). It never returns:
  it prints the result and ends the process.

Both measure the resident set size (``VmRSS``) after a warm-up and at the
end, and fail when it grew by more than ``rss_limit_mb`` per million inputs
(at least ``rss_limit_mb``). A failing input is saved in ``artifacts`` and
shrunk (greedy chunk removal) to a small reproducer.
"""

from __future__ import annotations

import faulthandler
import gc
import hashlib
import json
import os
import pathlib
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import fuzz_targets

__all__ = ["FuzzCrash", "Result", "Mutator", "rss_mib", "minimize", "run_mutational", "run_atheris"]

RESULT_PREFIX = "FUZZRESULT "
_INTERESTING_BYTES = (0xBC, 0xBC, 0xFF, 0xFF, 0xE0, 0xE1, 0xFE, 0xDF, 0x00, 0x01, 0x7F, 0x80, 0xC1, 0x5E,
                      0xFE, 0xDC, 0xBA, 0x92, 0x94, 0xC4, 0xD9, 0xDD)
_INTERESTING_U32 = (0, 1, 2, 7, 8, 9, 18, 19, 20, 30, 255, 256, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF,
                    0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)


class FuzzCrash(Exception):
    """A target failed: an undocumented exception or a violated oracle."""

    def __init__(self, target: str, data: bytes, error: BaseException, tb: str, minimized: bytes,
                 saved: pathlib.Path | None) -> None:
        self.target = target
        self.data = data
        self.error = error
        self.traceback = tb
        self.minimized = minimized
        self.saved = saved
        super().__init__(
            f"fuzz target {target!r} failed with {type(error).__name__}: {error}\n"
            f"input ({len(data)} bytes){f', saved to {saved}' if saved else ''}\n"
            f"minimized reproducer ({len(minimized)} bytes): fuzz_targets.TARGETS[{target!r}]"
            f"(bytes.fromhex({minimized.hex()!r}))\n{tb}"
        )


@dataclass
class Result:
    target: str
    engine: str
    inputs: int
    seconds: float
    rate: float
    rss_start_mib: float
    rss_end_mib: float
    rss_growth_mib: float
    rss_limit_mib: float
    corpus: int
    features: int
    slowest_ms: float
    ok: bool
    message: str = ""

    def line(self) -> str:
        status = "OK" if self.ok else "FAIL"
        return (f"{self.target:8s} {self.engine:8s} {self.inputs:>9d} inputs in {self.seconds:7.1f} s "
                f"({self.rate:7.0f}/s)  RSS {self.rss_start_mib:6.1f} -> {self.rss_end_mib:6.1f} MiB "
                f"({self.rss_growth_mib:+.1f}, limit {self.rss_limit_mib:.1f})  corpus {self.corpus}  "
                f"slowest {self.slowest_ms:.1f} ms  {status}{': ' + self.message if self.message else ''}")


def rss_mib() -> float:
    """The resident set size of this process, MiB (``VmRSS``)."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def _rss_limit(limit_per_million: float, inputs: int) -> float:
    return limit_per_million * max(1.0, inputs / 1e6)


class Mutator:
    """Mutations of byte strings, from one ``random.Random``."""

    def __init__(self, rng: random.Random, max_len: int = fuzz_targets.MAX_LEN) -> None:
        self.rng = rng
        self.max_len = max_len
        self.dictionary = fuzz_targets.DICTIONARY
        self._ops = (self._flip, self._flip, self._interesting, self._interesting, self._random_byte,
                     self._insert, self._delete, self._copy_chunk, self._token, self._u32, self._truncate,
                     self._arith, self._swap)

    def random_input(self) -> bytes:
        rng = self.rng
        n = rng.choice((rng.randrange(0, 24), rng.randrange(0, 64), rng.randrange(0, 400)))
        if rng.random() < 0.5:
            return rng.randbytes(n)
        return bytes(rng.choice(_INTERESTING_BYTES) if rng.random() < 0.5 else rng.randrange(256) for _ in range(n))

    def mutate(self, data: bytes, other: bytes | None = None) -> bytes:
        rng = self.rng
        buf = bytearray(data)
        if other is not None and rng.random() < 0.1:
            buf = self._splice(buf, other)
        for _ in range(1 + min(int(rng.expovariate(0.9)), 7)):
            rng.choice(self._ops)(buf)
        if len(buf) > self.max_len:
            del buf[self.max_len:]
        return bytes(buf)

    def _pos(self, buf: bytearray, extra: int = 0) -> int:
        return self.rng.randrange(len(buf) + extra) if len(buf) + extra else 0

    def _flip(self, buf):
        if buf:
            buf[self._pos(buf)] ^= 1 << self.rng.randrange(8)

    def _interesting(self, buf):
        if buf:
            rng = self.rng
            buf[self._pos(buf)] = rng.choice(_INTERESTING_BYTES) if rng.random() < 0.7 else rng.randrange(0xE0, 0xFF)

    def _random_byte(self, buf):
        if buf:
            buf[self._pos(buf)] = self.rng.randrange(256)

    def _arith(self, buf):
        if buf:
            i = self._pos(buf)
            buf[i] = (buf[i] + self.rng.choice((-1, 1)) * self.rng.randrange(1, 36)) & 0xFF

    def _insert(self, buf):
        rng = self.rng
        i = self._pos(buf, 1)
        n = rng.choice((1, 1, 1, 2, 3, 8, rng.randrange(1, 40)))
        byte = rng.choice(_INTERESTING_BYTES) if rng.random() < 0.6 else rng.randrange(256)
        buf[i:i] = bytes([byte]) * n if rng.random() < 0.5 else rng.randbytes(n)

    def _delete(self, buf):
        if buf:
            i = self._pos(buf)
            del buf[i:i + self.rng.choice((1, 1, 2, 3, 4, 7, 8, 9, 16))]

    def _copy_chunk(self, buf):
        if len(buf) > 1:
            rng = self.rng
            a = self._pos(buf)
            n = rng.randrange(1, min(64, len(buf) - a) + 1)
            chunk = bytes(buf[a:a + n])
            b = self._pos(buf, 1)
            if rng.random() < 0.5:
                buf[b:b] = chunk
            else:
                buf[b:b + n] = chunk

    def _swap(self, buf):
        if len(buf) > 3:
            i, j = sorted((self._pos(buf), self._pos(buf)))
            n = self.rng.randrange(1, 9)
            a, b = bytes(buf[i:i + n]), bytes(buf[j:j + n])
            if i + n <= j:
                buf[j:j + n] = a
                buf[i:i + n] = b

    def _token(self, buf):
        token = self.rng.choice(self.dictionary)
        i = self._pos(buf, 1)
        if self.rng.random() < 0.5:
            buf[i:i] = token
        else:
            buf[i:i + len(token)] = token

    def _u32(self, buf):
        rng = self.rng
        if len(buf) >= 4:
            value = rng.choice(_INTERESTING_U32)
            if rng.random() < 0.3:
                value = (len(buf) - rng.choice((0, 1, 2, 19, 20, 30))) & 0xFFFFFFFF
            i = rng.randrange(len(buf) - 3)
            buf[i:i + 4] = value.to_bytes(4, "little")

    def _truncate(self, buf):
        if buf:
            del buf[self._pos(buf):]

    def _splice(self, buf: bytearray, other: bytes) -> bytearray:
        rng = self.rng
        a = rng.randrange(len(buf) + 1)
        b = rng.randrange(len(other) + 1)
        return bytearray(buf[:a] + other[b:])


def _signature(exc: BaseException) -> tuple[type, str]:
    """What makes two failures the same: type and message without numbers."""
    text = "".join(c for c in str(exc).split("\n")[0] if not c.isdigit())
    return type(exc), text[:48]


def _fails_same_way(run, data: bytes, signature) -> bool:
    try:
        run(data)
    except BaseException as exc:
        return _signature(exc) == signature
    return False


def minimize(run, data: bytes, error: BaseException, budget: int = 3000) -> bytes:
    """Shrink ``data`` by greedy chunk removal while ``run`` still fails the
    same way (exception type and message up to numbers); at most ``budget``
    runs."""
    kind = _signature(error)
    best = data
    size = max(1, len(best) // 2)
    while size >= 1 and budget > 0:
        i = 0
        while i < len(best) and budget > 0:
            candidate = best[:i] + best[i + size:]
            budget -= 1
            if _fails_same_way(run, candidate, kind):
                best = candidate
            else:
                i += size
        size //= 2
    return best


def _save(artifacts: pathlib.Path | None, target: str, data: bytes) -> pathlib.Path | None:
    if artifacts is None:
        return None
    artifacts.mkdir(parents=True, exist_ok=True)
    path = artifacts / f"crash-{target}-{hashlib.sha1(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    return path


def _crash(target: str, run, data: bytes, exc: BaseException, artifacts) -> FuzzCrash:
    tb = "".join(traceback.format_exception(exc))
    saved = _save(artifacts, target, data)
    small = minimize(run, data, exc)
    if artifacts is not None and small != data:
        _save(artifacts, target + "-min", small)
    return FuzzCrash(target, data, exc, tb, small, saved)


def run_mutational(
    target: str,
    *,
    runs: int = 1_000_000,
    seconds: float | None = None,
    seed: int = 0,
    warmup: int | None = None,
    rss_limit_mb: float = 4.0,
    artifacts: pathlib.Path | None = None,
    progress: float | None = None,
    corpus_max: int = 512,
    out=sys.stdout,
    run=None,
    seeds: list[bytes] | None = None,
) -> Result:
    """Fuzz ``target`` with the mutational engine, in this process.

    Stops after ``runs`` inputs or ``seconds`` seconds, whichever comes
    first. Raises :class:`FuzzCrash` on the first failing input. ``run`` and
    ``seeds`` replace the target's function and seed corpus (to test the
    engine itself).
    """
    if run is None:
        run = fuzz_targets.TARGETS[target]
    rng = random.Random(f"{target}:{seed}")
    max_len = fuzz_targets.TARGET_MAX_LEN.get(target, fuzz_targets.MAX_LEN)
    mutator = Mutator(rng, max_len)
    if seeds is None:
        seeds = fuzz_targets.seeds(target)
    corpus = [s[:max_len] for s in seeds] or [b""]
    n_seeds = len(corpus)
    seen: set = set()
    if warmup is None:
        warmup = min(20_000, runs // 5)
    deadline = None if not seconds else time.perf_counter() + seconds
    # The warm-up ends after `warmup` inputs or a fifth of the time limit.
    warm_until = None if not seconds else time.perf_counter() + seconds / 5
    rss_start = None
    slowest = 0.0
    count = 0
    start = time.perf_counter()
    next_report = start + progress if progress else None
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        while count < runs:
            if count < n_seeds:
                data = corpus[count]
            elif rng.random() < 0.03:
                data = mutator.random_input()
            else:
                data = mutator.mutate(rng.choice(corpus), rng.choice(corpus))
            t0 = time.perf_counter()
            try:
                features = run(data)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                raise _crash(target, run, data, exc, artifacts) from None
            t1 = time.perf_counter()
            if t1 - t0 > slowest:
                slowest = t1 - t0
            count += 1
            new = features - seen
            if new:
                seen |= new
                if count > n_seeds:
                    if len(corpus) < corpus_max:
                        corpus.append(data)
                    else:
                        corpus[rng.randrange(n_seeds, corpus_max)] = data
            if rss_start is None and (count >= warmup or (warm_until is not None and t1 >= warm_until
                                                          and count & 1023 == 0)):
                gc.collect()
                rss_start = rss_mib()
                warmup = count
            if count & 1023 == 0:
                faulthandler.dump_traceback_later(120, exit=True)
                if deadline is not None and t1 >= deadline:
                    break
                if next_report is not None and t1 >= next_report:
                    next_report = t1 + progress
                    print(f"[{target}] {count} inputs, {count / (t1 - start):.0f}/s, corpus {len(corpus)}, "
                          f"features {len(seen)}, RSS {rss_mib():.1f} MiB", file=out, flush=True)
    finally:
        faulthandler.cancel_dump_traceback_later()
    elapsed = time.perf_counter() - start
    gc.collect()
    rss_end = rss_mib()
    measured = count - warmup if rss_start is not None else 0
    if rss_start is None:  # fewer inputs than the warm-up
        rss_start = rss_end
    limit = _rss_limit(rss_limit_mb, measured)
    growth = rss_end - rss_start
    ok = growth <= limit
    return Result(target, "mutate", count, elapsed, count / elapsed if elapsed else 0.0, rss_start, rss_end,
                  growth, limit, len(corpus), len(seen), slowest * 1e3, ok,
                  "" if ok else f"RSS grew by {growth:.1f} MiB over {measured} inputs after warm-up")


def run_atheris(
    target: str,
    *,
    runs: int = 1_000_000,
    seconds: float | None = None,
    warmup: int | None = None,
    rss_limit_mb: float = 4.0,
    workdir: pathlib.Path,
    artifacts: pathlib.Path,
    progress: float | None = None,
) -> None:
    """Fuzz ``target`` with atheris (libFuzzer); never returns.

    ``mcast_trio`` must have been imported under
    ``atheris.instrument_imports()`` by the caller. The result is printed
    as one ``FUZZRESULT {json}`` line on stdout; the process exits 0 if the
    run passed, 1 if memory grew, and libFuzzer's crash code on a failing
    input (after printing the reproducer).
    """
    import atheris

    run = fuzz_targets.TARGETS[target]
    max_len = fuzz_targets.TARGET_MAX_LEN.get(target, fuzz_targets.MAX_LEN)
    if warmup is None:
        warmup = min(20_000, runs // 5)
    seeds_dir = workdir / f"{target}-seeds"
    corpus_dir = workdir / f"{target}-corpus"
    for d in (seeds_dir, corpus_dir):
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            old.unlink()
    for i, s in enumerate(fuzz_targets.seeds(target)):
        (seeds_dir / f"seed-{i:04d}").write_bytes(s[:max_len])
    dict_path = workdir / "tokens.dict"
    dict_path.write_text("".join('"' + "".join(f"\\x{b:02x}" for b in t) + '"\n' for t in fuzz_targets.DICTIONARY))
    artifacts.mkdir(parents=True, exist_ok=True)
    state = {"count": 0, "rss_start": None, "slowest": 0.0, "start": time.perf_counter()}
    state["report"] = state["start"] + progress if progress else None
    state["warmup"] = warmup
    deadline = None if not seconds else state["start"] + seconds
    warm_until = None if not seconds else state["start"] + seconds / 5

    def finish() -> None:
        elapsed = time.perf_counter() - state["start"]
        gc.collect()
        rss_end = rss_mib()
        count = state["count"]
        rss_start = state["rss_start"] if state["rss_start"] is not None else rss_end
        measured = count - state["warmup"] if state["rss_start"] is not None else 0
        limit = _rss_limit(rss_limit_mb, measured)
        growth = rss_end - rss_start
        ok = growth <= limit
        corpus = sum(1 for _ in corpus_dir.iterdir())
        result = Result(target, "atheris", count, elapsed, count / elapsed if elapsed else 0.0, rss_start, rss_end,
                        growth, limit, corpus, 0, state["slowest"] * 1e3, ok,
                        "" if ok else f"RSS grew by {growth:.1f} MiB over {measured} inputs after warm-up")
        sys.stdout.write(RESULT_PREFIX + json.dumps(asdict(result)) + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if ok else 1)

    def test_one_input(data: bytes) -> None:
        t0 = time.perf_counter()
        try:
            run(data)
        except BaseException as exc:
            crash = _crash(target, run, data, exc, artifacts)
            sys.stdout.write(f"FUZZCRASH {crash}\n")
            sys.stdout.flush()
            raise
        t1 = time.perf_counter()
        if t1 - t0 > state["slowest"]:
            state["slowest"] = t1 - t0
        state["count"] = count = state["count"] + 1
        if state["rss_start"] is None and (count >= warmup or (warm_until is not None and count & 255 == 0
                                                               and t1 >= warm_until)):
            gc.collect()
            state["rss_start"] = rss_mib()
            state["warmup"] = count
        if count & 255 == 0:
            if deadline is not None and t1 >= deadline:
                finish()
            if state["report"] is not None and t1 >= state["report"]:
                state["report"] = t1 + progress
                print(f"[{target}] {count} inputs, {count / (t1 - state['start']):.0f}/s, "
                      f"RSS {rss_mib():.1f} MiB", flush=True)
        if count >= runs:
            finish()

    argv = [
        sys.argv[0],
        f"-runs={runs + 1000}",
        f"-max_len={max_len}",
        "-timeout=30",
        "-rss_limit_mb=4096",
        f"-artifact_prefix={artifacts}/",
        f"-dict={dict_path}",
        "-print_final_stats=1",
        "-reload=0",
    ]
    if seconds:
        argv.append(f"-max_total_time={int(seconds) + 60}")
    argv += [str(corpus_dir), str(seeds_dir)]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
    # libFuzzer stopped on its own (max_total_time or runs backstop).
    finish()
