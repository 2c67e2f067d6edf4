"""The compiled decoder under AddressSanitizer and UndefinedBehaviorSanitizer.

``fuzz/sanitize.py`` builds ``_decode.pyx`` (the installed package's copy,
i.e. the source of the module under test) with
``-fsanitize=address,undefined`` into a temporary directory and runs a short
corpus through it in a child process with the ASan runtime preloaded, every
input in a buffer of exactly its size. The test fails on any sanitizer
report, on a non-zero exit, or if the instrumented build computes anything
different from the installed module.

It skips only where the toolchain cannot do this (no C compiler, no
``libasan``, no Python headers, or no Cython outside CI); under CI and
``make test`` a missing Cython is a failure, since the machines CI runs on
have everything else.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import pytest

FUZZ = pathlib.Path(__file__).resolve().parent.parent / "fuzz"


def _load(name: str):
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


sanitize = _load("sanitize")


@pytest.mark.slow
def test_compiled_decoder_is_clean_under_asan_and_ubsan(tmp_path):
    try:
        clean, report = sanitize.check(workdir=tmp_path, timeout=240)
    except sanitize.Unavailable as exc:
        in_ci = os.environ.get("CI") or os.environ.get("MCAST_TRIO_REQUIRE_INSTALLED") == "1"
        if exc.what == "cython" and in_ci:
            pytest.fail(f"{exc}: the test environment must provide Cython to build the sanitized decoder")
        pytest.skip(f"cannot build the decoder with sanitizers here: {exc}")
    assert clean, report
    assert "ASAN ACTIVE" in report
