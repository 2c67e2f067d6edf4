"""The sans-I/O protocol core: framings (raw, native, MCL), fragment
reassembly, filters, per-sender loss tracking and the receive pipeline.

Nothing here opens a socket or waits: every object is fed bytes (or a filled
receive batch) and a time, and returns what to deliver, keeping its own
counters. The trio layer (``_receiver``, ``_sender``, ``_loop``) drives it.

``_framings`` is the table of framings (what each one is and carries);
``_message`` the :class:`~mcast_trio.Message` and the payload and topic
checks every framing shares; ``_raw``, ``_native`` and ``_mcl`` the three
framings; ``_reassembly`` the bounded reassembly of fragments; ``_filters``
the receive-side filters; ``_tracking`` the per-sender loss accounting.
"""
