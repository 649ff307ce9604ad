"""Writing to a transport now rather than on the reactor's next turn."""


def send_now(transport):
    """Hand what C{transport} holds to the kernel now.

    A TCP transport buffers every write until the reactor next finds its
    socket writable: one more reactor turn (a poll, its dispatch) between a
    finished answer and the network. This does that write at once, exactly as
    the reactor would (C{doWrite}); what the socket does not take stays
    buffered for the reactor. Transports without C{doWrite} (TLS), closing
    ones and ones whose producer is paused (a full buffer) keep their own pace.
    """
    do_write = getattr(transport, "doWrite", None)
    if (do_write is not None and transport.connected and not transport.disconnecting
            and not transport.producerPaused):
        # A failed write leaves the transport registered for writing: the
        # reactor meets the error on its next turn and closes it as usual.
        do_write()
