"""Transport benchmark: mcast_trio's sender and receiver against plain C
``sendmmsg``/``recvmmsg`` and a plain Python ``sendto`` loop, in one run.

Everything runs inside a private network namespace (``tools/netns-run``):
loopback multicast to 239.255.77.x, nothing leaves the machine. The traffic is
serialized simulator readouts of about 1 KiB, generated once and sent
cyclically (a pool of ``--pool`` readouts, so readout ids restart at every
pass through the pool). Sender and receiver are separate processes (this
script, started again with ``--role``), pinned to different CPUs when there
are two or more, like a DAQ host and a monitor host; the receiver says when
it has joined, then the sender starts.

Measured:

* senders (each sends ``--datagrams`` to a C receiver that counts them; rate
  = datagrams handed to the kernel per second, at the sender): a plain Python
  ``sendto`` loop, C ``sendmmsg`` (batches of 64, 256, 1024), mcast_trio
  ``send_many`` (chunks of ``--chunk``; the API the target applies to) and
  per-message ``await sender.send()``;
* receivers on the same traffic (full speed, from C ``sendmmsg`` and from the
  mcast_trio sender): the mcast_trio receiver (``open_receiver(...,
  readout_class=AstroPix4Readout)`` consumed with ``batches()``, decoding on)
  and a C ``recvmmsg`` reference (batches of 64, same 4 MiB ``SO_RCVBUF``);
* the sustainable receive rate of each receiver: the highest rate of a paced C
  sender at which it loses < 1 %;
* memory: ``--soak`` datagrams through mcast_trio sender -> mcast_trio
  receiver (decoding on), RSS of both sampled every 0.25 s.

Run with ``make bench`` or ``tools/netns-run python benchmarks/bench_transport.py``
(``--soak 10000000`` for the 10-million-datagram memory check). The C parts are
compiled with the system C compiler at run time.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

GROUP = "239.255.77.7"
BASE_PORT = 47100
RCVBUF = 4 * 1024 * 1024  # mcast_trio's receiver default (_sockets.DEFAULT_RCVBUF)
RECV_BATCH = 64  # the C reference's recvmmsg batch, like mcast_trio's default batch_size
RECV_SLOT = 65536  # bytes per receive slot, like mcast_trio's default max_datagram_size
LOSS_LIMIT = 0.01
RSS_INTERVAL = 0.25  # seconds between RSS samples of the soak

C_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

typedef struct {
    int64_t count, bytes, syscalls, waits, errors;
    double t_start, t_first, t_last, t_end;
    int64_t err;
} result_t;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sleep_until(double t) {
    struct timespec ts;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {}
}

/* Send n datagrams from the pool (cyclically) on a connected, blocking socket,
   `batch` per sendmmsg; paced to `rate` datagrams/s when rate > 0. */
int bench_send(int fd, const uint8_t *buf, const int64_t *offs, const int64_t *lens, int64_t pool,
               int64_t n, int batch, double rate, double deadline_s, result_t *r) {
    struct mmsghdr *m = calloc((size_t)batch, sizeof *m);
    struct iovec *iov = calloc((size_t)batch, sizeof *iov);
    int64_t sent = 0, k = 0;
    double t0;
    memset(r, 0, sizeof *r);
    if (!m || !iov) { free(m); free(iov); r->err = ENOMEM; return -1; }
    t0 = now();
    r->t_start = t0;
    while (sent < n) {
        int b = (n - sent) < batch ? (int)(n - sent) : batch, off = 0, i;
        for (i = 0; i < b; i++) {
            iov[i].iov_base = (void *)(buf + offs[k]);
            iov[i].iov_len = (size_t)lens[k];
            memset(&m[i], 0, sizeof m[i]);
            m[i].msg_hdr.msg_iov = &iov[i];
            m[i].msg_hdr.msg_iovlen = 1;
            r->bytes += lens[k];
            if (++k == pool) k = 0;
        }
        if (rate > 0) {
            double due = t0 + (double)sent / rate;
            if (now() < due) sleep_until(due);
        }
        while (off < b) {
            int got = sendmmsg(fd, m + off, (unsigned int)(b - off), 0);
            if (got < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
                    struct pollfd p = {fd, POLLOUT, 0};
                    r->waits++;
                    poll(&p, 1, 10);
                    if (now() - t0 > deadline_s) { r->err = ETIMEDOUT; goto out; }
                    continue;
                }
                r->err = errno;
                goto out;
            }
            r->syscalls++;
            off += got;
        }
        sent += b;
    }
out:
    r->t_end = now();
    r->count = sent;
    free(m); free(iov);
    return r->err ? -1 : 0;
}

/* Receive with recvmmsg (batch per call, slot bytes per datagram) until n
   datagrams arrived, or `ctl` becomes readable (the sender is done: drain
   what is queued and stop), or deadline_s passed. */
int bench_recv(int fd, int ctl, int64_t n, int batch, int64_t slot, double deadline_s, result_t *r) {
    uint8_t *buf = malloc((size_t)batch * (size_t)slot);
    struct mmsghdr *m = calloc((size_t)batch, sizeof *m);
    struct iovec *iov = calloc((size_t)batch, sizeof *iov);
    struct sockaddr_storage *names = calloc((size_t)batch, sizeof *names);
    int done = 0, i;
    double t0 = now();
    memset(r, 0, sizeof *r);
    r->t_start = t0;
    if (!buf || !m || !iov || !names) { r->err = ENOMEM; goto out; }
    for (i = 0; i < batch; i++) {
        iov[i].iov_base = buf + (size_t)i * (size_t)slot;
        iov[i].iov_len = (size_t)slot;
        m[i].msg_hdr.msg_iov = &iov[i];
        m[i].msg_hdr.msg_iovlen = 1;
        m[i].msg_hdr.msg_name = &names[i];
    }
    for (;;) {
        for (;;) {  /* drain */
            int got;
            double t;
            for (i = 0; i < batch; i++) m[i].msg_hdr.msg_namelen = sizeof names[i];
            got = recvmmsg(fd, m, (unsigned int)batch, MSG_DONTWAIT, NULL);
            if (got < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) break;
                r->err = errno;
                goto out;
            }
            t = now();
            if (r->count == 0) r->t_first = t;
            r->t_last = t;
            r->count += got;
            r->syscalls++;
            for (i = 0; i < got; i++) r->bytes += m[i].msg_len;
            if (r->count >= n) goto out;
        }
        if (done) break;
        if (now() - t0 > deadline_s) { r->err = ETIMEDOUT; break; }
        {
            struct pollfd p[2] = {{fd, POLLIN, 0}, {ctl, POLLIN, 0}};
            r->waits++;
            if (poll(p, 2, 100) > 0 && (p[1].revents & (POLLIN | POLLHUP))) done = 1;
        }
    }
out:
    r->t_end = now();
    free(buf); free(m); free(iov); free(names);
    return r->err ? -1 : 0;
}
"""


