"""Run the compiled decoder under AddressSanitizer + UndefinedBehaviorSanitizer.

``make sanitize`` and ``tests/test_sanitizer.py`` use this. It

1. cythonizes ``_decode.pyx`` (by default the one installed next to the
   ``mcast_trio`` package, else the repository's) with the compiler
   directives of ``setup.py``, and compiles it with
   ``-fsanitize=address,undefined -fno-omit-frame-pointer`` into a
   temporary directory;
2. writes a short corpus (simulated readouts, hand-made edge cases, every
   short string over the bytes that matter to the walk, and mutated inputs);
3. runs it through the instrumented module in a child Python process with
   ``LD_PRELOAD=libasan.so``, ``PYTHONMALLOC=malloc`` (so that Python's own
   allocations are visible to ASan too) and ``ASAN_OPTIONS=detect_leaks=0``
   (CPython does not free everything at exit, by design), importing it by
   path under its own name so that it never clashes with the installed one;
4. checks that the child exits 0, that ASan/UBSan reported nothing, and
   that the instrumented module produced exactly what the installed one
   produces (a digest of every output).

Every input the child passes lives in a buffer of exactly its size (a
fresh numpy array; ``bytes`` objects carry a hidden trailing NUL), and each
datagram of a batch is also decoded alone in its own buffer, so a read one
byte past a datagram is an ASan error. Output arrays are exactly as large
as the decoder's documented bound, so a write past it is one too.

Usage::

    python fuzz/sanitize.py [--pyx PATH] [--keep DIR]

Exit status 0: clean; 1: the sanitizers found something (or the outputs
differ); 77: the toolchain or the sanitizer runtime is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import pathlib
import pickle
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
SKIP = 77
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
# The directives of setup.py (the .pyx header repeats them).
DIRECTIVES = ["boundscheck=False", "wraparound=False", "cdivision=True", "initializedcheck=False"]
ERROR_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "SUMMARY: UndefinedBehaviorSanitizer")


class Unavailable(RuntimeError):
    """The compiler, Cython, the Python headers or the sanitizer runtime is missing.

    ``what`` says which: ``"compiler"``, ``"cython"``, ``"headers"`` or ``"runtime"``.
    """

    def __init__(self, what: str, message: str) -> None:
        super().__init__(message)
        self.what = what


# -- toolchain -----------------------------------------------------------------


def find_pyx() -> pathlib.Path:
    """``_decode.pyx`` of the ``mcast_trio`` that is imported, else the repository's."""
    try:
        import mcast_trio

        installed = pathlib.Path(mcast_trio.__file__).resolve().parent / "_decode.pyx"
        if installed.is_file():
            return installed
    except ImportError:
        pass
    return REPO / "mcast_trio" / "_decode.pyx"


def compiler() -> str:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()[0]
    path = shutil.which(cc) or shutil.which("gcc") or shutil.which("cc")
    if path is None:
        raise Unavailable("compiler", f"no C compiler found (tried CC={cc!r}, gcc, cc)")
    return path


def asan_runtime(cc: str) -> str:
    """Absolute path of the compiler's ``libasan.so``."""
    out = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not out or not os.path.isabs(out) or not os.path.exists(out):
        raise Unavailable("runtime", f"{cc} has no AddressSanitizer runtime (libasan.so not found; Debian: apt-get install libasan8)")
    return os.path.realpath(out)


