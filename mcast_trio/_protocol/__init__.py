"""The sans-I/O protocol core: framings (raw, native, MCL), fragment
reassembly, filters, per-sender loss tracking and the receive pipeline.

Nothing here opens a socket or waits: every object is fed bytes (or a filled
receive batch) and a time, and returns what to deliver, keeping its own
counters. The trio layer (``_receiver``, ``_sender``, ``_loop``) drives it.
"""
