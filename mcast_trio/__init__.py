"""mcast_trio: multicast DAQ readouts to passive monitors, under trio.

A DAQ multicasts its binary readouts over UDP; any number of monitors receive,
decode, record, relay and display them. The hot path (readout parsing and hit
decoding) is compiled with Cython; :func:`decoder_backend` says which decoder
is active.
"""

from ._version import __version__
from ._errors import MalformedDatagram, MalformedFrame, MalformedReadout
from ._format import (
    HIT_DTYPE,
    READOUT_DTYPE,
    DecodingStatus,
    ReadoutError,
)
from ._backend import decoder_backend
from ._batch import DecodedBatch, decode_readouts
from ._readout import AstroPix4Readout

__all__ = [
    "__version__",
    "AstroPix4Readout",
    "DecodedBatch",
    "DecodingStatus",
    "HIT_DTYPE",
    "MalformedDatagram",
    "MalformedFrame",
    "MalformedReadout",
    "READOUT_DTYPE",
    "ReadoutError",
    "decode_readouts",
    "decoder_backend",
]