def build(pyx: pathlib.Path, outdir: pathlib.Path) -> pathlib.Path:
    """Cythonize and compile ``pyx`` with the sanitizers; return the module path."""
    try:
        import Cython  # noqa: F401
    except ImportError:
        raise Unavailable("cython", "Cython is not installed in this environment (pip install 'Cython>=3.0,<4')") from None
    include = sysconfig.get_paths()["include"]
    if not (pathlib.Path(include) / "Python.h").is_file():
        raise Unavailable("headers", f"the Python headers are missing ({include}/Python.h)")
    cc = compiler()
    outdir.mkdir(parents=True, exist_ok=True)
    src = outdir / "_decode.pyx"
    shutil.copyfile(pyx, src)
    c_file = outdir / "_decode.c"
    # -I: the directory holding the mcast_trio package, for the cimport of
    # mcast_trio/_readout_header.pxd (the readout header's C owner).
    cmd = [sys.executable, "-m", "cython", "-3", "--fast-fail", "-I", str(pyx.resolve().parent.parent),
           "-o", str(c_file), str(src)]
    for d in DIRECTIVES:
        cmd[3:3] = ["-X", d]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=outdir)
    if proc.returncode:
        raise RuntimeError(f"cython failed on {pyx}:\n{proc.stdout}{proc.stderr}")
    so = outdir / ("_decode" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [cc, "-shared", "-fPIC", "-O1", "-g", *SANITIZE_FLAGS, "-I", include, str(c_file), "-o", str(so)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"compiling {c_file} failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return so


# -- the corpus and the harness ------------------------------------------------


def make_corpus(seed: int = 0, mutated: int = 10000) -> list[tuple]:
    """A short corpus: ``("one", data, extra)`` and ``("batch", datagrams, extra, carry, last_id)``."""
    import itertools

    sys.path.insert(0, str(HERE))
    try:
        import fuzz_engine
    finally:
        sys.path.remove(str(HERE))
    from mcast_trio.sim import DaqSimulator

    rng = random.Random(seed)
    corpus: list[tuple] = []
    extras = [None, b"", b"\xe1", b"\xe2\x11\x22", b"\xe3" + bytes(6), b"\xe4" + bytes(7), b"\xe5" * 9]
    # Every string of length 0..6 over the bytes that steer the walk.
    alphabet = (0xBC, 0xFF, 0xE0, 0x00)
    for n in range(7):
        for combo in itertools.product(alphabet, repeat=n):
            corpus.append(("one", bytes(combo), extras[len(corpus) % len(extras)]))
    # Runs of start bytes and hits with start bytes inside, around the 8-byte boundary.
    for n in range(0, 25):
        for fill in (0xE0, 0xE7, 0x01):
            body = bytes([0xE0 + (i % 30) if fill != 0x01 else (0xE0 if i % 5 == 0 else fill) for i in range(n)])
            for extra in extras:
                corpus.append(("one", body, extra))
    sims = []
    for s, kw in enumerate((dict(split_fraction=0.5), dict(padding_fraction=0.5, max_idle_gap=5, chip_id=30),
                            dict(split_fraction=1.0, lead_idles=0, trailing_idles=1, mean_hits=1.0))):
        sims += DaqSimulator(s, start_ns=1_700_000_000_000_000_000, **kw).datagrams(60)
    for dg in sims:
        corpus.append(("one", dg[19:].rstrip(b"\xff"), None))
    for carry in range(3):
        corpus.append(("batch", sims, None, carry, -1))
    # Board padding (ff) inside the serialized data, which the batch decoder strips.
    padded = []
    for k, dg in enumerate(sims[:40]):
        body = dg[19:] + b"\xff" * (k % 11)
        padded.append(dg[:15] + len(body).to_bytes(4, "little") + body)
    corpus.append(("batch", padded, b"\xe1", 0, -1))
    # Mutated single readouts and batches (the fuzzers' mutator).
    mutator = fuzz_engine.Mutator(rng)
    pool = [dg[19:] for dg in sims]
    for _ in range(mutated):
        data = mutator.mutate(rng.choice(pool), rng.choice(pool))
        corpus.append(("one", data.rstrip(b"\xff"), rng.choice(extras)))
    for _ in range(mutated // 10):
        group = [mutator.mutate(rng.choice(sims)) if rng.random() < 0.5 else rng.choice(sims)
                 for _ in range(rng.randrange(1, 8))]
        corpus.append(("batch", group, rng.choice(extras), rng.randrange(3), rng.choice((-1, 0, 5, 0xFFFFFFFF))))
    return corpus


def _exact(data: bytes):
    """``data`` in a fresh buffer of exactly its size."""
    import numpy as np

    arr = np.empty(len(data), dtype=np.uint8)
    if data:
        arr[:] = np.frombuffer(data, dtype=np.uint8)
    return arr


def harness(module, corpus: list[tuple]) -> str:
    """Run ``corpus`` through the compiled decoder ``module``; return a digest
    of every output."""
    import numpy as np

    layout = module._layout()
    hit_size, row_size = layout["hit_size"], layout["readout_size"]
    digest = hashlib.sha256()

    def one(data: bytes, extra) -> None:
        out = np.empty((len(data) // 8 + 1) * hit_size, dtype=np.uint8)
        n, flags, start, dropped = module.decode_one(_exact(data), None if extra is None else _exact(extra),
                                                     7, 123456789, out)
        digest.update(repr((n, flags, start, dropped)).encode())
        digest.update(out[: n * hit_size].tobytes())

    def batch(parts: list[bytes], extra, carry: int, last_id: int):
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        offsets = np.zeros(len(parts), dtype=np.int64)
        if len(parts) > 1:
            np.cumsum(lengths[:-1], out=offsets[1:])
        bound = int((lengths // 8).sum()) + len(parts)
        hits = np.empty(max(bound, 1) * hit_size, dtype=np.uint8)
        rows = np.zeros(max(len(parts), 1) * row_size, dtype=np.uint8)
        buf = b"".join(parts) or b"\0"
        n, extra_out, last = module.decode_batch(_exact(buf), offsets, lengths, extra, carry, last_id, hits, rows)
        digest.update(repr((n, extra_out, last)).encode())
        digest.update(hits[: n * hit_size].tobytes())
        digest.update(rows[: len(parts) * row_size].tobytes())
        return extra_out, last

    for item in corpus:
        if item[0] == "one":
            one(item[1], item[2])
            continue
        _, parts, extra, carry, last_id = item
        batch(parts, extra, carry, last_id)
        # Each datagram alone, in a buffer of exactly its size, chained.
        for part in parts:
            extra, last_id = batch([part], extra, carry, last_id)
    return digest.hexdigest()


# -- parent and child ------------------------------------------------------------


def _child(module_path: str, corpus_path: str) -> int:
    import ctypes

    try:
        ctypes.CDLL(None).__asan_report_load8
    except AttributeError:
        print("the AddressSanitizer runtime is not loaded in this process")
        return 3
    print("ASAN ACTIVE")
    spec = importlib.util.spec_from_file_location("_decode", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(corpus_path, "rb") as f:
        corpus = pickle.load(f)
    t0 = time.perf_counter()
    digest = harness(module, corpus)
    print(f"DIGEST {digest}")
    print(f"ran {len(corpus)} corpus entries through {module.__file__} in {time.perf_counter() - t0:.1f} s")
    return 0


def _pyx_line(c_file: pathlib.Path, pyx: pathlib.Path, output: str) -> str:
    """``_decode.pyx`` line N: source, for the first ``_decode.c:LINE`` in ``output``."""
    import re

    m = re.search(r"_decode\.c:(\d+)", output)
    if not m or not c_file.is_file():
        return ""
    lines = c_file.read_text(errors="replace").splitlines()
    for i in range(min(int(m.group(1)), len(lines)) - 1, -1, -1):
        ref = re.search(r'/\* "_decode\.pyx":(\d+)', lines[i])
        if ref:
            n = int(ref.group(1))
            source = pyx.read_text().splitlines()
            return f"_decode.pyx line {n}: {source[n - 1].strip() if n <= len(source) else '?'}"
    return ""


def sanitizer_env(runtime: str) -> dict:
    env = dict(os.environ)
    env["LD_PRELOAD"] = runtime
    env["PYTHONMALLOC"] = "malloc"
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=66:allocator_may_return_null=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=67"
    env.pop("PYTHONPATH", None)
    return env


def check(pyx: pathlib.Path | None = None, workdir: pathlib.Path | None = None, *, mutated: int = 10000,
          timeout: float = 300.0) -> tuple[bool, str]:
    """Build, run, compare. Returns ``(clean, report)``; raises :class:`Unavailable`."""
    import mcast_trio._decode as installed

    pyx = pathlib.Path(pyx) if pyx else find_pyx()
    cleanup = workdir is None
    workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="mcast-trio-asan-"))
    try:
        runtime = asan_runtime(compiler())
        t0 = time.perf_counter()
        so = build(pyx, workdir)
        t_build = time.perf_counter() - t0
        corpus = make_corpus(mutated=mutated)
        corpus_path = workdir / "corpus.pickle"
        with open(corpus_path, "wb") as f:
            pickle.dump(corpus, f)
        want = harness(installed, corpus)
        t1 = time.perf_counter()
        # The child imports only numpy and the instrumented module.
        proc = subprocess.run([sys.executable, str(HERE / "sanitize.py"), "--child", str(so), str(corpus_path)],
                              capture_output=True, text=True, env=sanitizer_env(runtime), timeout=timeout,
                              cwd=workdir)
        t_run = time.perf_counter() - t1
        output = proc.stdout + proc.stderr
        problems = []
        if proc.returncode != 0:
            problems.append(f"the child exited with status {proc.returncode}")
        problems += [f"the output contains {m!r}" for m in ERROR_MARKERS if m in output]
        got = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("DIGEST ")]
        if "ASAN ACTIVE" not in proc.stdout:
            problems.append("the child did not run with the AddressSanitizer runtime")
        if proc.returncode == 0 and got != [want]:
            problems.append(f"the instrumented module's outputs differ from the installed one's ({got} != {want})")
        # Show the first sanitizer report (stack traces are long), else the tail.
        found = [output.find(m) for m in ERROR_MARKERS if m in output]
        excerpt = output[output.rfind("\n", 0, min(found)) + 1:][:6000] if found else output[-3000:]
        where = _pyx_line(workdir / "_decode.c", pyx, excerpt) if found else ""
        if where:
            problems.append(f"first report at {where}")
        report = (f"pyx: {pyx}\nbuilt {so.name} with {' '.join(SANITIZE_FLAGS)} in {t_build:.1f} s; "
                  f"LD_PRELOAD={runtime}; corpus of {len(corpus)} entries run in {t_run:.1f} s\n"
                  + ("\n".join(problems) + "\n" if problems else "clean: no sanitizer report, same outputs\n")
                  + excerpt)
        return not problems, report
    finally:
        if cleanup:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run the compiled decoder under ASan + UBSan on a short corpus.")
    p.add_argument("--pyx", type=pathlib.Path, help="the _decode.pyx to build (default: the installed package's)")
    p.add_argument("--keep", type=pathlib.Path, help="build in this directory and keep it")
    p.add_argument("--mutated", type=int, default=10000, help="mutated inputs in the corpus (default 10000)")
    p.add_argument("--child", nargs=2, metavar=("MODULE", "CORPUS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(*args.child)
    try:
        clean, report = check(args.pyx, args.keep, mutated=args.mutated)
    except Unavailable as exc:
        print(f"sanitizer run not possible here: {exc}")
        return SKIP
    print(report)
    print("SANITIZE: OK" if clean else "SANITIZE: FAILED")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
