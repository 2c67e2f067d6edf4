"""Decoder benchmark: compiled vs pure-Python reference (vs a plain C loop),
side by side on the same simulator stream, in one run.

Prints hits per second for each and their ratios, plus the number of Python
memory allocations one batch makes (to show the output is allocated once per
batch, not per hit). Run with ``make bench`` or
``python benchmarks/bench_decode.py [--datagrams N]``.

The plain C loop is an upper bound for comparison: it reverses the bits and
extracts the fields of every 8-byte word after skipping IDLE/PADDING bytes,
without the spec's walk (orphans, extra bytes, start bytes inside words). It
is compiled with the system C compiler at run time and skipped (saying so) if
there is none.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

import mcast_trio
from mcast_trio import HIT_DTYPE, decode_readouts
from mcast_trio import _reference
from mcast_trio.sim import DaqSimulator

PLAIN_C = r"""
#include <stdint.h>
#include <stddef.h>
typedef struct __attribute__((packed)) {
    uint64_t timestamp; double tot_us; uint32_t readout_id, decoding_order, ts_dec1, ts_dec2;
    uint16_t ts_coarse1, ts_coarse2;
    uint8_t chip_id, payload, row, column, ts_neg1, ts_fine1, ts_tdc1, ts_neg2, ts_fine2, ts_tdc2, pad0, pad1;
} hit_t;
static inline uint32_t gray(uint32_t g) { g ^= g >> 16; g ^= g >> 8; g ^= g >> 4; g ^= g >> 2; g ^= g >> 1; return g; }
size_t plain(const uint8_t *buf, const int64_t *offs, const int64_t *lens, size_t count, hit_t *out) {
    size_t nh = 0;
    for (size_t k = 0; k < count; k++) {
        const uint8_t *d = buf + offs[k];
        int64_t n = lens[k];
        if (n < 19) continue;
        uint32_t rid = d[3] | d[4] << 8 | d[5] << 16 | (uint32_t)d[6] << 24;
        uint64_t ts = 0; for (int i = 0; i < 8; i++) ts |= (uint64_t)d[7 + i] << (8 * i);
        int64_t cur = 19; uint32_t order = 0;
        while (cur + 8 <= n) {
            if (d[cur] == 0xbc || d[cur] == 0xff) { cur++; continue; }
            uint64_t x = 0; for (int i = 0; i < 8; i++) x |= (uint64_t)d[cur + i] << (8 * i);
            x = ((x >> 1) & 0x5555555555555555ULL) | ((x & 0x5555555555555555ULL) << 1);
            x = ((x >> 2) & 0x3333333333333333ULL) | ((x & 0x3333333333333333ULL) << 2);
            x = ((x >> 4) & 0x0F0F0F0F0F0F0F0FULL) | ((x & 0x0F0F0F0F0F0F0F0FULL) << 4);
            x = __builtin_bswap64(x);
            hit_t *h = &out[nh++];
            uint32_t c1 = (x >> 31) & 0x3FFF, f1 = (x >> 28) & 7, c2 = (x >> 8) & 0x3FFF, f2 = (x >> 5) & 7;
            uint32_t d1 = gray((c1 << 3) + f1), d2 = gray((c2 << 3) + f2);
            if (d2 < d1) d2 += 131072;
            h->timestamp = ts; h->tot_us = (double)(d2 - d1) / 20.0; h->readout_id = rid; h->decoding_order = order++;
            h->ts_dec1 = d1; h->ts_dec2 = d2; h->ts_coarse1 = c1; h->ts_coarse2 = c2;
            h->chip_id = (x >> 59) & 0x1F; h->payload = (x >> 56) & 7; h->row = (x >> 51) & 0x1F;
            h->column = (x >> 46) & 0x1F; h->ts_neg1 = (x >> 45) & 1; h->ts_fine1 = f1; h->ts_tdc1 = (x >> 23) & 0x1F;
            h->ts_neg2 = (x >> 22) & 1; h->ts_fine2 = f2; h->ts_tdc2 = x & 0x1F;
            cur += 8;
        }
    }
    return nh;
}
"""


def _plain_c():
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    tmp = tempfile.mkdtemp(prefix="mcast-bench-")
    src = os.path.join(tmp, "plain.c")
    lib = os.path.join(tmp, "plain.so")
    with open(src, "w") as f:
        f.write(PLAIN_C)
    subprocess.run([cc, "-O3", "-shared", "-fPIC", "-o", lib, src], check=True)
    fn = ctypes.CDLL(lib).plain
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_size_t, ctypes.c_void_p]
    return fn


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datagrams", type=int, default=50_000, help="simulated readouts (default 50000)")
    parser.add_argument("--batch", type=int, default=1024, help="datagrams per decode_readouts call")
    parser.add_argument("--mean-hits", type=float, default=12.0, help="mean hits per readout")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-datagrams", type=int, default=2_000,
                        help="readouts decoded by the (slow) reference")
    args = parser.parse_args()

    print(f"mcast_trio {mcast_trio.__version__}, decoder backend: {mcast_trio.decoder_backend()}")
    if mcast_trio.decoder_backend() != "compiled":
        sys.exit("the compiled decoder is not active; this benchmark compares it with the reference")
    sim = DaqSimulator(seed=1, mean_hits=args.mean_hits, split_fraction=0.05, start_ns=0)
    datagrams = sim.generate(args.datagrams).datagrams()
    lengths = np.array([len(d) for d in datagrams], dtype=np.int64)
    buf = b"".join(datagrams)
    total_hits = len(decode_readouts(buf, lengths).hits)
    print(f"stream: {len(datagrams)} readouts, {len(buf) / 1e6:.1f} MB, {total_hits} hits "
          f"({total_hits / len(datagrams):.1f} per readout, {len(buf) / len(datagrams):.0f} B per datagram)")

    # Compiled, in receiver-sized batches (allocation included).
    starts = np.arange(0, len(datagrams), args.batch)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])

    def compiled_batches():
        extra, last = None, -1
        for s in starts:
            e = min(s + args.batch, len(datagrams))
            b = decode_readouts(buf, lengths[s:e], offsets=offsets[s:e], extra_bytes=extra, last_id=last)
            extra, last = b.extra_bytes, b.last_id

    t_batches = best_of(args.repeats, compiled_batches)
    t_whole = best_of(args.repeats, lambda: decode_readouts(buf, lengths))

    # The decoding loop alone, into preallocated output.
    from mcast_trio import _decode
    bound = int((lengths // 8).sum()) + len(lengths)
    hits_out = np.empty(bound, HIT_DTYPE)
    rows_out = np.zeros(len(lengths), mcast_trio.READOUT_DTYPE)
    t_core = best_of(args.repeats, lambda: _decode.decode_batch(buf, offsets, lengths, None, 0, -1,
                                                               hits_out.view(np.uint8), rows_out.view(np.uint8)))

    # Reference, on a prefix of the same stream.
    ref = datagrams[: args.reference_datagrams]
    ref_hits = len(decode_readouts(ref).hits)
    t_ref = best_of(1, lambda: _reference.decode_batch(ref))
    ref_rate = ref_hits / t_ref

    plain = _plain_c()
    plain_rate = None
    if plain is not None:
        out = np.empty(bound, HIT_DTYPE)
        t_plain = best_of(args.repeats, lambda: plain(
            ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p), offsets.ctypes.data, lengths.ctypes.data,
            len(lengths), out.ctypes.data))
        plain_rate = total_hits / t_plain

    # Allocations made by one batch (Python-visible blocks).
    s, e = 0, min(args.batch, len(datagrams))
    decode_readouts(buf, lengths[s:e], offsets=offsets[s:e])
    tracemalloc.start()
    snap0 = tracemalloc.take_snapshot()
    kept = decode_readouts(buf, lengths[s:e], offsets=offsets[s:e])
    snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    blocks = sum(stat.count_diff for stat in snap1.compare_to(snap0, "lineno") if stat.count_diff > 0)

    rate_batches = total_hits / t_batches
    rate_whole = total_hits / t_whole
    rate_core = total_hits / t_core
    print()
    print(f"{'decoder':<44}{'hits/s':>14}{'vs reference':>15}")
    print(f"{'compiled, batches of %d datagrams' % args.batch:<44}{rate_batches:>14,.0f}{rate_batches / ref_rate:>14.0f}x")
    print(f"{'compiled, whole stream in one call':<44}{rate_whole:>14,.0f}{rate_whole / ref_rate:>14.0f}x")
    print(f"{'compiled loop only (output preallocated)':<44}{rate_core:>14,.0f}{rate_core / ref_rate:>14.0f}x")
    print(f"{'pure-Python reference':<44}{ref_rate:>14,.0f}{1:>14.0f}x")
    if plain_rate is not None:
        print(f"{'plain C loop (no walk rules; upper bound)':<44}{plain_rate:>14,.0f}{plain_rate / ref_rate:>14.0f}x")
        print(f"\ncompiled batches / plain C loop: {rate_batches / plain_rate:.2f}")
    else:
        print("\nplain C loop: skipped (no C compiler found)")
    print(f"target 50 M hits/s (batches): {'met' if rate_batches >= 50e6 else 'NOT met'}")
    print(f"allocations in one batch of {e - s} datagrams / {len(kept.hits)} hits: {blocks} Python blocks")


if __name__ == "__main__":
    main()
