"""The ``nbd`` protocol driver: a node whose data lives on an NBD server.

Requests are pipelined on one connection. If the connection breaks, requests in
flight fail with EIO; with ``reconnect-delay=N`` the driver reconnects in the
background and requests (new and interrupted) wait up to N seconds for it, as
QEMU's nbd driver does.
"""

from __future__ import annotations

import asyncio
import errno
import time
from typing import Any

from .. import fastpath
from ..address import NBD_DEFAULT_PORT, SocketAddress
from ..errors import BlockError, OptionError
from ..nbd import proto as p
from ..nbd.client import ConnectionLost, NBDConnection
from .graph import Graph, register
from .node import Done, Extent, Node
from .stepping import report, start_now


@register
class NBDNode(Node):
    driver_name = "nbd"
    schema = {
        "server": "any",
        "export": "str",
        "tls-creds": "str",
        "tls-hostname": "str",
        "reconnect-delay": "int",
        "open-timeout": "int",
        "x-dirty-bitmap": "str",
        "filename": "str",
        "host": "str",
        "port": "any",
        "path": "str",
    }
    addr: SocketAddress
    export: str

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        super().__init__(node_name, options)
        self.conn: NBDConnection | None = None
        self.reconnect_delay = float(options.get("reconnect-delay", 0))
        self._reconnecting: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self._lost_at = 0.0
        self.tls = None
        self.tls_hostname: str | None = options.get("tls-hostname")

    @classmethod
    async def open(cls, graph: Graph, name: str, opts: dict[str, Any], typed: bool) -> NBDNode:
        node = cls(name, opts)
        if "filename" in opts:
            node.addr, node.export, tls = SocketAddress.from_nbd_uri(opts["filename"])
            if tls:  # QEMU's nbd driver takes TLS from tls-creds, never from the URI
                raise OptionError(f"Unsupported NBD URI '{opts['filename']}'")
        elif "server" in opts:
            node.addr = SocketAddress.from_qapi(opts["server"])
            node.export = opts.get("export", "")
        elif "path" in opts:
            node.addr = SocketAddress.unix(opts["path"])
            node.export = opts.get("export", "")
        elif "host" in opts:
            node.addr = SocketAddress.inet(opts["host"], opts.get("port", NBD_DEFAULT_PORT))
            node.export = opts.get("export", "")
        else:
            raise OptionError("Parameter 'server' is missing")
        if opts.get("tls-creds"):
            creds = graph.objects.get(opts["tls-creds"])
            if creds is None:
                raise OptionError(f"No TLS credentials with id '{opts['tls-creds']}'")
            node.tls = creds.client_context()
        deadline = time.monotonic() + float(opts.get("open-timeout", 0))
        while True:
            try:
                await node._connect()
                break
            except BlockError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.1)
        assert node.conn is not None  # _connect() succeeded
        node.read_only = node.read_only or bool(node.conn.flags & p.TF_READ_ONLY)
        return node

    async def _connect(self) -> None:
        conn = NBDConnection()
        await conn.connect(self.addr, self.export, tls=self.tls, tls_hostname=self.tls_hostname)
        self.conn = conn
        self.length = conn.size
        self._connected.set()

    def describe_filename(self) -> str:
        return self.addr.nbd_uri(self.export)

    # -- reconnect -------------------------------------------------------------------

    def _on_lost(self) -> None:
        if self._connected.is_set():
            self._connected.clear()
            self._lost_at = time.monotonic()
        if self.reconnect_delay > 0 and (self._reconnecting is None or self._reconnecting.done()):
            self._reconnecting = asyncio.create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        while not self.closed and not self._connected.is_set():
            try:
                await self._connect()
                return
            except BlockError:
                await asyncio.sleep(0.2)

    async def _request(
        self, typ: int, offset: int, length: int, flags: int = 0, payload: bytes | memoryview = b""
    ):
        while True:
            conn = self.conn
            if conn is not None and not conn.closed:
                try:
                    return await conn.request(typ, offset, length, flags, payload)
                except ConnectionLost:
                    pass
            self._on_lost()
            if self.reconnect_delay <= 0:
                raise BlockError(errno.EIO, "NBD connection lost")
            left = self._lost_at + self.reconnect_delay - time.monotonic()
            if left <= 0:
                raise BlockError(errno.EIO, "NBD connection lost (reconnect-delay expired)")
            try:
                await asyncio.wait_for(self._connected.wait(), left)
            except TimeoutError:
                raise BlockError(
                    errno.EIO, "NBD connection lost (reconnect-delay expired)"
                ) from None

    # -- I/O -------------------------------------------------------------------------

    async def _co_read(self, offset: int, nbytes: int) -> bytes:
        out = []
        pos = offset
        while pos < offset + nbytes:
            n = min(p.MAX_BUFFER, offset + nbytes - pos)
            pend = await self._request(p.CMD_READ, pos, n)
            out.append(bytes(pend.data))
            pos += n
        return out[0] if len(out) == 1 else b"".join(out)

    async def _co_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        mv = memoryview(data)
        pos = 0
        while pos < len(mv):
            n = min(p.MAX_BUFFER, len(mv) - pos)
            flags = p.CMD_FLAG_FUA if fua and self.conn and self.conn.flags & p.TF_SEND_FUA else 0
            await self._request(p.CMD_WRITE, offset + pos, n, flags, mv[pos : pos + n])
            pos += n
        if fua and not (self.conn and self.conn.flags & p.TF_SEND_FUA):
            await self._co_flush()

    def _fast_write(self, offset: int, data: bytes | memoryview, fua: bool, done: Done) -> bool:
        """The write sent at once, its reply a callback. A connection that breaks before
        the reply hands the request to the general path (reconnect-delay decides)."""
        conn = self.conn
        nbytes = len(data)
        if conn is None or conn.closed:
            return fastpath.refuse("nbd: not connected")
        if nbytes > p.MAX_BUFFER:
            return fastpath.refuse("nbd: split into requests")
        if fua and not conn.flags & p.TF_SEND_FUA:
            return fastpath.refuse("nbd: FUA by flush")
        flags = p.CMD_FLAG_FUA if fua else 0

        def replied(err: BaseException | None) -> None:
            self.write_replied(err, offset, data, flags, done)

        if not conn.try_request(p.CMD_WRITE, offset, nbytes, flags, data, replied):
            return fastpath.refuse("nbd: link busy")
        return True

    def write_replied(
        self,
        err: BaseException | None,
        offset: int,
        data: bytes | memoryview,
        flags: int,
        done: Done,
    ) -> None:
        """A fast write's reply: its outcome to ``done``, or, when the connection broke
        first, the write again on the general path (reconnect-delay decides)."""
        if err is None or isinstance(err, BlockError):
            done(err)
        else:
            self._retry_write(offset, data, flags, done)

    def _retry_write(self, offset: int, data: bytes | memoryview, flags: int, done: Done) -> None:
        req = self._request(p.CMD_WRITE, offset, len(data), flags, data)
        start_now(report(req, done, "NBD write retry"))

    async def _co_write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> None:
        if not (self.conn and self.conn.flags & p.TF_SEND_WRITE_ZEROES):
            await Node.write(self, offset, bytes(nbytes), fua)
            return
        flags = (0 if may_unmap else p.CMD_FLAG_NO_HOLE) | (p.CMD_FLAG_FUA if fua else 0)
        pos = offset
        while pos < offset + nbytes:
            n = min(1 << 30, offset + nbytes - pos)
            await self._request(p.CMD_WRITE_ZEROES, pos, n, flags)
            pos += n

    async def _co_discard(self, offset: int, nbytes: int) -> None:
        if not (self.conn and self.conn.flags & p.TF_SEND_TRIM):
            return
        pos = offset
        while pos < offset + nbytes:
            n = min(1 << 30, offset + nbytes - pos)
            await self._request(p.CMD_TRIM, pos, n)
            pos += n

    async def _co_flush(self) -> None:
        if self.conn and self.conn.flags & p.TF_SEND_FLUSH and not self.read_only:
            await self._request(p.CMD_FLUSH, 0, 0)

    async def _co_block_status(self, offset: int, nbytes: int) -> list[Extent]:
        conn = self.conn
        if conn is None or conn.meta_context_id is None:
            return [Extent(offset, nbytes, True, False, True, 0, offset, self)]
        out: list[Extent] = []
        pos = offset
        end = offset + nbytes
        while pos < end:
            n = min(1 << 30, end - pos)
            pend = await self._request(p.CMD_BLOCK_STATUS, pos, n)
            if not pend.extents:
                raise BlockError(errno.EIO, "NBD server sent no block status")
            for length, flags in pend.extents:
                length = min(length, end - pos)
                if length <= 0:
                    break
                data = not flags & p.STATE_HOLE
                zero = bool(flags & p.STATE_ZERO)
                out.append(Extent(pos, length, True, zero, data, 0, pos, self))
                pos += length
        return out

    async def close(self) -> None:
        await super().close()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self.conn is not None:
            await self.conn.close()
