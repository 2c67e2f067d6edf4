"""Tests of the sans-I/O per-sender sequence accounting (mcast_trio._protocol._tracking)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcast_trio._protocol._tracking import SenderStats, SenderTable, SequenceTracker

F, N, D, R, S = "first", "new", "duplicate", "reordered", "restart"
TOP = 2**32 - 1

# (name, tracker kwargs, ids, expected results,
#  expected (received, lost, duplicates, reordered, restarts, highest))
SEQUENCES = [
    ("in order", {}, [0, 1, 2, 3, 4], [F, N, N, N, N], (5, 0, 0, 0, 0, 4)),
    ("first packet not zero", {}, [1000, 1001, 1003], [F, N, N], (3, 1, 0, 0, 0, 1003)),
    ("gap", {}, [0, 1, 5, 6], [F, N, N, N], (4, 3, 0, 0, 0, 6)),
    ("late arrival within window", {}, [0, 1, 3, 4, 2], [F, N, N, N, R], (5, 0, 0, 1, 0, 4)),
    ("several late arrivals", {}, [0, 4, 2, 1, 3], [F, N, R, R, R], (5, 0, 0, 3, 0, 4)),
    ("late arrival at the window edge", {"window": 4},
     [0, 1, 3, 4, 5, 2], [F, N, N, N, N, R], (6, 0, 0, 1, 0, 5)),
    ("late arrival just outside the window", {"window": 4},
     [0, 1, 3, 4, 5, 6, 2], [F, N, N, N, N, N, S], (7, 1, 0, 0, 1, 2)),
    ("late arrival far outside the window", {"window": 8},
     [0, 2, *range(3, 20), 1], [F, N, *[N] * 17, S], (20, 1, 0, 0, 1, 1)),
    ("late arrivals after a gap wider than the window", {"window": 4},
     [0, 10, 9, 7], [F, N, R, R], (4, 7, 0, 2, 0, 10)),
    ("duplicates", {}, [0, 1, 1, 2, 2, 2], [F, N, D, N, D, D], (3, 0, 3, 0, 0, 2)),
    ("duplicate of the first", {}, [7, 7], [F, D], (1, 0, 1, 0, 0, 7)),
    ("duplicate of a late one", {}, [0, 2, 1, 1], [F, N, R, D], (3, 0, 1, 1, 0, 2)),
    ("duplicate of an older id inside the window", {}, [0, 1, 2, 3, 0], [F, N, N, N, D],
     (4, 0, 1, 0, 0, 3)),
    ("wrap-around at 2**32", {}, [TOP - 1, TOP, 0, 1], [F, N, N, N], (4, 0, 0, 0, 0, 1)),
    ("gap across the wrap", {}, [TOP - 1, 1], [F, N], (2, 2, 0, 0, 0, 1)),
    ("late arrival across the wrap", {}, [TOP, 1, 0], [F, N, R], (3, 0, 0, 1, 0, 1)),
    ("restart backwards", {}, [5000, 5001, 5002, 0, 1, 2], [F, N, N, S, N, N],
     (6, 0, 0, 0, 1, 2)),
    ("restart backwards after a short run", {}, [100, 101, 102, 0, 1, 2, 3],
     [F, N, N, S, N, N, N], (7, 0, 0, 0, 1, 3)),
    ("arrival before the first id is a restart", {}, [10, 9], [F, S], (2, 0, 0, 0, 1, 9)),
    ("restart forward, huge jump", {}, [0, 1, 2, 2**21, 2**21 + 1], [F, N, N, S, N],
     (5, 0, 0, 0, 1, 2**21 + 1)),
    ("jump equal to restart_threshold is a loss, above it a restart",
     {"restart_threshold": 10}, [0, 10, 21], [F, N, S], (3, 9, 0, 0, 1, 21)),
    ("large gap within restart_threshold counts losses", {}, [0, 5, 100000, 99999],
     [F, N, N, R], (4, 99997, 0, 1, 0, 100000)),
    ("losses before a restart stay counted", {}, [10, 13, 0, 1], [F, N, S, N],
     (4, 2, 0, 0, 1, 1)),
    ("small modulus wraps", {"modulus": 16, "window": 4, "restart_threshold": 4},
     [14, 15, 0, 1, 3, 2], [F, N, N, N, N, R], (6, 0, 0, 1, 0, 3)),
    ("half the modulus away is a restart", {"modulus": 16, "window": 4, "restart_threshold": 7},
     [0, 8], [F, S], (2, 0, 0, 0, 1, 8)),
    ("16-bit native sequence numbers", {"modulus": 2**16}, [65534, 65535, 0, 2],
     [F, N, N, N], (4, 1, 0, 0, 0, 2)),
]


@pytest.mark.parametrize(
    ("kwargs", "ids", "results", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in SEQUENCES],
)
def test_sequences(kwargs, ids, results, expected):
    tracker = SequenceTracker(**kwargs)
    assert [tracker.observe(i) for i in ids] == results
    received, lost, duplicates, reordered, restarts, highest = expected
    assert tracker.stats() == SenderStats(
        received=received,
        lost=lost,
        duplicates=duplicates,
        reordered=reordered,
        restarts=restarts,
        highest=highest,
    )
    assert tracker.highest == highest


def test_fresh_tracker_stats():
    assert SequenceTracker().stats() == SenderStats(0, 0, 0, 0, 0, None)


def test_stats_are_frozen_snapshots():
    tracker = SequenceTracker()
    tracker.observe(1)
    snap = tracker.stats()
    tracker.observe(2)
    assert snap.received == 1 and tracker.stats().received == 2
    with pytest.raises(AttributeError):
        snap.received = 5  # type: ignore[misc]


def test_long_run_with_periodic_losses():
    # 10000 ids, every 10th lost, with the default window: exact loss count.
    tracker = SequenceTracker()
    for i in range(10000):
        if i % 10 != 5:
            tracker.observe(i)
    stats = tracker.stats()
    assert (stats.received, stats.lost, stats.restarts) == (9000, 1000, 0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"window": 0}, ValueError, "window=0 is out of range; allowed: 1..65536"),
        ({"window": 2**17}, ValueError, "window=131072 is out of range; allowed: 1..65536"),
        ({"window": 1.5}, TypeError, "window=1.5 must be an int"),
        ({"window": True}, TypeError, "window=True must be an int"),
        ({"restart_threshold": 0}, ValueError, "restart_threshold=0 is out of range"),
        ({"restart_threshold": 2**31}, ValueError, "allowed: 1..2147483647"),
        ({"modulus": 8}, ValueError, "modulus=8 is out of range; allowed: 16..2**64"),
        ({"modulus": 2**64 + 1}, ValueError, "modulus="),
        ({"modulus": 16, "window": 8}, ValueError, "window=8 is out of range; allowed: 1..7"),
        ({"modulus": "16"}, TypeError, "modulus='16' must be an int"),
    ],
)
def test_tracker_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=message.replace("*", r"\*").replace(".", r"\.")):
        SequenceTracker(**kwargs)


@pytest.mark.parametrize("seq", [-1, 2**32])
def test_observe_out_of_range(seq):
    tracker = SequenceTracker()
    with pytest.raises(ValueError, match=f"seq={seq} is out of range; allowed: 0..4294967295"):
        tracker.observe(seq)


def test_default_restart_threshold_depends_on_modulus():
    assert SequenceTracker().restart_threshold == 2**20
    assert SequenceTracker(modulus=2**16, window=16).restart_threshold == 2**14


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(st.integers(0, 63), max_size=80),
    window=st.integers(1, 16),
)
def test_counters_are_consistent(ids, window):
    tracker = SequenceTracker(window=window, restart_threshold=20, modulus=64)
    results = [tracker.observe(i) for i in ids]
    stats = tracker.stats()
    assert stats.lost >= 0
    assert stats.received + stats.duplicates == len(ids)
    assert results.count(D) == stats.duplicates
    assert results.count(R) == stats.reordered
    assert results.count(S) == stats.restarts
    assert results.count(F) == (1 if ids else 0)


# ---------------------------------------------------------------- SenderTable


def test_sender_table_tracks_each_sender_separately():
    table = SenderTable()
    assert table.observe(("a", 1), 0) == F
    assert table.observe(("b", 1), 10) == F
    assert table.observe(("a", 1), 2) == N
    assert table.observe(("b", 1), 10) == D
    snap = table.snapshot()
    assert snap == {
        ("a", 1): SenderStats(received=2, lost=1, highest=2),
        ("b", 1): SenderStats(received=1, duplicates=1, highest=10),
    }
    assert len(table) == 2 and ("a", 1) in table and ("c", 1) not in table


def test_sender_table_evicts_least_recently_seen():
    table = SenderTable(max_senders=2)
    table.observe("a", 0)
    table.observe("b", 0)
    table.observe("a", 1)  # "b" is now the least recently seen
    table.observe("c", 0)
    assert list(table.snapshot()) == ["a", "c"]
    assert table.evicted == 1
    # A sender seen again after eviction continues its sequence (its last
    # id was kept in the ghost table): ids 1..4 were lost meanwhile.
    assert table.observe("b", 5) == N
    assert table.evicted == 2 and "a" not in table
    assert table.snapshot()["b"].lost == 4 and table.totals()["lost"] == 4


def test_sender_table_passes_tracker_arguments():
    table = SenderTable(window=4, modulus=16, restart_threshold=4)
    for seq in (14, 15, 0):
        table.observe("x", seq)
    tracker = table.get("x")
    assert tracker is not None and tracker.modulus == 16 and tracker.window == 4
    assert table.snapshot()["x"] == SenderStats(received=3, highest=0)
    table.forget("x")
    assert len(table) == 0 and table.get("x") is None


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"max_senders": 0}, ValueError, "max_senders=0 is out of range"),
        ({"max_senders": None}, TypeError, "max_senders=None must be an int"),
        ({"window": 0}, ValueError, "window=0 is out of range"),
        ({"modulus": 4}, ValueError, "modulus=4 is out of range"),
    ],
)
def test_sender_table_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        SenderTable(**kwargs)


# -- observe_many: the batched path must equal one observe() per id ----------



@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.one_of(
    st.tuples(st.just("run"), st.integers(1, 3000)),
    st.tuples(st.just("jump"), st.integers(-3000, 3000)),
), max_size=8))
def test_observe_many_equals_observe(start, steps):
    ids = []
    cur = start
    for kind, amount in steps:
        if kind == "run":
            ids.extend((cur + k) % 2**32 for k in range(amount))
            cur = (cur + amount) % 2**32
        else:
            cur = (cur + amount) % 2**32
            ids.append(cur)
    one, many = SequenceTracker(window=1024), SequenceTracker(window=1024)
    for seq in ids:
        one.observe(seq)
    arr = np.array(ids, dtype=np.uint32)
    for chunk in np.array_split(arr, 7) if len(arr) else []:
        many.observe_many(chunk)
    assert many.stats() == one.stats()


def test_observe_many_fast_path_across_wraparound():
    tracker = SequenceTracker()
    tracker.observe(2**32 - 3)
    tracker.observe_many(np.array([2**32 - 2, 2**32 - 1, 0, 1], dtype=np.uint32))
    assert tracker.stats() == SenderStats(received=5, lost=0, duplicates=0, reordered=0, restarts=0, highest=1)
    tracker.observe(0)
    assert tracker.stats().duplicates == 1


# ---------------------------------------------------------------- restart()


def test_restart_told_by_the_caller_starts_the_stream_afresh():
    # A restart after a short run: by the ids alone the new run looks like
    # duplicates (0..4 again). Told of the restart, the tracker counts one
    # and takes the new run as new.
    told, untold = SequenceTracker(), SequenceTracker()
    for seq in range(5):
        told.observe(seq)
        untold.observe(seq)
    told.restart()
    assert told.stats() == SenderStats(received=5, restarts=1, highest=None)
    assert [told.observe(seq) for seq in range(5)] == [F, N, N, N, N]
    assert told.stats() == SenderStats(received=10, restarts=1, highest=4)
    assert [untold.observe(seq) for seq in range(5)] == [D] * 5


def test_restart_keeps_losses_and_is_counted_once():
    tracker = SequenceTracker()
    for seq in (0, 1, 5):
        tracker.observe(seq)
    tracker.restart()
    tracker.restart()  # no arrival in between: still one restart
    assert tracker.observe(3) == F
    assert tracker.stats() == SenderStats(received=4, lost=3, restarts=1, highest=3)


def test_restart_of_a_fresh_tracker_changes_nothing():
    tracker = SequenceTracker()
    tracker.restart()
    assert tracker.stats() == SenderStats()


def test_restart_then_observe_many():
    tracker = SequenceTracker()
    tracker.observe_many(np.arange(10, dtype=np.uint32))
    tracker.restart()
    tracker.observe_many(np.arange(10, dtype=np.uint32))
    assert tracker.stats() == SenderStats(received=20, restarts=1, highest=9)


def test_sender_table_restart():
    table = SenderTable()
    for seq in range(3):
        table.observe("a", seq)
        table.observe("b", seq)
    table.restart("a")
    table.restart("unknown")  # not tracked: nothing to do, nothing created
    assert "unknown" not in table
    assert table.observe("a", 0) == F and table.observe("b", 0) == D
    assert table.snapshot() == {
        "a": SenderStats(received=4, restarts=1, highest=0),
        "b": SenderStats(received=3, duplicates=1, highest=2),
    }


def test_sender_table_ghosts_are_bounded():
    """Evicted senders' last ids are kept for at most 64 x max_senders
    senders (the oldest forgotten first): one that comes back within the
    bound continues its sequence, one forgotten beyond it starts afresh."""
    table = SenderTable(max_senders=2)
    for k in range(2 + 128 + 1):  # the first sender's ghost is pushed out
        table.observe(k, 10)
    assert table.evicted == 129
    assert table.observe(0, 20) == F  # forgotten beyond the bound: afresh
    assert table.observe(5, 20) == N  # within it: 11..19 were lost
    assert table.totals()["lost"] == 9
    # restart() of an evicted sender forgets its ghost: it starts afresh.
    table.observe(200, 1)
    table.observe(201, 1)
    table.restart(6)
    assert table.observe(6, 30) == F


# -- an evicted sender's late readout (issue 13, attack 2) ------------------------


def test_sender_table_a_late_readout_after_eviction_is_not_a_restart_with_phantom_losses():
    """SenderTable (public): sender K's readout 97 is late (it arrives
    after 98, 99); meanwhile K was evicted by another sender. When K comes
    back with 97, 100, 101, 102, its ghost (highest 99) resumes the stream
    and 97 is taken as a restart: restarts 1 and lost 3, while nothing was
    lost (the same arrivals with K never evicted: lost 0, reordered 1,
    restarts 0). The ghost table must not turn a late arrival into phantom
    losses."""
    from mcast_trio import SenderTable

    table = SenderTable(1)
    for seq in range(100):
        if seq != 97:
            table.observe("K", seq)
    table.observe("X", 0)  # evicts K
    for seq in (97, 100, 101, 102):
        table.observe("K", seq)
    totals = table.totals()
    assert totals["lost"] == 0 and totals["restarts"] == 0, totals
    assert totals["reordered"] == 1 and totals["evicted"] == 2, totals
    # The resumed tracker's own counters never go negative.
    assert table.snapshot()["K"].lost == 0


@pytest.mark.parametrize("evict", [False, True])
def test_sender_table_a_repeat_after_eviction_is_duplicates_as_without_eviction(evict):
    table = SenderTable(1)
    for seq in range(100):
        table.observe("K", seq)
    if evict:
        table.observe("X", 0)
    for seq in range(50):
        assert table.observe("K", seq) == "duplicate"
    totals = table.totals()
    assert totals["duplicates"] == 50 and totals["restarts"] == 0 and totals["lost"] == 0, totals


def test_sender_table_resumed_window_still_counts_a_real_gap_and_a_real_restart():
    table = SenderTable(1, window=16)
    for seq in range(10):
        if seq != 5:
            table.observe("K", seq)
    table.observe("X", 0)  # evicts K (5 missing in its window)
    assert table.observe("K", 12) == "new"  # 10, 11 lost while evicted
    assert table.totals()["lost"] == 3
    assert table.observe("K", 5) == "reordered"
    assert table.totals()["lost"] == 2
    table.observe("X", 1)  # evicts K again
    assert table.observe("K", 100000) == "new"  # below restart_threshold: a gap
    table.observe("X", 2)
    assert table.observe("K", 3) == "restart"  # far outside the window
