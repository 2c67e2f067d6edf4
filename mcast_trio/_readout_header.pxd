# cython: language_level=3
"""The 19-byte header of a serialized AstroPix readout, for compiled code.

``fe dc ba``, u32 readout id, u64 timestamp, u32 data length, all
little-endian: the C twin of ``_format.parse_readout_header`` and
``_format.pack_readout_header``, inline and ``nogil``, cimported by
``_decode.pyx``, ``_io/_mmsg.pyx`` and ``_protocol/_kernels.pyx``. The
constants are those of ``_format`` (``HEADER``, ``HEADER_SIZE``,
``ReadoutError``); ``_decode._layout()`` reports them and ``_backend``
checks them at import.
"""

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

cdef enum:
    READOUT_HEADER_SIZE = 19
    READOUT_LENGTH_OFFSET = 15
    READOUT_MAGIC_0 = 0xFE
    READOUT_MAGIC_1 = 0xDC
    READOUT_MAGIC_2 = 0xBA
    # ReadoutError codes.
    READOUT_OK = 0
    READOUT_TOO_SHORT = 1
    READOUT_BAD_HEADER = 2
    READOUT_LENGTH_MISMATCH = 3


cdef inline uint32_t load_u32le(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0]) | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t load_u64le(const uint8_t* p) noexcept nogil:
    return (<uint64_t>load_u32le(p)) | ((<uint64_t>load_u32le(p + 4)) << 32)


cdef inline int parse_readout_header(const uint8_t* p, Py_ssize_t n, uint32_t* readout_id,
                                     uint64_t* timestamp) noexcept nogil:
    """The ReadoutError code of the ``n`` bytes at ``p`` as one serialized
    readout; when it is READOUT_OK, ``*readout_id`` and ``*timestamp`` are
    set (otherwise they are left alone). Reads no byte past ``p[n - 1]``."""
    if n < READOUT_HEADER_SIZE:
        return READOUT_TOO_SHORT
    if p[0] != READOUT_MAGIC_0 or p[1] != READOUT_MAGIC_1 or p[2] != READOUT_MAGIC_2:
        return READOUT_BAD_HEADER
    if <int64_t>load_u32le(p + READOUT_LENGTH_OFFSET) != <int64_t>n - READOUT_HEADER_SIZE:
        return READOUT_LENGTH_MISMATCH
    readout_id[0] = load_u32le(p + 3)
    timestamp[0] = load_u64le(p + 7)
    return READOUT_OK


cdef inline void write_readout_header(uint8_t* out, uint32_t readout_id, uint64_t timestamp,
                                      uint32_t data_length) noexcept nogil:
    """Write the READOUT_HEADER_SIZE header bytes to ``out``."""
    cdef int i
    out[0] = READOUT_MAGIC_0
    out[1] = READOUT_MAGIC_1
    out[2] = READOUT_MAGIC_2
    for i in range(4):
        out[3 + i] = <uint8_t>(readout_id >> (8 * i))
    for i in range(8):
        out[7 + i] = <uint8_t>(timestamp >> (8 * i))
    for i in range(4):
        out[READOUT_LENGTH_OFFSET + i] = <uint8_t>(data_length >> (8 * i))
