"""NBD client connection: handshake, then pipelined requests with out-of-order replies.

After the handshake the socket (plain or TLS) is handed to ``ReplyReader``, a
buffered protocol that parses replies out of one staging buffer and completes the
pending request a reply names from inside the transport's read callback: no reader
task, no StreamReader copies. A read's payload is received straight into the
request's own buffer, in the order it arrives. Senders share the write side: the
coroutine ``request()`` under a lock, ``try_request()`` (callback completion) only
when the lock is free and the transport is not above its high-water mark. When
the connection breaks, every pending request fails with ``ConnectionLost`` and
the caller (the ``nbd`` block driver) decides whether to wait for a reconnect or
report EIO.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import socket
import ssl
import struct
from typing import cast

from ..address import SocketAddress
from ..errors import BlockError
from . import proto as p
from .replies import ConnectionLost, Done, Pending, ReplyReader, call_back

log = logging.getLogger("blockrep.nbd.client")

# the requests whose reply carries no data, the only ones try_request() takes
NO_DATA_REPLY = frozenset({p.CMD_WRITE, p.CMD_WRITE_ZEROES, p.CMD_TRIM, p.CMD_FLUSH})

# header and payload go to the transport in one write up to this size: copying
# a small payload costs less than a second send()
JOIN_PAYLOAD = 64 << 10

# try_request()'s queue for one turn of the event loop (payloads are referenced, not copied)
QUEUE_LIMIT = 8 << 20


class NBDConnection:
    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.size = 0
        self.flags = 0
        self.structured = False
        self.meta_context_id: int | None = None
        self.block_size = (1, 4096, p.MAX_BUFFER)
        self.pending: dict[int, Pending] = {}
        self.handles = itertools.count(1)
        self.wlock = asyncio.Lock()
        self.replies: ReplyReader | None = None
        # request() callers waiting for or holding the write side: while there is one,
        # try_request() refuses, so requests leave in the order they were made
        self.senders = 0
        # try_request()'s requests, sent together at the end of the loop's turn
        self.outq: list[bytes | memoryview] = []
        self.outq_bytes = 0
        self.out_scheduled = False
        self.closed = False

    # -- connect and handshake -----------------------------------------------------

    async def connect(
        self,
        addr: SocketAddress,
        export: str,
        *,
        tls: ssl.SSLContext | None = None,
        tls_hostname: str | None = None,
    ) -> None:
        try:
            if addr.type == "unix":
                self.reader, self.writer = await asyncio.open_unix_connection(
                    addr.path, limit=1 << 20
                )
            else:
                self.reader, self.writer = await asyncio.open_connection(
                    addr.host, int(addr.port), limit=1 << 20
                )
                sock = self.writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            err = e.errno or errno.ECONNREFUSED
            raise BlockError(
                err, f"Failed to connect to '{addr.describe()}': {os.strerror(err)}"
            ) from None
        try:
            await self._handshake(
                export, tls, tls_hostname or (addr.host if addr.type == "inet" else None)
            )
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            self.writer.close()
            raise BlockError(errno.EIO, f"Failed to read initial magic: {e}") from None
        except BaseException:
            self.writer.close()
            raise
        self._start_transmission()

    def _start_transmission(self) -> None:
        """Hand the socket (plain or TLS) to a ReplyReader for the rest of the connection."""
        assert self.reader is not None and self.writer is not None
        # a stream socket's transport reads too; StreamWriter only types it as a writer
        transport = cast(asyncio.Transport, self.writer.transport)
        old = transport.get_protocol()
        # The handshake reads exactly what it asks for, but a server may have sent
        # more (nothing is due before a request; a hostile one could) and asyncio has
        # no public call that hands buffered bytes back.
        buffered: bytearray = self.reader._buffer  # type: ignore[attr-defined]
        leftover = bytes(buffered)
        buffered.clear()
        self.replies = ReplyReader(self, transport, old)
        transport.set_protocol(self.replies)
        if leftover:
            self.replies.feed(leftover)

    async def _read(self, n: int) -> bytes:
        assert self.reader is not None
        return await self.reader.readexactly(n)

    async def _send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def _option_reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, rtype, length = p.OPTION_REPLY.unpack(await self._read(p.OPTION_REPLY.size))
        if magic != p.OPT_REPLY_MAGIC or ropt != opt:
            raise BlockError(errno.EIO, "Unexpected option reply from the server")
        if length > p.MAX_OPTION_LEN:
            raise BlockError(errno.EIO, "Option reply too long")
        return rtype, await self._read(length)

    async def _handshake(
        self, export: str, tls: ssl.SSLContext | None, hostname: str | None
    ) -> None:
        magic, second = struct.unpack(">QQ", await self._read(16))
        if magic != p.NBDMAGIC:
            raise BlockError(errno.EINVAL, "Invalid magic received")
        if second != p.IHAVEOPT:
            raise BlockError(errno.EINVAL, "Server does not support the fixed newstyle protocol")
        (hflags,) = struct.unpack(">H", await self._read(2))
        if not hflags & p.FLAG_FIXED_NEWSTYLE:
            raise BlockError(errno.EINVAL, "Server does not support the fixed newstyle protocol")
        cflags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if hflags & p.FLAG_NO_ZEROES else 0)
        await self._send(struct.pack(">I", cflags))
        if tls is not None:
            await self._send(p.pack_option(p.OPT_STARTTLS))
            rtype, msg = await self._option_reply(p.OPT_STARTTLS)
            if rtype != p.REP_ACK:
                raise BlockError(errno.EINVAL, "Server don't support STARTTLS option")
            assert self.writer is not None
            try:
                await self.writer.start_tls(tls, server_hostname=hostname or None)
            except (ssl.SSLError, OSError) as e:
                raise BlockError(errno.EPERM, f"TLS handshake failed: {e}") from None
        await self._send(p.pack_option(p.OPT_STRUCTURED_REPLY))
        rtype, _ = await self._option_reply(p.OPT_STRUCTURED_REPLY)
        if rtype == p.REP_ERR_TLS_REQD:
            raise BlockError(errno.EPERM, "The server requires TLS")
        self.structured = rtype == p.REP_ACK
        if self.structured:
            await self._send(
                p.pack_option(
                    p.OPT_SET_META_CONTEXT, p.pack_meta_request(export, [p.META_BASE_ALLOCATION])
                )
            )
            while True:
                rtype, data = await self._option_reply(p.OPT_SET_META_CONTEXT)
                if rtype == p.REP_META_CONTEXT and len(data) >= 4:
                    if data[4:].decode(errors="replace") == p.META_BASE_ALLOCATION:
                        self.meta_context_id = struct.unpack(">I", data[:4])[0]
                    continue
                break
        await self._send(p.pack_option(p.OPT_GO, p.pack_info_request(export, [p.INFO_BLOCK_SIZE])))
        got_export = False
        while True:
            rtype, data = await self._option_reply(p.OPT_GO)
            if rtype == p.REP_INFO and len(data) >= 2:
                (itype,) = struct.unpack(">H", data[:2])
                if itype == p.INFO_EXPORT and len(data) == 12:
                    self.size, self.flags = struct.unpack(">QH", data[2:])
                    got_export = True
                elif itype == p.INFO_BLOCK_SIZE and len(data) == 14:
                    self.block_size = struct.unpack(">III", data[2:])
                continue
            if rtype == p.REP_ACK:
                break
            if rtype == p.REP_ERR_UNSUP:
                await self._export_name(export)
                return
            reason = data.decode(errors="replace")
            if rtype == p.REP_ERR_UNKNOWN:
                raise BlockError(
                    errno.ENOENT,
                    f"Requested export not available\nserver reported: {reason or 'export ' + repr(export) + ' not present'}",
                )
            if rtype == p.REP_ERR_TLS_REQD:
                raise BlockError(errno.EPERM, "The server requires TLS")
            raise BlockError(errno.EINVAL, f"Option 'go' rejected by the server: {reason}")
        if not got_export:
            raise BlockError(errno.EINVAL, "Server did not send export information")

    async def _export_name(self, export: str) -> None:
        await self._send(p.pack_option(p.OPT_EXPORT_NAME, export.encode()))
        self.size, self.flags = struct.unpack(">QH", await self._read(10))
        self.structured = False
        self.meta_context_id = None

    # -- transmission ----------------------------------------------------------------

    async def request(
        self, typ: int, offset: int, length: int, flags: int = 0, payload: bytes | memoryview = b""
    ) -> Pending:
        if self.closed:
            raise ConnectionLost("connection closed")
        handle = next(self.handles)
        fut = asyncio.get_running_loop().create_future()
        pend = Pending(typ, offset, length, fut)
        sent = False
        if typ == p.CMD_READ:
            pend.data = bytearray(length)
        self.pending[handle] = pend
        self.senders += 1  # in line for the write side: try_request() must not pass it
        try:
            async with self.wlock:
                assert self.writer is not None
                self._write(p.pack_request(typ, handle, offset, length, flags), payload)
                self.senders -= 1
                sent = True
                await self.writer.drain()
        except (ConnectionError, OSError) as e:
            self.pending.pop(handle, None)
            self.lost(e)
            if fut.done() and not fut.cancelled():
                fut.exception()  # failed by an earlier loss: retrieved, raised below
            raise ConnectionLost(str(e)) from None
        finally:
            if not sent:
                self.senders -= 1
        await fut
        if pend.error:
            raise BlockError(p.nbd_to_errno(pend.error), pend.message or None)
        return pend

    def try_request(
        self,
        typ: int,
        offset: int,
        length: int,
        flags: int,
        payload: bytes | memoryview,
        done: Done,
    ) -> bool:
        """Send a request whose reply carries no data now, or do nothing and return False.

        False when it cannot be sent without waiting: the connection is closed,
        a ``request()`` waits for or holds the write side, or the transport is above its high-water
        mark. True: header and payload were written to the transport (``payload``
        must stay valid until ``done`` runs) and ``done`` will be called exactly
        once, never from inside this call: None on success, a BlockError on an
        error reply, ConnectionLost when the connection broke first.
        """
        if typ not in NO_DATA_REPLY:
            raise ValueError(f"try_request() takes no {p.CMD_NAMES.get(typ, typ)} request")
        replies = self.replies
        busy = self.senders or self.wlock.locked()
        if self.closed or replies is None or replies.writing_paused or busy:
            return False
        transport = replies.transport
        if (
            transport.is_closing()
            or transport.get_write_buffer_size() > replies.high_water
            or self.outq_bytes > QUEUE_LIMIT
        ):
            return False
        handle = next(self.handles)
        self.pending[handle] = Pending(typ, offset, length, None, done)
        # Queued, and sent with the others queued in this turn of the event loop in
        # one write (a send per 4 KiB request was a third of a replicating primary's
        # CPU). A broken socket is reported to connection_lost later, which fails this
        # request through ``done``.
        header = p.pack_request(typ, handle, offset, length, flags)
        self.outq.append(header + payload if len(payload) <= JOIN_PAYLOAD else header)
        if len(payload) > JOIN_PAYLOAD:
            self.outq.append(payload)
        self.outq_bytes += len(header) + len(payload)
        if not self.out_scheduled:
            self.out_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_queued)
        return True

    def _flush_queued(self) -> None:
        """Send what try_request() queued, in order, in one write."""
        self.out_scheduled = False
        if self.outq:
            out, self.outq, self.outq_bytes = self.outq, [], 0
            if self.writer is not None and not self.writer.is_closing():
                self.writer.writelines(out)

    def _write(self, header: bytes, payload: bytes | memoryview) -> None:
        assert self.writer is not None
        self._flush_queued()  # requests queued earlier leave first
        if not payload:
            self.writer.write(header)
        elif len(payload) <= JOIN_PAYLOAD:
            self.writer.write(header + payload)
        else:
            self.writer.write(header)
            self.writer.write(payload)

    def complete(self, handle: int, pend: Pending) -> None:
        """The reply to ``handle`` is complete: wake its waiter or call it back."""
        del self.pending[handle]
        done = pend.done
        if done is not None:
            pend.done = None
            err = (
                BlockError(p.nbd_to_errno(pend.error), pend.message or None) if pend.error else None
            )
            call_back(done, err)
        elif pend.future is not None and not pend.future.done():
            pend.future.set_result(None)

    def chunk(self, pend: Pending, typ: int, data: bytes) -> None:
        """A structured chunk other than data received in place (which ReplyReader does)."""
        if typ == p.REPLY_TYPE_OFFSET_DATA:
            off, body = p.parse_offset_data(data)
            rel = off - pend.offset
            if pend.data is None or rel < 0 or rel + len(body) > pend.length:
                raise ConnectionLost("data chunk outside the request")
            pend.data[rel : rel + len(body)] = body
        elif typ == p.REPLY_TYPE_OFFSET_HOLE:
            off, n = p.parse_offset_hole(data)
            rel = off - pend.offset
            if pend.data is None or rel < 0 or rel + n > pend.length:
                raise ConnectionLost("hole chunk outside the request")
            pend.data[rel : rel + n] = bytes(n)
        elif typ == p.REPLY_TYPE_BLOCK_STATUS:
            ctx, extents = p.parse_block_status(data)
            if ctx == self.meta_context_id:
                pend.extents.extend(extents)
        elif typ in (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET):
            err, pend.message = p.parse_error_chunk(data)
            pend.error = err or p.NBD_EIO
        elif typ == p.REPLY_TYPE_NONE:
            pass

    def lost(self, exc: BaseException) -> None:
        self.closed = True
        pending, self.pending = self.pending, {}
        for pend in pending.values():
            if pend.done is not None:
                done, pend.done = pend.done, None
                call_back(done, ConnectionLost(str(exc)))
            elif pend.future is not None and not pend.future.done():
                pend.future.set_exception(ConnectionLost(str(exc)))
        if self.writer is not None:
            self.writer.close()

    async def close(self) -> None:
        if self.writer is not None and not self.closed:
            try:
                async with self.wlock:
                    self._write(p.pack_request(p.CMD_DISC, 0, 0, 0), b"")  # after the queued
                    await self.writer.drain()
            except (ConnectionError, OSError):
                pass
        self.lost(ConnectionLost("connection closed"))
        if self.replies is not None:
            # the socket is released in connection_lost; a TLS close waits for the
            # server's close_notify, which a server that left may never send
            await asyncio.wait([self.replies.ended], timeout=CLOSE_WAIT)


CLOSE_WAIT = 2.0  # seconds close() waits for the transport to end
