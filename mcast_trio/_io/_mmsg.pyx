# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Batched UDP receive and send with ``recvmmsg(2)`` / ``sendmmsg(2)``.

One syscall moves many datagrams; the GIL is released around it. Both calls
are non-blocking (``MSG_DONTWAIT``): "nothing to read" / "socket buffer full"
is reported as a count of 0, never as an exception, so the caller (a trio
task) can ``await trio.lowlevel.wait_readable(sock)`` / ``wait_writable``.

On platforms without these syscalls (everything but Linux) the module still
builds; :data:`HAVE_MMSG` is then ``False`` and :mod:`mcast_trio._io._batchio`
uses its pure-Python loop instead.

This module is private: use :mod:`mcast_trio._io._batchio`.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, int64_t, uint64_t
from libc.errno cimport EINTR
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.mem cimport PyMem_Calloc, PyMem_Free

from mcast_trio._readout_header cimport READOUT_HEADER_SIZE, write_readout_header

import os as _os

cdef extern from *:
    """
    #include <errno.h>
    #include <string.h>
    #include <stdlib.h>
    #include <stdint.h>

    #define MT_CTRL_SPACE 64          /* per-datagram control buffer, bytes */
    #define MT_MAX_VLEN 1024          /* UIO_MAXIOV: the kernel's cap on vlen */
    #define MT_MAX_DATAGRAM 65535

    #if defined(__linux__) && !defined(MT_FORCE_NO_MMSG)
    #include <sys/types.h>
    #include <sys/socket.h>
    #include <netinet/in.h>
    #define MT_HAVE_MMSG 1
    #ifndef SO_RXQ_OVFL
    #define SO_RXQ_OVFL 40
    #endif

    typedef struct {
        unsigned int capacity;
        size_t slot;
        struct mmsghdr *msgs;
        struct iovec *iov;
        struct sockaddr_storage *names;
        unsigned char *ctrl;
    } mt_rx;

    static int mt_rx_init(mt_rx *rx, unsigned char *buf, size_t slot,
                          unsigned int capacity)
    {
        unsigned int i;
        memset(rx, 0, sizeof(*rx));
        rx->msgs = (struct mmsghdr *)calloc(capacity, sizeof(struct mmsghdr));
        rx->iov = (struct iovec *)calloc(capacity, sizeof(struct iovec));
        rx->names = (struct sockaddr_storage *)calloc(capacity, sizeof(struct sockaddr_storage));
        rx->ctrl = (unsigned char *)calloc(capacity, MT_CTRL_SPACE);
        if (!rx->msgs || !rx->iov || !rx->names || !rx->ctrl) {
            free(rx->msgs); free(rx->iov); free(rx->names); free(rx->ctrl);
            memset(rx, 0, sizeof(*rx));
            return -ENOMEM;
        }
        rx->capacity = capacity;
        rx->slot = slot;
        for (i = 0; i < capacity; i++) {
            rx->iov[i].iov_base = buf + (size_t)i * slot;
            rx->iov[i].iov_len = slot;
            rx->msgs[i].msg_hdr.msg_iov = &rx->iov[i];
            rx->msgs[i].msg_hdr.msg_iovlen = 1;
            rx->msgs[i].msg_hdr.msg_name = &rx->names[i];
            rx->msgs[i].msg_hdr.msg_control = rx->ctrl + (size_t)i * MT_CTRL_SPACE;
        }
        return 0;
    }

    static void mt_rx_free(mt_rx *rx)
    {
        free(rx->msgs); free(rx->iov); free(rx->names); free(rx->ctrl);
        memset(rx, 0, sizeof(*rx));
    }

    /* Receive up to rx->capacity datagrams without blocking.
       Returns the count (0 when nothing is queued) or -errno. */
    static int mt_rx_recv(mt_rx *rx, int fd, int64_t *lengths, uint8_t *trunc,
                          uint8_t *fam, uint8_t *addr, uint16_t *ports,
                          uint32_t *scopes, int64_t *drops)
    {
        unsigned int i;
        int n;
        for (i = 0; i < rx->capacity; i++) {
            struct msghdr *h = &rx->msgs[i].msg_hdr;
            h->msg_namelen = sizeof(struct sockaddr_storage);
            h->msg_controllen = MT_CTRL_SPACE;
            h->msg_flags = 0;
            rx->msgs[i].msg_len = 0;
        }
        do {
            n = recvmmsg(fd, rx->msgs, rx->capacity, MSG_DONTWAIT, NULL);
        } while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return -errno;
        }
        for (i = 0; i < (unsigned int)n; i++) {
            struct msghdr *h = &rx->msgs[i].msg_hdr;
            struct cmsghdr *c;
            const struct sockaddr *sa = (const struct sockaddr *)&rx->names[i];
            size_t got = rx->msgs[i].msg_len;
            lengths[i] = (int64_t)(got > rx->slot ? rx->slot : got);
            trunc[i] = (h->msg_flags & MSG_TRUNC) ? 1 : 0;
            memset(addr + (size_t)i * 16, 0, 16);
            ports[i] = 0;
            scopes[i] = 0;
            fam[i] = 0;
            if (h->msg_namelen >= sizeof(struct sockaddr_in) && sa->sa_family == AF_INET) {
                const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
                fam[i] = 4;
                memcpy(addr + (size_t)i * 16, &s4->sin_addr, 4);
                ports[i] = ntohs(s4->sin_port);
            } else if (h->msg_namelen >= sizeof(struct sockaddr_in6) && sa->sa_family == AF_INET6) {
                const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
                fam[i] = 6;
                memcpy(addr + (size_t)i * 16, &s6->sin6_addr, 16);
                ports[i] = ntohs(s6->sin6_port);
                scopes[i] = s6->sin6_scope_id;
            }
            if (h->msg_controllen > 0) {
                for (c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c)) {
                    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_RXQ_OVFL
                            && c->cmsg_len >= CMSG_LEN(sizeof(uint32_t))) {
                        uint32_t v;
                        memcpy(&v, CMSG_DATA(c), sizeof(v));
                        *drops = (int64_t)v;
                    }
                }
            }
        }
        return n;
    }

    /* Send n datagrams (ptrs[i], lens[i]) in chunks of MT_MAX_VLEN, one
       sendmmsg per chunk, without blocking. Returns the number sent; stops
       early at EAGAIN or at an error after some were sent (the error recurs
       on the next call). Returns -errno when the very first one fails. */
    static long mt_send(int fd, void **ptrs, const size_t *lens, size_t n,
                        const void *name, size_t namelen)
    {
        size_t sent = 0, chunk_max = n < MT_MAX_VLEN ? n : MT_MAX_VLEN, i;
        struct mmsghdr *msgs;
        struct iovec *iov;
        if (n == 0) return 0;
        msgs = (struct mmsghdr *)calloc(chunk_max, sizeof(struct mmsghdr));
        iov = (struct iovec *)calloc(chunk_max, sizeof(struct iovec));
        if (!msgs || !iov) { free(msgs); free(iov); return -ENOMEM; }
        while (sent < n) {
            size_t chunk = n - sent < chunk_max ? n - sent : chunk_max;
            int r;
            for (i = 0; i < chunk; i++) {
                iov[i].iov_base = ptrs[sent + i];
                iov[i].iov_len = lens[sent + i];
                memset(&msgs[i], 0, sizeof(msgs[i]));
                msgs[i].msg_hdr.msg_iov = &iov[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
                msgs[i].msg_hdr.msg_name = (void *)name;
                msgs[i].msg_hdr.msg_namelen = (socklen_t)namelen;
            }
            do {
                r = sendmmsg(fd, msgs, (unsigned int)chunk, MSG_DONTWAIT);
            } while (r < 0 && errno == EINTR);
            if (r < 0) {
                int e = errno;
                if (e == EAGAIN || e == EWOULDBLOCK || sent > 0) break;
                free(msgs); free(iov);
                return -e;
            }
            sent += (size_t)r;
            if ((size_t)r < chunk) break;
        }
        free(msgs); free(iov);
        return (long)sent;
    }

    /* One datagram of two parts, sent on a connected socket with sendmsg
       and two iovecs: a header (a serialized readout's, built by the caller)
       and the data where it lies, no copy. Blocks as the socket does
       (flags 0). Returns bytes sent or -errno. */
    static long mt_send_readout(int fd, const uint8_t *header, size_t header_len,
                                const uint8_t *data, size_t len)
    {
        struct iovec iov[2];
        struct msghdr msg;
        ssize_t r;
        iov[0].iov_base = (void *)header; iov[0].iov_len = header_len;
        iov[1].iov_base = (void *)data; iov[1].iov_len = len;
        memset(&msg, 0, sizeof(msg));
        msg.msg_iov = iov;
        msg.msg_iovlen = len ? 2 : 1;
        r = sendmsg(fd, &msg, 0);
        return r < 0 ? -(long)errno : (long)r;
    }
    #else  /* no recvmmsg/sendmmsg: stubs, so that the module still builds */
    #define MT_HAVE_MMSG 0
    typedef struct { unsigned int capacity; size_t slot; } mt_rx;
    static int mt_rx_init(mt_rx *rx, unsigned char *buf, size_t slot,
                          unsigned int capacity)
    { (void)buf; rx->capacity = capacity; rx->slot = slot; return -ENOSYS; }
    static void mt_rx_free(mt_rx *rx) { (void)rx; }
    static int mt_rx_recv(mt_rx *rx, int fd, int64_t *lengths, uint8_t *trunc,
                          uint8_t *fam, uint8_t *addr, uint16_t *ports,
                          uint32_t *scopes, int64_t *drops)
    { return -ENOSYS; }
    static long mt_send(int fd, void **ptrs, const size_t *lens, size_t n,
                        const void *name, size_t namelen)
    { return -ENOSYS; }
    static long mt_send_readout(int fd, const uint8_t *header, size_t header_len,
                                const uint8_t *data, size_t len)
    { return -ENOSYS; }
    #endif
    """
    int MT_HAVE_MMSG
    int MT_MAX_VLEN
    int MT_MAX_DATAGRAM
    ctypedef struct mt_rx:
        unsigned int capacity
        size_t slot
    int mt_rx_init(mt_rx *rx, unsigned char *buf, size_t slot, unsigned int capacity) nogil
    void mt_rx_free(mt_rx *rx) nogil
    int mt_rx_recv(mt_rx *rx, int fd, int64_t *lengths, uint8_t *trunc, uint8_t *fam,
                   uint8_t *addr, uint16_t *ports, uint32_t *scopes, int64_t *drops) nogil
    long mt_send(int fd, void **ptrs, const size_t *lens, size_t n,
                 const void *name, size_t namelen) nogil
    long mt_send_readout(int fd, const uint8_t *header, size_t header_len,
                         const uint8_t *data, size_t len) nogil

