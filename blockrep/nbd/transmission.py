"""Framing of the transmission phase: NBD requests out of a socket, as a buffered protocol.

The one receive path for plain and TLS connections (asyncio's TLS transport fills
a BufferedProtocol's buffer too). Requests are parsed out of one staging buffer,
and large write payloads are received straight into their own buffer, so a 1 MiB
write is copied once (kernel or TLS layer to buffer) instead of three times
through a StreamReader.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..polling import kick as _kick
from . import proto as p

log = logging.getLogger("blockrep.nbd.server")

MAX_IN_FLIGHT = 64  # per client; more requests wait in the socket buffer

# Starts one request; False when the connection is to end (DISC). The third
# argument, when given, gives the payload's buffer back once the request is done.
# The request counts in flight before dispatch is called, so dispatch may answer it
# (``request_done``) before returning.
Dispatch = Callable[[p.Request, bytes | memoryview, Callable[[], None] | None], bool]


def feed_buffered(
    proto: asyncio.BufferedProtocol, data: bytes, stopped: Callable[[], bool]
) -> None:
    """Hand ``proto`` bytes that arrived before it took over its transport, through its
    own get_buffer/buffer_updated as the transport would, until ``stopped()``."""
    view = memoryview(data)
    while len(view) and not stopped():
        mv = memoryview(proto.get_buffer(len(view)))
        n = min(len(mv), len(view))
        mv[:n] = view[:n]
        proto.buffer_updated(n)
        view = view[n:]


class RequestReader(asyncio.BufferedProtocol):
    """Parses NBD requests for one connection and hands each to ``dispatch``.

    Flow control: with MAX_IN_FLIGHT requests running, reading pauses until one
    finishes (``request_done``). Write-side flow control and connection loss are
    passed on to the stream protocol the handshake used, which the StreamWriter
    the replies go through still relies on. A client that leaves the socket's write
    side paused (it does not read its replies) for ``send_timeout`` seconds is
    aborted: its queued replies are dropped and every request waiting to send one
    sees the connection lost.
    """

    STAGING = 256 << 10
    BIG = 64 << 10  # payloads larger than this get their own buffer

    def __init__(
        self,
        transport: asyncio.Transport,
        old: asyncio.BaseProtocol,
        dispatch: Dispatch,
        drain: Callable[[], Awaitable[None]],
        send_timeout: float = 0.0,
    ) -> None:
        self.transport = transport
        self.old = old
        self.dispatch = dispatch
        self.drain = drain
        self.send_timeout = send_timeout
        self.stall: asyncio.TimerHandle | None = None
        self.buf = bytearray(self.STAGING)
        self.start = 0
        self.end = 0
        self.big: bytearray | None = None
        self.big_got = 0
        self.big_req: p.Request | None = None
        self.pool: dict[int, list[bytearray]] = {}  # payload buffers by size, for reuse
        self.in_flight = 0
        self.paused = False
        self.done = False
        self.closed = asyncio.get_running_loop().create_future()
        # the handshake's replies may have filled the socket already
        if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
            self._arm_stall()

    def _finish(self) -> None:
        self.done = True
        self._disarm_stall()
        if not self.closed.done():
            self.closed.set_result(None)

    def feed(self, data: bytes) -> None:
        """Bytes received before this protocol took over the transport."""
        feed_buffered(self, data, lambda: self.done)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.big is not None:
            return memoryview(self.big)[self.big_got :]
        if self.end == len(self.buf):
            # compact: the unparsed tail moves to the front
            tail = self.end - self.start
            self.buf[:tail] = self.buf[self.start : self.end]
            self.start, self.end = 0, tail
        return memoryview(self.buf)[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.done:
            return
        _kick()  # bytes arrived: the loop polls a while before it sleeps (polling.py)
        if self.big is not None:
            self.big_got += nbytes
            if self.big_got == len(self.big):
                req, payload = self.big_req, self.big
                assert req is not None
                self.big, self.big_req = None, None
                view = memoryview(payload)

                def recycle(buf: bytearray = payload, view: memoryview = view) -> None:
                    try:
                        view.release()
                    except BufferError:
                        return  # still referenced somewhere: leave it to the GC
                    pool = self.pool.setdefault(len(buf), [])
                    if len(pool) < 4:
                        pool.append(buf)

                self._deliver(req, view, recycle)
            return
        self.end += nbytes
        self._parse()

    def _parse(self) -> None:
        hs = p.REQUEST.size
        while not self.done and self.big is None and self.end - self.start >= hs:
            try:
                req = p.parse_request(bytes(self.buf[self.start : self.start + hs]))
            except ValueError as e:
                log.debug("client dropped: %s", e)
                self._close()
                return
            payload = b""
            if req.type == p.CMD_WRITE:
                if req.length > p.MAX_BUFFER:
                    # the payload cannot be skipped safely: drop the connection
                    log.debug("client dropped: write of %d bytes", req.length)
                    self._close()
                    return
                have = self.end - self.start - hs
                if have >= req.length:
                    payload = bytes(self.buf[self.start + hs : self.start + hs + req.length])
                    self.start += hs + req.length
                elif req.length > self.BIG:
                    # a recycled buffer: fresh 1 MiB ones cost page faults and zeroing
                    free = self.pool.get(req.length)
                    big = free.pop() if free else bytearray(req.length)
                    big[:have] = self.buf[self.start + hs : self.end]
                    self.start = self.end = 0
                    self.big, self.big_got, self.big_req = big, have, req
                    return
                else:
                    if self.start:  # make room for the rest of this payload
                        tail = self.end - self.start
                        self.buf[:tail] = self.buf[self.start : self.end]
                        self.start, self.end = 0, tail
                    return
            else:
                self.start += hs
            self._deliver(req, payload)
        if self.start == self.end:
            self.start = self.end = 0

    def _deliver(
        self,
        req: p.Request,
        payload: bytes | memoryview,
        recycle: Callable[[], None] | None = None,
    ) -> None:
        # counted before dispatch: a request may be answered (request_done) inside it
        self.in_flight += 1
        if not self.dispatch(req, payload, recycle):
            # DISC: finish what is in flight, then close
            self.in_flight -= 1
            self.done = True
            asyncio.ensure_future(self._disconnect())
            return
        if self.in_flight >= MAX_IN_FLIGHT and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def request_done(self) -> None:
        self.in_flight -= 1
        if self.paused and self.in_flight < MAX_IN_FLIGHT // 2:
            self.paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    async def _disconnect(self) -> None:
        await self.drain()
        self._finish()

    def _close(self) -> None:
        self.done = True
        self.transport.close()
        self._finish()

    def eof_received(self) -> bool:
        self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.old.connection_lost(exc)
        self._finish()

    def pause_writing(self) -> None:
        self.old.pause_writing()
        self._arm_stall()

    def resume_writing(self) -> None:
        self._disarm_stall()
        self.old.resume_writing()

    def _arm_stall(self) -> None:
        if self.send_timeout > 0 and self.stall is None:
            loop = asyncio.get_running_loop()
            self.stall = loop.call_later(self.send_timeout, self._stalled)

    def _disarm_stall(self) -> None:
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None

    def _stalled(self) -> None:
        self.stall = None
        log.debug("client dropped: replies not read for %s s", self.send_timeout)
        self.done = True
        self.transport.abort()  # queued replies are discarded; connection_lost follows
