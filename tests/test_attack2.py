"""Attacks on the second-round fixes of issue 13 (per-sender compiled carry,
ghost senders, discard at close, shared ledger, reassembly fairness, CLI
stdio), each a test of behaviour that should hold.

Tests that open sockets run only inside ``tools/netns-run``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_ENV = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_child(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("offset", [2**63 - 32, 2**63 - 16, 2**63 - 1])
def test_decode_readouts_huge_offset_is_a_value_error_not_a_segfault(offset):
    """offsets + lengths overflows int64 (numpy and the compiled check both
    add them in int64): the datagram is accepted as inside a 64-byte buffer
    and the compiled decoder reads ~2**63 bytes past it (SIGSEGV). The
    documented answer to a datagram outside the buffer is ValueError."""
    proc = _run_child(f"""
        import mcast_trio
        try:
            mcast_trio.decode_readouts(bytes(64), lengths=[32], offsets=[{offset}])
        except ValueError as exc:
            print("ValueError", exc)
        else:
            print("accepted")
    """)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])
    assert proc.stdout.startswith("ValueError"), proc.stdout
