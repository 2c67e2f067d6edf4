"""mcast_trio: multicast DAQ readouts to passive monitors, under trio.

A DAQ multicasts its binary readouts over UDP; any number of monitors receive,
decode, record, relay and display them. The hot path (readout parsing and hit
decoding) is compiled with Cython; :func:`decoder_backend` says which decoder
is active.
"""

from ._version import __version__
from ._metadata import fixup_module_metadata
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
from ._apx import (
    ApxReader,
    ApxStatistics,
    ApxWriter,
    DamagedRegion,
    TruncatedRecord,
    TruncatedRecordWarning,
    open_apx,
)
from ._protocol._filters import make_filter
from ._protocol._mcl import MclDecoder, MclEncoder
from ._protocol._message import Message
from ._protocol._native import NativeDecoder, NativeEncoder
from ._protocol._reassembly import Reassembler, ReassemblyStats
from ._protocol._tracking import SenderStats, SenderTable, SequenceTracker
from ._io._groups import GroupSpec, resolve_group
from ._io._sockets import BufferSizeWarning
from ._sender import MulticastSender, SenderStatistics, open_sender, serve_sender
from ._receiver import (
    MulticastReceiver,
    ReadoutChunk,
    ReceiverService,
    ReceiverStatistics,
    open_receiver,
    serve_receiver,
)
from ._sinks import Sink, SinkStatistics, open_sink
from . import sim

__all__ = [
    "__version__",
    "ApxReader",
    "ApxStatistics",
    "ApxWriter",
    "AstroPix4Readout",
    "BufferSizeWarning",
    "DamagedRegion",
    "GroupSpec",
    "Message",
    "MclDecoder",
    "MclEncoder",
    "MulticastReceiver",
    "MulticastSender",
    "NativeDecoder",
    "NativeEncoder",
    "Reassembler",
    "ReassemblyStats",
    "ReadoutChunk",
    "ReceiverService",
    "ReceiverStatistics",
    "SenderStatistics",
    "SenderStats",
    "SenderTable",
    "SequenceTracker",
    "Sink",
    "SinkStatistics",
    "TruncatedRecord",
    "TruncatedRecordWarning",
    "make_filter",
    "open_apx",
    "open_receiver",
    "open_sender",
    "open_sink",
    "resolve_group",
    "serve_receiver",
    "serve_sender",
    "sim",
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


fixup_module_metadata(globals(), __all__, "mcast_trio")

