"""The socket layer: interfaces, group resolution, multicast sockets and the
batched ``recvmmsg``/``sendmmsg`` syscalls, plus the network seam
(:mod:`._net`) through which senders and receivers get their endpoints.

Nothing here knows about framings, readouts or trio tasks beyond waiting for
a socket; the protocol core (:mod:`mcast_trio._protocol`) never imports it.
"""
