"""NBD client connection: handshake, then pipelined requests with out-of-order replies.

One reader task owns the socket's read side and completes the pending request a
reply names; senders share the write side under a lock. When the connection
breaks, every pending request fails with ``ConnectionLost`` and the caller (the
``nbd`` block driver) decides whether to wait for a reconnect or report EIO.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import socket
import ssl
import struct
from dataclasses import dataclass, field

from ..address import SocketAddress
from ..errors import BlockError
from . import proto as p


class ConnectionLost(Exception):
    """The connection to the server broke while a request was pending."""


@dataclass
class _Pending:
    type: int
    offset: int
    length: int
    future: asyncio.Future
    data: bytearray | None = None
    extents: list[tuple[int, int]] = field(default_factory=list)
    error: int = 0
    message: str = ""


class NBDConnection:
    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.size = 0
        self.flags = 0
        self.structured = False
        self.meta_context_id: int | None = None
        self.block_size = (1, 4096, p.MAX_BUFFER)
        self.pending: dict[int, _Pending] = {}
        self.handles = itertools.count(1)
        self.wlock = asyncio.Lock()
        self.reader_task: asyncio.Task | None = None
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
        self.reader_task = asyncio.create_task(self._read_replies())

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
    ) -> _Pending:
        if self.closed:
            raise ConnectionLost("connection closed")
        handle = next(self.handles)
        fut = asyncio.get_running_loop().create_future()
        pend = _Pending(typ, offset, length, fut)
        if typ == p.CMD_READ:
            pend.data = bytearray(length)
        self.pending[handle] = pend
        try:
            async with self.wlock:
                assert self.writer is not None
                self.writer.write(p.pack_request(typ, handle, offset, length, flags))
                if payload:
                    self.writer.write(payload)
                await self.writer.drain()
        except (ConnectionError, OSError) as e:
            self.pending.pop(handle, None)
            self._lost(e)
            raise ConnectionLost(str(e)) from None
        await fut
        if pend.error:
            raise BlockError(p.nbd_to_errno(pend.error), pend.message or None)
        return pend

    async def _read_replies(self) -> None:
        try:
            while True:
                (magic,) = struct.unpack(">I", await self._read(4))
                if magic == p.SIMPLE_REPLY_MAGIC:
                    err, handle = struct.unpack(">IQ", await self._read(12))
                    pend = self.pending.pop(handle, None)
                    if pend is None:
                        raise ConnectionLost(f"reply for unknown handle {handle}")
                    if err:
                        pend.error = err
                    elif pend.type == p.CMD_READ and pend.length:
                        pend.data = bytearray(await self._read(pend.length))
                    if not pend.future.done():
                        pend.future.set_result(None)
                elif magic == p.STRUCTURED_REPLY_MAGIC:
                    flags, typ, handle, length = struct.unpack(">HHQI", await self._read(16))
                    if length > p.MAX_BUFFER + 64:
                        raise ConnectionLost("structured chunk too large")
                    data = await self._read(length) if length else b""
                    pend = self.pending.get(handle)
                    if pend is None:
                        raise ConnectionLost(f"chunk for unknown handle {handle}")
                    self._chunk(pend, typ, data)
                    if flags & p.REPLY_FLAG_DONE:
                        del self.pending[handle]
                        if not pend.future.done():
                            pend.future.set_result(None)
                else:
                    raise ConnectionLost(f"bad reply magic {magic:#x}")
        except (
            asyncio.IncompleteReadError,
            ConnectionError,
            OSError,
            ConnectionLost,
            struct.error,
        ) as e:
            self._lost(e)
        except asyncio.CancelledError:
            self._lost(ConnectionLost("closed"))
            raise

    def _chunk(self, pend: _Pending, typ: int, data: bytes) -> None:
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

    def _lost(self, exc: BaseException) -> None:
        self.closed = True
        pending, self.pending = self.pending, {}
        for pend in pending.values():
            if not pend.future.done():
                pend.future.set_exception(ConnectionLost(str(exc)))
        if self.writer is not None:
            self.writer.close()

    async def close(self) -> None:
        if self.writer is not None and not self.closed:
            try:
                async with self.wlock:
                    self.writer.write(p.pack_request(p.CMD_DISC, 0, 0, 0))
                    await self.writer.drain()
            except (ConnectionError, OSError):
                pass
        self.closed = True
        if self.reader_task is not None:
            self.reader_task.cancel()
            try:
                await self.reader_task
            except (asyncio.CancelledError, Exception):
                pass
        if self.writer is not None:
            self.writer.close()
