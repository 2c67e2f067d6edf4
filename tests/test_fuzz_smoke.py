"""Smoke fuzzing: the short, deterministic version of ``make fuzz``.

Every parser of untrusted bytes (the readout parser, the batch decoder, the
native and MCL framing parsers, the ``.apx`` reader) gets thousands of
random and mutated inputs from the targets in ``fuzz/fuzz_targets.py``; only
the documented exceptions may come out, the compiled decoder must equal the
pure-Python reference on every input, and memory must not grow. Hypothesis
drives the same targets with its own inputs. The engine itself is checked
too: it must catch a crashing target (and shrink the input) and a leaking
one, or the smoke test would prove nothing.
"""

from __future__ import annotations

import importlib.util
import pathlib
import struct
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mcast_trio
from mcast_trio import MalformedFrame, MalformedReadout
from mcast_trio._format import HIT_DTYPE

FUZZ = pathlib.Path(__file__).resolve().parent.parent / "fuzz"


def _load(name: str):
    """Import ``fuzz/<name>.py`` by path (the fuzz directory is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, FUZZ / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


fuzz_targets = _load("fuzz_targets")
fuzz_engine = _load("fuzz_engine")

# Inputs per target: a few seconds in all (the batch target runs the slow
# reference decoder on every input).
RUNS = {"readout": 20_000, "batch": 8_000, "native": 20_000, "mcl": 20_000, "apx": 12_000}


@pytest.mark.parametrize("target", sorted(fuzz_targets.TARGETS))
def test_mutational_smoke(target, tmp_path):
    seeds = fuzz_targets.seeds(target)
    result = fuzz_engine.run_mutational(target, runs=RUNS[target], seed=1, artifacts=tmp_path)
    assert result.inputs == RUNS[target]
    assert result.ok, result.line()
    # The mutations reached outcomes the seeds alone did not: the run was not
    # the same few inputs over and over.
    assert result.corpus > len(seeds), result.line()
    assert not list(tmp_path.iterdir())  # no crash file


def test_seed_corpora_use_the_golden_file_when_present(astropix_data):
    head, records = fuzz_targets._golden_records(3)
    assert head.startswith(b"%APXDF") and len(records) == 3
    assert any(s[1:].startswith(head) for s in fuzz_targets.seeds("apx"))
    assert any(s[1:] == records[0] for s in fuzz_targets.seeds("readout"))


def test_targets_report_documented_errors_as_outcomes():
    # Too short, bad header, length mismatch: MalformedReadout, classified.
    assert fuzz_targets.run_readout(b"\x10" + b"\xfe\xdc\xba") == {("malformed", 1)}
    assert fuzz_targets.run_readout(b"\x10" + bytes(19)) == {("malformed", 2)}
    bad_length = b"\xfe\xdc\xba" + struct.pack("<IQI", 1, 2, 5) + b"\xe0"
    assert fuzz_targets.run_readout(b"\x10" + bad_length) == {("malformed", 3)}
    # A batch mixing good and malformed datagrams: malformed rows, no exception.
    good = mcast_trio.sim.DaqSimulator(5, start_ns=0).datagrams(2)
    features = fuzz_targets.run_batch(b"\x00\x01" + fuzz_targets.SEP.join([good[0], bad_length, good[1]]))
    assert any(f[0] == "row" and f[4] for f in features)  # a malformed row
    assert ("bad", "offset 0:") in fuzz_targets.run_native(b"\x00" + b"XXXX" + bytes(40))
    assert any(f[0] == "bad" for f in fuzz_targets.run_mcl(b"\x00\x92\xc1"))
    assert ("malformed", "not an .apx fi") in fuzz_targets.run_apx(b"\x10%APXDX")


def test_array_oracle_sees_every_difference():
    a = np.zeros(3, dtype=HIT_DTYPE)
    b = a.copy()
    fuzz_targets._same_array(a, b, "same")
    b["ts_tdc2"][2] = 1
    with pytest.raises(fuzz_targets.Failure, match=r"record 2 differs in \['ts_tdc2'\]"):
        fuzz_targets._same_array(a, b, "x")
    # Padding bytes count too (the compiled decoder must zero them).
    raw = a.view(np.uint8).copy()
    raw[47] = 1
    with pytest.raises(fuzz_targets.Failure, match="padding bytes"):
        fuzz_targets._same_array(raw.view(HIT_DTYPE), a, "x")
    with pytest.raises(fuzz_targets.Failure, match="2 records, reference 3"):
        fuzz_targets._same_array(a[:2], a, "x")


def test_engine_catches_and_shrinks_an_undocumented_exception(tmp_path):
    def fragile(data: bytes) -> frozenset:
        # A parser bug: an IndexError on a readout header followed by 0xff.
        at = data.find(b"\xfe\xdc\xba")
        if at >= 0 and at + 3 < len(data) and data[at + 3] == 0xFF:
            raise IndexError("index out of range")
        return frozenset({len(data) % 7})

    seed = b"\x00" * 40 + b"\xfe\xdc\xba\x00" + b"\x11" * 40
    with pytest.raises(fuzz_engine.FuzzCrash) as info:
        fuzz_engine.run_mutational("fragile", runs=200_000, seed=3, artifacts=tmp_path, run=fragile, seeds=[seed])
    crash = info.value
    assert isinstance(crash.error, IndexError)
    assert crash.minimized == b"\xfe\xdc\xba\xff"
    assert crash.saved is not None and crash.saved.read_bytes() == crash.data
    assert "bytes.fromhex('fedcbaff')" in str(crash)


_LEAKY = """
import sys
sys.path.insert(0, sys.argv[1])
import fuzz_engine

kept = []

def leaky(data):
    kept.append(bytearray(b"\\x01") * 8192)  # 8 KiB of touched pages per input
    return frozenset()

result = fuzz_engine.run_mutational("leaky", runs=3000, seed=0, warmup=500, rss_limit_mb=4.0,
                                    run=leaky, seeds=[b"x"])
print(result.ok, result.rss_growth_mib, repr(result.message))
"""


def test_engine_catches_memory_growth(tmp_path):
    # In a fresh process: in this long-lived one, freed heap from earlier
    # tests would absorb the leak without any growth of the RSS.
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _LEAKY, str(FUZZ)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ok, growth, message = proc.stdout.split(maxsplit=2)
    assert ok == "False" and float(growth) > 8, proc.stdout
    assert "RSS grew" in message


_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                     database=None)


@st.composite
def _mutated_seed(draw, target):
    data = bytearray(draw(st.sampled_from(fuzz_targets.seeds(target))))
    for pos, value, kind in draw(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255),
                                                    st.sampled_from("dis")), max_size=5)):
        if not data and kind != "i":
            continue
        pos %= len(data) + (kind == "i")
        if kind == "d":
            del data[pos]
        elif kind == "i":
            data.insert(pos, value)
        else:
            data[pos] = value
    return bytes(data)


def _inputs(target):
    return st.one_of(st.binary(max_size=300), _mutated_seed(target))


@pytest.mark.parametrize("target", sorted(fuzz_targets.TARGETS))
def test_hypothesis_drives_the_targets(target):
    run = fuzz_targets.TARGETS[target]

    @_SETTINGS
    @given(_inputs(target))
    def check(data):
        try:
            features = run(data)
        except (MalformedReadout, MalformedFrame) as exc:  # pragma: no cover - a target bug
            pytest.fail(f"{target} let a documented exception escape: {exc!r}")
        assert isinstance(features, frozenset)

    check()