class CResult(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("count", "bytes", "syscalls", "waits", "errors")] + [
        (name, ctypes.c_double) for name in ("t_start", "t_first", "t_last", "t_end")] + [("err", ctypes.c_int64)]

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name, _ in self._fields_}


def build_c(tmp: str) -> str:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        sys.exit("bench_transport: no C compiler (cc/gcc) found; the C references need one")
    src = os.path.join(tmp, "transport_ref.c")
    lib = os.path.join(tmp, "transport_ref.so")
    with open(src, "w") as f:
        f.write(C_SOURCE)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", lib, src], check=True)
    return lib


def load_c(path: str):
    lib = ctypes.CDLL(path)
    lib.bench_send.restype = ctypes.c_int
    lib.bench_send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_double,
                               ctypes.POINTER(CResult)]
    lib.bench_recv.restype = ctypes.c_int
    lib.bench_recv.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int64,
                               ctypes.c_double, ctypes.POINTER(CResult)]
    return lib


# -- child processes ------------------------------------------------------------------------------

def emit(**fields) -> None:
    """One JSON line to the parent (stdout is the protocol channel)."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def wait_line() -> str:
    """Block until the parent writes a line on stdin."""
    line = sys.stdin.readline()
    return line.strip()


def cpu_s() -> float:
    """CPU time (user + system) of this process so far, seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def load_pool(path: str):
    import numpy as np

    with np.load(path) as z:
        buf = z["buffer"].tobytes()
        lengths = z["lengths"].astype(np.int64)
    offsets = np.zeros(len(lengths), np.int64)
    offsets[1:] = np.cumsum(lengths)[:-1]
    datagrams = [buf[o:o + n] for o, n in zip(offsets.tolist(), lengths.tolist())]
    return buf, offsets, lengths, datagrams


