# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled kernels of the sans-I/O core: no syscalls, no sockets.

* :func:`batch_summary`: the per-batch bookkeeping of the receive loop;
* :func:`gather`: the kept datagrams of a receive batch as one ``bytes``;
* :func:`unit_run`: whether a run of 32-bit sequence ids steps by exactly 1;
* :func:`raw_datagrams`: whether a list of ``bytes`` can be sent as it is
  in raw (and auto) framing.

Every function checks the lengths of its arguments before it reads them and
loops over plain arrays without the GIL. This module is private: the
receiver, the sender and :mod:`mcast_trio._protocol._tracking` call it.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcmp, memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

from mcast_trio._readout_header cimport READOUT_OK, parse_readout_header

cdef enum:
    _MAX_UDP_PAYLOAD = 65507  # IPv4: 65535 - 20 (IP header) - 8 (UDP header)


def batch_summary(const int64_t[::1] lengths not None, const uint8_t[::1] truncated not None,
                  const uint8_t[::1] families not None, const uint8_t[:, ::1] addresses not None,
                  const uint16_t[::1] ports not None, Py_ssize_t n):
    """``(total_bytes, truncated_count, single_source)`` of the first ``n``
    datagrams of a receive batch: the per-batch bookkeeping of the receive
    loop in one pass instead of several numpy calls."""
    cdef Py_ssize_t i
    cdef int64_t total = 0
    cdef Py_ssize_t cut = 0
    cdef bint same = True
    if n < 0 or n > lengths.shape[0] or n > truncated.shape[0] or n > families.shape[0] \
            or n > addresses.shape[0] or n > ports.shape[0] or addresses.shape[1] != 16:
        raise ValueError(f"n={n} does not fit the batch arrays")
    with nogil:
        for i in range(n):
            total += lengths[i]
            cut += truncated[i] != 0
        for i in range(1, n):
            if (families[i] != families[0] or ports[i] != ports[0]
                    or memcmp(&addresses[i, 0], &addresses[0, 0], 16) != 0):
                same = False
                break
    return total, cut, same


def gather(const uint8_t[::1] buf not None, const int64_t[::1] offsets not None,
           const int64_t[::1] lengths not None):
    """The datagrams ``buf[offsets[k]:offsets[k] + lengths[k]]``, back to back,
    as one ``bytes`` object (one allocation, one copy each)."""
    cdef Py_ssize_t k, count = lengths.shape[0]
    cdef Py_ssize_t bad = -1
    cdef int64_t total = 0
    cdef Py_ssize_t size = buf.shape[0]
    cdef char *dst
    cdef const uint8_t *src = &buf[0] if size > 0 else NULL
    if offsets.shape[0] != count:
        raise ValueError("offsets and lengths differ in length")
    with nogil:
        for k in range(count):
            if offsets[k] < 0 or lengths[k] < 0 or offsets[k] > size - lengths[k]:
                bad = k
                break
            total += lengths[k]
    if bad >= 0:
        raise ValueError(f"datagram {bad} does not fit in the {size}-byte buffer")
    out = PyBytes_FromStringAndSize(NULL, total)
    dst = PyBytes_AS_STRING(out)
    with nogil:
        for k in range(count):
            if lengths[k]:
                memcpy(dst, src + offsets[k], <size_t>lengths[k])
                dst += lengths[k]
    return out


def unit_run(const uint32_t[:] ids not None):
    """True if every id follows the previous one by exactly 1 (mod 2**32)."""
    cdef Py_ssize_t i
    cdef bint ok = True
    with nogil:
        for i in range(1, ids.shape[0]):
            if <uint32_t>(ids[i] - ids[i - 1]) != 1:
                ok = False
                break
    return ok


def raw_datagrams(list items not None, bint readouts):
    """True if every item of ``items`` is a ``bytes`` object of at most 65507
    bytes and, with ``readouts``, a well-formed serialized AstroPix readout
    (header ``fe dc ba``, length field = size - 19): such a list can be sent
    as it is, one datagram per item, in raw (and auto) framing."""
    cdef Py_ssize_t n
    cdef object obj
    cdef uint32_t readout_id
    cdef uint64_t timestamp
    for obj in items:
        if type(obj) is not bytes:
            return False
        n = PyBytes_GET_SIZE(obj)
        if n > _MAX_UDP_PAYLOAD:
            return False
        if readouts and parse_readout_header(<const uint8_t *>PyBytes_AS_STRING(obj), n,
                                             &readout_id, &timestamp) != READOUT_OK:
            return False
    return True