#: Whether this build has recvmmsg/sendmmsg (Linux).
HAVE_MMSG = bool(MT_HAVE_MMSG)
#: Most datagrams one recvmmsg/sendmmsg call moves (the kernel's UIO_MAXIOV).
MAX_VLEN = MT_MAX_VLEN


cdef inline object _oserror(long neg_errno):
    cdef int e = <int>(-neg_errno)
    return OSError(e, _os.strerror(e))


cdef class RecvMmsg:
    """recvmmsg state bound, once, to preallocated output arrays.

    The arrays belong to a :class:`mcast_trio._io._batchio.ReceiveBatch`; this
    object holds buffer references to them (so they cannot be resized) and
    the C ``mmsghdr``/``iovec``/address/control arrays pointing into them.

    Args:
        buffer: ``uint8[capacity * slot_size]``, C-contiguous: slot ``i``
            starts at ``i * slot_size``.
        slot_size: bytes per slot (1..65535 is useful; any positive size is
            accepted).
        lengths: ``int64[capacity]``: bytes stored in each slot.
        truncated: ``uint8[capacity]``: 1 when the datagram was longer than
            the slot (``MSG_TRUNC``).
        families: ``uint8[capacity]``: 4 or 6 (0 if the kernel gave none).
        addresses: ``uint8[capacity, 16]``: source address (IPv4 in the
            first 4 bytes).
        ports: ``uint16[capacity]``: source port, host byte order.
        scope_ids: ``uint32[capacity]``: IPv6 source scope id.
    """

    cdef mt_rx _rx
    cdef bint _ready
    cdef uint8_t[::1] _buf
    cdef int64_t[::1] _lengths
    cdef uint8_t[::1] _truncated
    cdef uint8_t[::1] _families
    cdef uint8_t[:, ::1] _addresses
    cdef uint16_t[::1] _ports
    cdef uint32_t[::1] _scope_ids
    cdef int64_t _drops
    cdef readonly Py_ssize_t capacity
    cdef readonly Py_ssize_t slot_size

    def __cinit__(self, uint8_t[::1] buffer not None, Py_ssize_t slot_size,
                  int64_t[::1] lengths not None, uint8_t[::1] truncated not None,
                  uint8_t[::1] families not None, uint8_t[:, ::1] addresses not None,
                  uint16_t[::1] ports not None, uint32_t[::1] scope_ids not None):
        cdef Py_ssize_t capacity = lengths.shape[0]
        cdef int rc
        self._ready = False
        self._drops = -1
        if not MT_HAVE_MMSG:
            raise NotImplementedError("recvmmsg is not available on this platform")
        if capacity < 1 or capacity > MT_MAX_VLEN:
            raise ValueError(f"capacity={capacity} is out of range; allowed: 1..{MT_MAX_VLEN}")
        if slot_size < 1:
            raise ValueError(f"slot_size={slot_size} is out of range; allowed: >= 1")
        if buffer.shape[0] < capacity * slot_size:
            raise ValueError(f"buffer has {buffer.shape[0]} bytes; need capacity * slot_size"
                             f" = {capacity * slot_size}")
        if (truncated.shape[0] != capacity or families.shape[0] != capacity
                or addresses.shape[0] != capacity or addresses.shape[1] != 16
                or ports.shape[0] != capacity or scope_ids.shape[0] != capacity):
            raise ValueError(f"output arrays must all have {capacity} rows"
                             " (addresses: shape (capacity, 16))")
        self._buf = buffer
        self._lengths = lengths
        self._truncated = truncated
        self._families = families
        self._addresses = addresses
        self._ports = ports
        self._scope_ids = scope_ids
        self.capacity = capacity
        self.slot_size = slot_size
        rc = mt_rx_init(&self._rx, &self._buf[0], <size_t>slot_size, <unsigned int>capacity)
        if rc < 0:
            raise _oserror(rc)
        self._ready = True

    def __dealloc__(self):
        if self._ready:
            mt_rx_free(&self._rx)
            self._ready = False

    @property
    def drops(self):
        """The latest SO_RXQ_OVFL drop counter seen (cumulative, uint32), or
        -1 if no datagram has carried one yet."""
        return self._drops

    def recv(self, int fd):
        """Receive up to ``capacity`` datagrams from ``fd`` without blocking.

        Returns:
            int: the number of datagrams stored (0 if none was queued).

        Raises:
            OSError: the syscall failed with anything but EAGAIN/EINTR.
        """
        cdef int n
        if fd < 0:
            raise ValueError(f"fd={fd} is not an open file descriptor")
        with nogil:
            n = mt_rx_recv(&self._rx, fd, &self._lengths[0], &self._truncated[0],
                           &self._families[0], &self._addresses[0, 0], &self._ports[0],
                           &self._scope_ids[0], &self._drops)
        if n < 0:
            raise _oserror(n)
        return n