def drop_count(sock) -> int | None:
    """SK_MEMINFO_DROPS of a socket (SO_MEMINFO), or None."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, 55, 4 * 16)  # SO_MEMINFO
    except OSError:
        return None
    return struct.unpack_from("=I", raw, 4 * 8)[0] if len(raw) >= 36 else None


def plain_receiver_socket(port: int) -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    sock.bind((GROUP, port))
    mreq = socket.inet_aton(GROUP) + socket.inet_aton("127.0.0.1")
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    return sock, granted


def plain_sender_socket(port: int, connect: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    if connect:
        sock.connect((GROUP, port))
    return sock


def role_recv_c(p: dict) -> None:
    lib = load_c(p["lib"])
    sock, granted = plain_receiver_socket(p["port"])
    emit(ready=True, rcvbuf=granted)
    r = CResult()
    cpu0 = cpu_s()
    lib.bench_recv(sock.fileno(), sys.stdin.fileno(), p["n"], RECV_BATCH, RECV_SLOT, p["deadline"],
                   ctypes.byref(r))
    out = r.as_dict()
    out.update(received=r.count, rcvbuf=granted, kernel_drops=drop_count(sock), rss_kb=rss_kb(),
               cpu=cpu_s() - cpu0, cpu_total=cpu_s())
    sock.close()
    emit(result=out)


def role_send_c(p: dict) -> None:
    lib = load_c(p["lib"])
    buf, offsets, lengths, _ = load_pool(p["pool"])
    sock = plain_sender_socket(p["port"], connect=True)
    emit(ready=True)
    wait_line()
    r = CResult()
    cbuf = ctypes.c_char_p(buf)
    cpu0 = cpu_s()
    lib.bench_send(sock.fileno(), ctypes.cast(cbuf, ctypes.c_void_p), offsets.ctypes.data, lengths.ctypes.data,
                   len(lengths), p["n"], p["batch"], float(p.get("rate") or 0), p["deadline"], ctypes.byref(r))
    sock.close()
    out = r.as_dict()
    out.update(sent=r.count, elapsed=r.t_end - r.t_start, cpu=cpu_s() - cpu0, cpu_total=cpu_s())
    emit(result=out)


def role_send_sendto(p: dict) -> None:
    _, _, _, datagrams = load_pool(p["pool"])
    sock = plain_sender_socket(p["port"], connect=False)
    address = (GROUP, p["port"])
    n = p["n"]
    emit(ready=True)
    wait_line()
    sendto = sock.sendto
    left = n
    cpu0 = cpu_s()
    t0 = time.perf_counter()
    while left:
        part = datagrams if left >= len(datagrams) else datagrams[:left]
        for d in part:
            sendto(d, address)
        left -= len(part)
    elapsed = time.perf_counter() - t0
    sock.close()
    emit(result=dict(sent=n, elapsed=elapsed, cpu=cpu_s() - cpu0, cpu_total=cpu_s()))


def role_send_mt(p: dict) -> None:
    import trio

    from mcast_trio import open_sender

    _, _, _, datagrams = load_pool(p["pool"])
    n, chunk, rate, mode = p["n"], p["chunk"], p.get("rate") or 0, p["mode"]
    chunks = [datagrams[i:i + chunk] for i in range(0, len(datagrams), chunk)]
    samples = []

    async def sample_rss(sender):
        while True:
            stats = sender.statistics()
            samples.append((time.monotonic(), stats.datagrams, rss_kb(), stats.queued))
            await trio.sleep(RSS_INTERVAL)

    async def main():
        async with open_sender(GROUP, p["port"], framing=p["framing"]) as sender:
            emit(ready=True)
            await trio.lowlevel.wait_readable(sys.stdin.fileno())
            wait_line()
            async with trio.open_nursery() as nursery:
                if p.get("rss"):
                    nursery.start_soon(sample_rss, sender)
                cpu0 = cpu_s()
                t0 = time.perf_counter()
                tr0 = trio.current_time()
                sent = 0
                if mode == "many":
                    while sent < n:
                        for c in chunks:
                            if sent + len(c) > n:
                                c = c[:n - sent]
                            if rate:
                                await trio.sleep_until(tr0 + sent / rate)
                            await sender.send_many(c)
                            sent += len(c)
                            if sent >= n:
                                break
                else:
                    send = sender.send
                    while sent < n:
                        part = datagrams if n - sent >= len(datagrams) else datagrams[:n - sent]
                        for d in part:
                            await send(d)
                        sent += len(part)
                nursery.cancel_scope.cancel()
        # Leaving open_sender's block waited until everything was handed to the kernel.
        elapsed = time.perf_counter() - t0
        cpu = cpu_s() - cpu0
        stats = sender.statistics()
        samples.append((time.monotonic(), stats.datagrams, rss_kb(), stats.queued))
        return dict(sent=stats.datagrams, elapsed=elapsed, syscalls=stats.syscalls, waits=stats.waits,
                    errors=stats.errors, last_error=stats.last_error, rss=samples, cpu=cpu,
                    cpu_total=cpu_s())

    emit(result=trio.run(main))


def role_recv_mt(p: dict) -> None:
    import trio

    from mcast_trio import AstroPix4Readout, open_receiver

    n = p["n"]
    state = dict(count=0, hits=0, batches=0, t_first=0.0, t_last=0.0)
    samples = []
    profile = None
    if p.get("profile"):
        import cProfile

        profile = cProfile.Profile()

    async def main():
        async with open_receiver(GROUP, p["port"], readout_class=AstroPix4Readout,
                                 **p.get("options", {})) as rx:
            result = {}

            async def consume(cancel_scope):
                monotonic = time.monotonic
                async for batch in rx.batches():
                    t = monotonic()
                    if not state["count"]:
                        state["t_first"] = t
                    state["t_last"] = t
                    state["count"] += len(batch.readouts) - len(batch.errors)
                    state["hits"] += len(batch.hits)
                    state["batches"] += 1
                    if state["count"] >= n:
                        break
                cancel_scope.cancel()

            async def watch_parent(cancel_scope):
                # The parent writes a line when the sender is done: stop once
                # the queue is drained (no progress for 0.1 s).
                await trio.lowlevel.wait_readable(sys.stdin.fileno())
                while True:
                    before = state["count"]
                    await trio.sleep(0.1)
                    if state["count"] == before:
                        break
                cancel_scope.cancel()

            async def sample_rss():
                while True:
                    samples.append((time.monotonic(), rx.statistics().datagrams, rss_kb()))
                    await trio.sleep(RSS_INTERVAL)

            with trio.move_on_after(p["deadline"]) as deadline:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(consume, nursery.cancel_scope)
                    nursery.start_soon(watch_parent, nursery.cancel_scope)
                    if p.get("rss"):
                        nursery.start_soon(sample_rss)
                    cpu0 = cpu_s()
                    emit(ready=True, rcvbuf=rx.statistics().rcvbuf)
                    if profile is not None:
                        profile.enable()
            if profile is not None:
                profile.disable()
            cpu = cpu_s() - cpu0
            s = rx.statistics()
            samples.append((time.monotonic(), s.datagrams, rss_kb()))
            result.update(received=state["count"], hits=state["hits"], batches=state["batches"],
                          t_first=state["t_first"], t_last=state["t_last"], timed_out=deadline.cancelled_caught,
                          datagrams=s.datagrams, readouts=s.readouts, malformed=s.malformed, dropped=s.dropped,
                          kernel_drops=s.kernel_drops, lost=s.lost, restarts=s.restarts, rcvbuf=s.rcvbuf,
                          rss=samples, cpu=cpu, cpu_total=cpu_s())
            return result

    result = trio.run(main)
    if profile is not None:
        import io
        import pstats

        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
        result["profile"] = text.getvalue()
    emit(result=result)


ROLES = {"recv-c": role_recv_c, "recv-mt": role_recv_mt, "send-c": role_send_c,
         "send-sendto": role_send_sendto, "send-mt": role_send_mt}


# -- the parent -----------------------------------------------------------------------------------

class Child:
    """This script started again with ``--role``; talks JSON lines."""

    def __init__(self, role: str, params: dict, cpu: int | None) -> None:
        self.role = role
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", role,
                                      "--params", json.dumps(params)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buffer = b""
        if cpu is not None:
            try:
                os.sched_setaffinity(self.proc.pid, {cpu})
            except OSError:
                pass

    def read(self, key: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                message = json.loads(line)
                if key in message:
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(f"{self.role}: no {key!r} within {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 1 << 16)
                if not data:
                    self.proc.wait(timeout=5)
                    raise RuntimeError(f"{self.role} exited (status {self.proc.returncode}) without {key!r}")
                self._buffer += data

    def tell(self, line: str) -> None:
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it has finished already (a receiver that got all N datagrams)

    def finish(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Bench:
    def __init__(self, args, lib: str, pool: str) -> None:
        self.args = args
        self.lib = lib
        self.pool = pool
        self.port = BASE_PORT
        cpus = sorted(os.sched_getaffinity(0))
        self.cpus = (cpus[0], cpus[1]) if (len(cpus) >= 2 and not args.no_pin) else (None, None)
        self.foreign: list[float] = []  # CPUs used by other processes during each run

    def run(self, receiver: str, sender: str, n: int, **sender_params) -> tuple[dict, dict]:
        """One sender -> one receiver run; returns (sender result, receiver result)."""
        self.port += 1
        deadline = 30.0 + n / 20_000
        rparams = dict(n=n, port=self.port, lib=self.lib, deadline=deadline, options=self.args.rx_options)
        rparams.update(sender_params.pop("receiver_params", {}))
        sparams = dict(n=n, port=self.port, lib=self.lib, pool=self.pool, deadline=deadline, batch=64,
                       chunk=self.args.chunk, mode="many", framing="auto")
        sparams.update(sender_params)
        busy0, t0, own0 = busy_cpu_s(), time.monotonic(), cpu_s()
        rx = Child(receiver, rparams, self.cpus[1])
        tx = Child(sender, sparams, self.cpus[0])
        try:
            rx.read("ready", 60)
            tx.read("ready", 60)
            tx.tell("go")
            sres = tx.read("result", deadline + 30)["result"]
            rx.tell("done")
            rres = rx.read("result", 60)["result"]
        finally:
            tx.finish()
            rx.finish()
        ours = sres["cpu_total"] + rres["cpu_total"] + cpu_s() - own0
        self.foreign.append(max(0.0, busy_cpu_s() - busy0 - ours) / (time.monotonic() - t0))
        sres["rate"] = sres["sent"] / sres["elapsed"] if sres["elapsed"] > 0 else 0.0
        span = rres["t_last"] - rres["t_first"]
        rres["rate"] = rres["received"] / span if span > 0 else 0.0
        rres["fraction"] = rres["received"] / sres["sent"] if sres["sent"] else 0.0
        return sres, rres

    def best(self, receiver: str, sender: str, n: int, repeats: int, key: str, **params) -> tuple[dict, dict]:
        """Best of ``repeats`` runs, by the sender's (key='send') or receiver's (key='recv') figure."""
        runs = [self.run(receiver, sender, n, **dict(params)) for _ in range(repeats)]
        if key == "send":
            return max(runs, key=lambda r: r[0]["rate"])
        return max(runs, key=lambda r: (r[1]["fraction"], r[1]["rate"]))

    def sustainable(self, receiver: str, top: float, n_seconds: float) -> tuple[float, list]:
        """Highest rate of a paced C sender with < 1 % loss (bisection)."""
        trials = []

        def loss_at(rate: float) -> float:
            # Up to `repeats` tries (a disturbance by another process is not the receiver's limit).
            n = max(50_000, int(rate * n_seconds))
            for _ in range(self.args.repeats):
                s, r = self.run(receiver, "send-c", n, rate=rate, batch=64)
                loss = 1 - r["fraction"]
                trials.append((rate, s["rate"], loss))
                if loss < LOSS_LIMIT:
                    break
            return loss

        if loss_at(top) < LOSS_LIMIT:
            return top, trials  # sender-limited
        lo, hi = top * 0.5, top
        while loss_at(lo) >= LOSS_LIMIT and lo > 5_000:
            hi, lo = lo, lo * 0.5
        for _ in range(self.args.search_steps):
            mid = (lo * hi) ** 0.5
            if loss_at(mid) < LOSS_LIMIT:
                lo = mid
            else:
                hi = mid
        return lo, trials


def busy_cpu_s() -> float:
    """CPU time all processes of the machine used so far (/proc/stat), seconds."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def rss_trend(samples: list, skip_fraction: float = 0.3) -> tuple[float, float, float]:
    """RSS after warm-up (the first ``skip_fraction`` of the datagrams: queues fill up), from ``(time,
    datagrams, rss_kb, ...)`` samples: (max of the second half - max of the first half, in MB; least-squares
    slope in MB per million datagrams; max - min, in MB). Maxima rather than end points or means: the
    allocator's RSS moves up and down by tens of MB (numpy buffers of a few hundred kB come and go) without
    growing; a leak raises the maxima."""
    total = samples[-1][1] if samples else 0
    warm = [x for x in samples if x[1] >= skip_fraction * total]
    if len(warm) < 4:
        return 0.0, 0.0, 0.0
    xs = [x[1] / 1e6 for x in warm]
    ys = [x[2] / 1024 for x in warm]
    half = len(ys) // 2
    growth = max(ys[half:]) - max(ys[:half])
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return growth, slope, max(ys) - min(ys)


