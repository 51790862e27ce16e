"""The reply side of an NBD client connection: ``ReplyReader`` parses replies out of
the socket (plain or TLS) and completes the pending requests they name.

A buffered protocol: headers and small chunks come out of one staging buffer, and a
read's data is received straight into the request's own buffer, in order. What a
reply completes is the connection's business (``Requests``: client.NBDConnection).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..polling import kick as _kick
from . import proto as p
from .transmission import feed_buffered

log = logging.getLogger("blockrep.nbd.client")

# what try_request() completes: a request's outcome, None on success
Done = Callable[[BaseException | None], None]

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class ConnectionLost(Exception):
    """The connection to the server broke while a request was pending."""


@dataclass(slots=True)
class Pending:
    type: int
    offset: int
    length: int
    future: asyncio.Future | None  # request() waits on it ...
    done: Done | None = None  # ... try_request() is called back instead
    data: bytearray | None = None
    extents: list[tuple[int, int]] = field(default_factory=list)
    error: int = 0
    message: str = ""


class Requests(Protocol):
    """What the reply reader needs of its connection."""

    pending: dict[int, Pending]

    def complete(self, handle: int, pend: Pending) -> None: ...

    def chunk(self, pend: Pending, typ: int, data: bytes) -> None: ...

    def lost(self, exc: BaseException) -> None: ...


def call_back(done: Done, result: BaseException | None) -> None:
    """Call a try_request() callback; its exception must not break the connection."""
    try:
        done(result)
    except Exception as e:  # a bug in the caller: report it as asyncio reports callbacks'
        asyncio.get_running_loop().call_exception_handler(
            {"message": "NBD request callback failed", "exception": e}
        )


class ReplyReader(asyncio.BufferedProtocol):
    """Parses replies for one connection and completes the requests they name.

    Headers and small chunks are parsed out of one staging buffer; a read's data
    (a simple reply's payload or an OFFSET_DATA chunk's) is received straight into
    the request's own buffer: whatever of it the staging buffer holds is copied
    there, and ``get_buffer`` then hands out the rest of the request's buffer until
    it is full, so a large read is copied once, in order. Write-side flow control
    and connection loss are passed on to the stream protocol the handshake used,
    which the StreamWriter requests go through still relies on.
    """

    STAGING = 256 << 10
    MIN_FREE = 64 << 10  # compact the staging buffer when less than this is free

    def __init__(
        self, conn: Requests, transport: asyncio.Transport, old: asyncio.BaseProtocol
    ) -> None:
        self.conn = conn
        self.transport = transport
        self.old = old
        self.high_water = transport.get_write_buffer_limits()[1]
        self.writing_paused = transport.get_write_buffer_size() > self.high_water
        self.buf = bytearray(self.STAGING)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        # the buffer being filled in place, and what to do once it is full
        self.sink: memoryview | None = None
        self.sink_got = 0
        self.sink_full: Callable[[], None] | None = None
        self.done = False
        self.ended = asyncio.get_running_loop().create_future()

    def feed(self, data: bytes) -> None:
        """Bytes received before this protocol took over the transport."""
        feed_buffered(self, data, lambda: self.done)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.sink is not None:
            return self.sink[self.sink_got :]
        if self.start and len(self.buf) - self.end < self.MIN_FREE:
            # compact: the unparsed tail (at most a partial header or chunk) moves to the front
            tail = self.end - self.start
            self.buf[:tail] = self.buf[self.start : self.end]
            self.start, self.end = 0, tail
        return self.view[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.done:
            return
        _kick()  # bytes arrived: the loop polls a while before it sleeps (polling.py)
        try:
            if self.sink is not None:
                self.sink_got += nbytes
                if self.sink_got < len(self.sink):
                    return
                full = self.sink_full
                assert full is not None
                self.sink, self.sink_full = None, None
                full()
                return
            self.end += nbytes
            self._parse()
        except (ConnectionLost, struct.error) as e:
            self._fail(e)

    def _fail(self, exc: BaseException) -> None:
        log.debug("NBD connection dropped: %s", exc)
        self.done = True
        self.sink, self.sink_full = None, None
        self.conn.lost(exc)

    def _into(self, pend: Pending, rel: int, n: int, header: int) -> bool:
        """Move ``n`` bytes after ``header`` bytes of the staging buffer to ``pend.data[rel:]``.

        True when they were all there; False when the rest is to be received in place
        (the caller then sets ``sink_full``).
        """
        assert pend.data is not None
        at = self.start + header
        have = self.end - at
        if have >= n:
            pend.data[rel : rel + n] = self.view[at : at + n]
            self.start = at + n
            return True
        pend.data[rel : rel + have] = self.view[at : self.end]
        self.start = self.end = 0
        self.sink = memoryview(pend.data)[rel + have : rel + n]
        self.sink_got = 0
        return False

    def _parse(self) -> None:
        conn = self.conn
        buf = self.buf
        while not self.done and self.sink is None:
            avail = self.end - self.start
            if avail < 4:
                break
            (magic,) = _U32.unpack_from(buf, self.start)
            if magic == p.SIMPLE_REPLY_MAGIC:
                if avail < p.SIMPLE_REPLY.size:
                    break
                _, err, handle = p.SIMPLE_REPLY.unpack_from(buf, self.start)
                pend = conn.pending.get(handle)
                if pend is None:
                    raise ConnectionLost(f"reply for unknown handle {handle}")
                if err:
                    pend.error = err
                elif pend.type == p.CMD_READ and pend.length:
                    if not self._into(pend, 0, pend.length, p.SIMPLE_REPLY.size):
                        self.sink_full = lambda h=handle, q=pend: conn.complete(h, q)
                        return
                    conn.complete(handle, pend)
                    continue
                self.start += p.SIMPLE_REPLY.size
                conn.complete(handle, pend)
            elif magic == p.STRUCTURED_REPLY_MAGIC:
                if avail < p.CHUNK.size:
                    break
                _, flags, typ, handle, length = p.CHUNK.unpack_from(buf, self.start)
                if length > p.MAX_BUFFER + 64:
                    raise ConnectionLost("structured chunk too large")
                pend = conn.pending.get(handle)
                if pend is None:
                    raise ConnectionLost(f"chunk for unknown handle {handle}")
                last = bool(flags & p.REPLY_FLAG_DONE)
                if typ == p.REPLY_TYPE_OFFSET_DATA:
                    if length < 8:
                        raise ConnectionLost("data chunk too short")
                    if avail < p.CHUNK.size + 8:
                        break
                    (off,) = _U64.unpack_from(buf, self.start + p.CHUNK.size)
                    rel, n = off - pend.offset, length - 8
                    if pend.data is None or rel < 0 or rel + n > pend.length:
                        raise ConnectionLost("data chunk outside the request")
                    if not self._into(pend, rel, n, p.CHUNK.size + 8):
                        self.sink_full = lambda h=handle, q=pend, d=last: self._chunk_done(h, q, d)
                        return
                    self._chunk_done(handle, pend, last)
                    continue
                if avail - p.CHUNK.size >= length:
                    at = self.start + p.CHUNK.size
                    payload = bytes(self.view[at : at + length])
                    self.start = at + length
                    self._chunk_payload(handle, pend, typ, payload, last)
                elif p.CHUNK.size + length <= self.STAGING - self.MIN_FREE:
                    break  # the staging buffer takes the rest
                else:
                    # a chunk larger than the staging buffer (many extents, a long message)
                    big = bytearray(length)
                    have = avail - p.CHUNK.size
                    big[:have] = self.view[self.start + p.CHUNK.size : self.end]
                    self.start = self.end = 0
                    self.sink = memoryview(big)[have:]
                    self.sink_got = 0
                    self.sink_full = lambda h=handle, q=pend, t=typ, b=big, d=last: (
                        self._chunk_payload(h, q, t, bytes(b), d)
                    )
                    return
            else:
                raise ConnectionLost(f"bad reply magic {magic:#x}")
        if self.start == self.end:
            self.start = self.end = 0

    def _chunk_done(self, handle: int, pend: Pending, last: bool) -> None:
        if last:
            self.conn.complete(handle, pend)

    def _chunk_payload(
        self, handle: int, pend: Pending, typ: int, payload: bytes, last: bool
    ) -> None:
        self.conn.chunk(pend, typ, payload)
        if last:
            self.conn.complete(handle, pend)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.sink, self.sink_full = None, None
        self.old.connection_lost(exc)
        self.conn.lost(exc or ConnectionLost("connection closed by the server"))
        if not self.ended.done():
            self.ended.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True
        self.old.pause_writing()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.old.resume_writing()