def sendmmsg(int fd, datagrams, const uint8_t[::1] name=None):
    """Send datagrams without blocking, ``MAX_VLEN`` per syscall.

    Args:
        fd: the socket's file descriptor.
        datagrams: a sequence (or iterable) of C-contiguous bytes-like
            objects, each one datagram of at most 65535 bytes.
        name: a packed ``struct sockaddr`` for the destination, or ``None``
            for a connected socket.

    Returns:
        int: how many datagrams (from the start of ``datagrams``) were
        handed to the kernel; fewer than ``len(datagrams)`` when the socket
        buffer filled (EAGAIN) or an error hit a later datagram (that error
        is raised by the next call, which starts with that datagram).

    Raises:
        OSError: the first datagram could not be sent (not EAGAIN).
        ValueError: a datagram is longer than 65535 bytes (nothing is sent).
        TypeError/BufferError: an item is not a contiguous bytes-like object.
    """
    cdef list items = datagrams if type(datagrams) is list else list(datagrams)
    cdef Py_ssize_t n = len(items)
    cdef Py_ssize_t i, acquired = 0
    cdef Py_buffer *views = NULL
    cdef void **ptrs = NULL
    cdef size_t *lens = NULL
    cdef const void *name_ptr = NULL
    cdef size_t name_len = 0
    cdef long r
    if not MT_HAVE_MMSG:
        raise NotImplementedError("sendmmsg is not available on this platform")
    if fd < 0:
        raise ValueError(f"fd={fd} is not an open file descriptor")
    if n == 0:
        return 0
    if name is not None:
        if name.shape[0] < 2:
            raise ValueError(f"name has {name.shape[0]} bytes; expected a packed sockaddr")
        name_ptr = &name[0]
        name_len = <size_t>name.shape[0]
    views = <Py_buffer *>PyMem_Calloc(<size_t>n, sizeof(Py_buffer))
    ptrs = <void **>PyMem_Calloc(<size_t>n, sizeof(void *))
    lens = <size_t *>PyMem_Calloc(<size_t>n, sizeof(size_t))
    try:
        if views == NULL or ptrs == NULL or lens == NULL:
            raise MemoryError()
        for i in range(n):
            PyObject_GetBuffer(items[i], &views[i], PyBUF_SIMPLE)
            acquired += 1
            if views[i].len > MT_MAX_DATAGRAM:
                raise ValueError(f"datagrams[{i}] has {views[i].len} bytes; a UDP datagram"
                                 " carries at most 65507 (IPv4) or 65527 (IPv6) bytes")
            ptrs[i] = views[i].buf
            lens[i] = <size_t>views[i].len
        with nogil:
            r = mt_send(fd, ptrs, lens, <size_t>n, name_ptr, name_len)
        if r < 0:
            raise _oserror(r)
        return r
    finally:
        for i in range(acquired):
            PyBuffer_Release(&views[i])
        PyMem_Free(views)
        PyMem_Free(ptrs)
        PyMem_Free(lens)