def make_pool(path: str, size: int, mean_hits: float):
    import numpy as np

    from mcast_trio.sim import DaqSimulator

    sim = DaqSimulator(seed=1, mean_hits=mean_hits, split_fraction=0.05, start_ns=0)
    batch = sim.generate(size)
    np.savez(path, buffer=np.frombuffer(batch.buffer, np.uint8), lengths=batch.lengths)
    return batch


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--datagrams", type=int, default=500_000, help="datagrams per run (default 500000)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per figure, best kept (default 2)")
    parser.add_argument("--pool", type=int, default=16_384, help="distinct readouts sent cyclically")
    parser.add_argument("--mean-hits", type=float, default=110.0, help="mean hits per readout (~1 KiB)")
    parser.add_argument("--chunk", type=int, default=1024, help="datagrams per send_many call")
    parser.add_argument("--search-seconds", type=float, default=1.5, help="length of one sustainable-rate trial")
    parser.add_argument("--search-steps", type=int, default=4, help="bisection steps of the rate search")
    parser.add_argument("--soak", type=int, default=4_000_000,
                        help="datagrams of the memory soak (default 4000000; the target is 10000000)")
    parser.add_argument("--rx-option", action="append", default=[], metavar="NAME=INT",
                        help="an integer option for the mcast_trio receiver, e.g. batch_size=256 (repeatable)")
    parser.add_argument("--check", action="store_true", help="exit with status 1 if a target is not met")
    parser.add_argument("--no-pin", action="store_true", help="do not pin sender and receiver to CPUs")
    parser.add_argument("--profile", action="store_true",
                        help="also run the mcast_trio receiver under cProfile at full speed and print it")
    args = parser.parse_args()

    if args.role:
        ROLES[args.role](json.loads(args.params))
        return
    args.rx_options = {}
    for item in args.rx_option:
        name, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            parser.error(f"--rx-option {item!r} is not NAME=INT")
        args.rx_options[name] = int(value)

    if os.environ.get("NETNS_RUN_INSIDE") != "1" and os.environ.get("MCAST_TRIO_NETNS") != "1":
        sys.exit("bench_transport: refusing to run outside a private network namespace; "
                 "run it as: tools/netns-run python benchmarks/bench_transport.py")

    import mcast_trio
    from mcast_trio._io import _batchio

    tmp = tempfile.mkdtemp(prefix="mcast-bench-transport-")
    try:
        lib = build_c(tmp)
        pool_path = os.path.join(tmp, "pool.npz")
        batch = make_pool(pool_path, args.pool, args.mean_hits)
        bench = Bench(args, lib, pool_path)
        met = _run(args, bench, batch, mcast_trio, _batchio)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.check and not met:
        sys.exit(1)


def _run(args, bench: Bench, batch, mcast_trio, _batchio) -> None:
    n = args.datagrams
    sizes = batch.lengths
    print(f"mcast_trio {mcast_trio.__version__}, decoder {mcast_trio.decoder_backend()}, "
          f"recvmmsg/sendmmsg compiled: {_batchio.HAVE_MMSG}, receiver options {args.rx_options or 'default'}")
    print(f"machine: {os.cpu_count()} CPUs ({_cpu_model()}), Linux {platform.release()}, "
          f"Python {platform.python_version()}; sender/receiver pinned to CPUs {bench.cpus}; "
          f"load average {' '.join(_loadavg()[:3])}")
    print(f"traffic: {len(sizes)} simulator readouts sent cyclically to {GROUP} on lo; datagram size "
          f"mean {sizes.mean():.0f} B (min {sizes.min()}, max {sizes.max()}), "
          f"{len(batch.truth) / len(sizes):.1f} hits per readout; {n:,} datagrams per run, best of {args.repeats}")
    print()

    # (b) senders, each into the C reference receiver.
    many = f"mcast_trio send_many, chunks of {args.chunk}"
    senders = {}
    senders["Python sendto loop"] = bench.best("recv-c", "send-sendto", n, args.repeats, "send")
    for b in (64, 256, 1024):
        senders[f"C sendmmsg, batches of {b}"] = bench.best("recv-c", "send-c", n, args.repeats, "send", batch=b)
    senders[many] = bench.best("recv-c", "send-mt", n, args.repeats, "send", mode="many")
    senders["mcast_trio send_many, framing='raw'"] = bench.best(
        "recv-c", "send-mt", n, args.repeats, "send", mode="many", framing="raw")
    senders["mcast_trio await send() per message"] = bench.best(
        "recv-c", "send-mt", max(n // 5, 50_000), 1, "send", mode="one")
    c_best_name = max((k for k in senders if k.startswith("C ")), key=lambda k: senders[k][0]["rate"])
    c_best = senders[c_best_name][0]["rate"]
    c_best_batch = int(c_best_name.rsplit(" ", 1)[1])
    mt_send = senders[many][0]["rate"]
    c_best_cpu = min(senders[k][0]["cpu"] / senders[k][0]["sent"] for k in senders if k.startswith("C "))
    mt_send_cpu = senders[many][0]["cpu"] / senders[many][0]["sent"]
    print("(b) senders -> C recvmmsg receiver  (rate = datagrams/s handed to the kernel, at the sender)")
    print(f"{'sender':<44}{'sent/s':>12}{'vs best sendmmsg':>18}{'received':>11}{'loss':>9}{'CPU us/dgram':>14}")
    for name, (s, r) in senders.items():
        print(f"{name:<44}{s['rate']:>12,.0f}{s['rate'] / c_best:>17.2f}x{r['received']:>11,}"
              f"{pct(1 - r['fraction']):>9}{1e6 * s['cpu'] / s['sent']:>14.2f}")
    print("  (the target applies to send_many; send() queues and checkpoints per message)")
    print()

    # (a) receivers on the same traffic, full speed.
    rx = {}
    for traffic, role, params in (("C sendmmsg", "send-c", dict(batch=c_best_batch)),
                                  ("mcast_trio send_many", "send-mt", {})):
        for name, rrole in (("C recvmmsg reference", "recv-c"), ("mcast_trio receiver", "recv-mt")):
            rx[(traffic, name)] = bench.best(rrole, role, n, args.repeats, "recv", **params)
    print(f"(a) receivers, full-speed traffic (C sendmmsg in batches of {c_best_batch}); recv/s = received / "
          f"(last - first arrival); CPU = receiver process CPU time per datagram received")
    print(f"{'traffic':<22}{'receiver':<22}{'sent/s':>10}{'received':>11}{'recv/s':>10}{'loss':>8}"
          f"{'CPU us/dgram':>14}{'hits/s':>13}")
    for (traffic, name), (s, r) in rx.items():
        span = r["t_last"] - r["t_first"]
        hits = f"{r['hits'] / span:,.0f}" if r.get("hits") and span > 0 else "-"
        cpu = f"{1e6 * r['cpu'] / r['received']:.2f}" if r["received"] else "-"
        print(f"{traffic:<22}{name:<22}{s['rate']:>10,.0f}{r['received']:>11,}{r['rate']:>10,.0f}"
              f"{pct(1 - r['fraction']):>8}{cpu:>14}{hits:>13}")
    mt_r = rx[("C sendmmsg", "mcast_trio receiver")][1]
    ref_r = rx[("C sendmmsg", "C recvmmsg reference")][1]
    print(f"  mcast_trio receiver: rcvbuf granted {mt_r['rcvbuf']:,} B, kernel drops {mt_r['kernel_drops']}, "
          f"channel (overflow) drops {mt_r['dropped']}, malformed {mt_r['malformed']}; C reference: rcvbuf "
          f"granted {ref_r['rcvbuf']:,} B, kernel drops {ref_r['kernel_drops']}")
    print()

    # Sustainable receive rate: paced C sender, < 1 % loss.
    sustain = {}
    for role, name in (("recv-c", "C recvmmsg reference"), ("recv-mt", "mcast_trio receiver")):
        sustain[name] = bench.sustainable(role, c_best, args.search_seconds)
    print(f"sustainable receive rate: highest rate of a paced C sendmmsg sender (batches of 64) with loss < 1% "
          f"({args.search_steps} bisection steps, {args.search_seconds} s per trial, up to {args.repeats} tries)")
    for name, (rate, trials) in sustain.items():
        limited = " (sender-limited: no loss at full speed)" if rate == c_best else ""
        tried = ", ".join(f"{t:,.0f}:{pct(l)}" for t, _, l in trials)
        print(f"  {name:<24}{rate:>11,.0f} /s{limited}   [rate:loss  {tried}]")
    print()

    # Memory soak.
    soak_s, soak_r = bench.run("recv-mt", "send-mt", args.soak, rss=True, receiver_params=dict(rss=True))
    soak = {"receiver": soak_r["rss"], "sender": soak_s["rss"]}
    print(f"memory soak: {args.soak:,} datagrams, mcast_trio sender ({soak_s['rate']:,.0f}/s) -> mcast_trio "
          f"receiver, decoding on: received {soak_r['received']:,} ({pct(soak_r['fraction'])}), "
          f"{soak_r['hits']:,} hits; RSS sampled every {RSS_INTERVAL} s")
    flat = True
    for who, samples in soak.items():
        growth, slope, spread = rss_trend(samples)
        rss = [x[2] / 1024 for x in samples]
        ok = growth < 5.0
        flat = flat and ok
        print(f"  {who:<9} RSS MB: first {rss[0]:.1f}, last {rss[-1]:.1f}, max {max(rss):.1f}; after warm-up "
              f"(first 30% of datagrams): max of 2nd half - max of 1st half {growth:+.1f} MB, slope {slope:+.2f} "
              f"MB per million datagrams, range {spread:.1f} MB ({len(rss)} samples) {verdict(ok)}")
    queued = max((x[3] for x in soak_s["rss"]), default=0)
    print(f"  sender: at most {queued:,} datagrams were queued in the sender's channel at a sample (queue_size "
          f"bounds channel items: one send_many call is one item)")
    if args.soak < 10_000_000:
        print("  (the target is 10 million: tools/netns-run python benchmarks/bench_transport.py --soak 10000000)")
    print()

    if args.profile:
        _s, r = bench.run("recv-mt", "send-c", n, batch=c_best_batch, receiver_params=dict(profile=True))
        print(f"cProfile of the mcast_trio receiver process at full speed (received {pct(r['fraction'])}; "
              f"the profiler slows it down):")
        print(r["profile"])

    # Summary.
    # Same traffic (N datagrams from C sendmmsg at full speed): the share each receiver got. (Their
    # received/s come from different runs, whose sender rates differ a little.)
    same = mt_r["fraction"] / ref_r["fraction"] if ref_r["fraction"] else 0.0
    own_s, own = rx[("mcast_trio send_many", "mcast_trio receiver")]
    sus_ref, sus_mt = sustain["C recvmmsg reference"][0], sustain["mcast_trio receiver"][0]
    sendto_rate = senders["Python sendto loop"][0]["rate"]
    cpu_ratio = (ref_r["cpu"] / ref_r["received"]) / (mt_r["cpu"] / mt_r["received"]) if (
        mt_r["received"] and ref_r["received"] and mt_r["cpu"] > 0) else 0.0
    rows = [
        ("mcast_trio receiver gets >= 99% at its sender's top rate",
         f"{pct(own['fraction'])} at {own_s['rate']:,.0f}/s", own["fraction"] >= 0.99),
        ("receiver / reference: datagrams received, same full-speed traffic", f"{same:.2f}x", same >= 0.9),
        ("receiver / reference: sustainable rate (loss < 1%)", f"{sus_mt / sus_ref:.2f}x"
         + (" (ref sender-limited)" if sus_ref == c_best else ""), sus_mt >= 0.9 * sus_ref),
        ("receiver / reference: datagrams per CPU-second", f"{cpu_ratio:.2f}x", None),
        ("mcast_trio send_many / best C sendmmsg", f"{mt_send / c_best:.2f}x", mt_send >= 0.9 * c_best),
        ("mcast_trio send_many / best C sendmmsg: datagrams per CPU-second", f"{c_best_cpu / mt_send_cpu:.2f}x",
         None),
        ("Python sendto loop / best C sendmmsg", f"{sendto_rate / c_best:.2f}x", None),
        (f"memory flat over {args.soak:,} datagrams (< 5 MB after warm-up)", "see soak", flat),
    ]
    print("summary (targets: >= 99%, >= 0.9x, >= 0.9x, flat)")
    for label, value, ok in rows:
        print(f"  {label:<60}{value:>32}  {'' if ok is None else verdict(ok)}")
    foreign = bench.foreign
    print(f"other processes used {sum(foreign) / len(foreign):.2f} CPUs on average during the runs "
          f"(max {max(foreign):.2f}); figures from a busy machine are low and noisy: rerun on an idle one")
    return all(ok is not False for _label, _value, ok in rows)


def _loadavg() -> list[str]:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()
    except OSError:
        return ["?", "?", "?"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