from cpython.bytes cimport PyBytes_GET_SIZE, PyBytes_AS_STRING
from cpython.exc cimport PyErr_CheckSignals


def send_readout(int fd, bytes data, uint32_t readout_id, uint64_t timestamp):
    """Send one serialized AstroPix readout (header built here, ``data``
    sent where it lies: ``sendmsg`` with two iovecs) on a connected socket,
    blocking as the socket does, the GIL released around the syscall.

    The same bytes as ``AstroPix4Readout(data, readout_id, timestamp).to_bytes()``
    without building them: the hot path of :mod:`mcast_trio.astropix`'s
    sender. A signal interrupting the call runs its Python handler (which
    may raise) and the call is retried, as :mod:`socket` does.

    Returns:
        int: the number of bytes sent (19 + ``len(data)``).

    Raises:
        OSError: as ``socket.send`` (``BlockingIOError`` on a non-blocking
            socket with a full buffer); NotImplementedError off Linux.
        ValueError: the datagram would exceed 65507 bytes.
    """
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(data)
    cdef uint8_t header[READOUT_HEADER_SIZE]
    cdef long r
    if not MT_HAVE_MMSG:
        raise NotImplementedError("send_readout is not available on this platform")
    if n > 65507 - READOUT_HEADER_SIZE:
        raise ValueError(f"data has {n} bytes; a readout datagram carries at most"
                         f" {65507 - READOUT_HEADER_SIZE}")
    write_readout_header(header, readout_id, timestamp, <uint32_t>n)
    while True:
        with nogil:
            r = mt_send_readout(fd, header, READOUT_HEADER_SIZE, p, <size_t>n)
        if r != -EINTR:
            break
        PyErr_CheckSignals()
    if r < 0:
        raise _oserror(r)
    return r
