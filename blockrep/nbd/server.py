"""NBD server: sockets, the handshake's I/O, and the transmission phase's requests.

The negotiation itself is ``handshake.ServerHandshake`` (no I/O); framing of
requests is ``transmission.RequestReader``. A client may have many requests in
flight and gets replies out of order; the replies made in one turn of the event
loop leave in one send. The common requests take no task: a write the export
accepts through ``try_write`` is answered from its completion callback, a read
the export serves synchronously (``try_read``, or ``file_range`` for
``os.sendfile``) is answered at once, and a request that fails validation is
answered at once. Every other request (and every one the export declines) runs
as its own task, the general path. A client that breaks the
protocol loses its own connection and nothing else: every length is bounded
before anything is allocated, and data reaches the export only through
well-formed writes.

A client cannot hold the others either: a request is in flight on its export
(``enter``..``leave``, what a checkpoint's quiesce waits for) only while its
result is computed, never while its reply waits for the client to read; a
client whose replies do not drain for ``send_timeout`` seconds, or that does
not finish the handshake in ``handshake_timeout`` seconds, is dropped; and a
connection over the process's descriptor budget (``limits``) is closed at once.

Each request is counted in flight on its connection (``RequestReader``) from its
header until its reply is queued, task or no task, and ``drain``/``close``/DISC
wait for the task-less writes as for the tasks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import cast

from .. import limits
from ..address import SocketAddress
from ..errors import BlockError, ProtocolError
from ..tls import peer_dn
from . import proto as p
from .exports import NBDExport, check_request
from .handshake import Abort, NeedData, ServerHandshake, StartTLS
from .transmission import RequestReader

log = logging.getLogger("blockrep.nbd.server")

# StreamReader pauses the socket past 2x this; a few full-size writes must fit
STREAM_LIMIT = 16 << 20
BIG_REPLY = 64 << 10  # read replies at least this large are sent without joining
REPLY_HIGH_WATER = 8 << 20  # queued reply bytes before a request waits for the socket
SEND_TIMEOUT = 30.0  # seconds a client may leave its replies unread before it is dropped
HANDSHAKE_TIMEOUT = 10.0  # QEMU 9.1's nbd-server-start handshake-max-seconds default
CLOSE_GRACE = 5.0  # seconds close() lets replies drain before it aborts their clients
# SO_SNDBUF/SO_RCVBUF of a unix-socket data connection (the kernel doubles it). Unix
# sockets have no autotuning: at the 208 KiB default a 1 MiB read reply never fits,
# so sendfile stops at once and the reply is copied through the transport (issue 15,
# 1 MiB reads at qd 8: 1400-2000 MiB/s without, 4600-4900 with). TCP keeps the
# kernel's autotuning, measured faster than a fixed 4 MiB (3900-4500 vs 2500-3100 MiB/s).
UNIX_SOCKET_BUFFER = 4 << 20
# read replies at least this large may leave by os.sendfile (file-backed exports):
# 1 MiB reads at qd 8 cost the daemon 55-100 us of CPU each instead of 350-400 us.
# sendfile queues references to the page cache, not a copy: the client gets the
# bytes as they are when it receives them, so a write that completes after the
# reply was queued and before the client read it can show in it. The read still
# returns what the disk held at some moment before its reply arrived (a read
# concurrent with an overlapping write is undefined in NBD either way).
SENDFILE_MIN = 64 << 10

# A reply: the parts that go on the wire, in order. A read's payload is the last part.
Reply = tuple[bytes, ...]


class NBDServer:
    def __init__(
        self,
        exports: dict[str, NBDExport],
        *,
        tls: ssl.SSLContext | None = None,
        authz: Callable[[str], bool] | None = None,
        max_connections: int = 0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        """``max_connections``, ``handshake_timeout`` and ``send_timeout``: 0 is no bound."""
        self.exports = exports
        self.tls = tls
        self.authz = authz
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        self.refused = 0  # connections closed at accept (max_connections or descriptors)
        # export names are secrets (a replication link): nothing listed, no default export
        self.private = False
        # None: anyone; else a TCP client's host must pass it (a link admits its peer only)
        self.admit_peer: Callable[[str], bool] | None = None
        self.clients: set[NBDClientConn] = set()
        self.servers: list[asyncio.AbstractServer] = []

    async def listen_tcp(self, host: str, port: int) -> asyncio.AbstractServer:
        srv = await asyncio.start_server(
            self._accept, host, port, reuse_address=True, limit=STREAM_LIMIT
        )
        self.servers.append(srv)
        return srv

    async def listen_unix(self, path: str) -> asyncio.AbstractServer:
        srv = await asyncio.start_unix_server(self._accept, path, limit=STREAM_LIMIT)
        self.servers.append(srv)
        return srv

    async def listen(self, a: SocketAddress) -> asyncio.AbstractServer:
        """Listen on an inet or unix address (a stale socket file is replaced)."""
        if a.type == "unix":
            if os.path.exists(a.path):
                os.unlink(a.path)
            return await self.listen_unix(a.path)
        return await self.listen_tcp(a.host, int(a.port))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock is not None and sock.family == socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UNIX_SOCKET_BUFFER)
        peer = writer.get_extra_info("peername")
        if self.admit_peer is not None and not (
            isinstance(peer, tuple) and self.admit_peer(str(peer[0]))
        ):
            self.refused += 1
            log.debug("connection refused: %s is not the peer", peer)
            writer.transport.abort()
            return
        if self.max_connections and len(self.clients) >= self.max_connections:
            self.refused += 1
            log.debug("connection refused: max-connections %d reached", self.max_connections)
            writer.transport.abort()
            return
        if not limits.admit_connection(limits.Share.DATA):
            self.refused += 1
            log.debug("connection refused: descriptor reserve reached")
            writer.transport.abort()
            return
        conn = NBDClientConn(self, reader, writer)
        conn.task = asyncio.current_task()
        self.clients.add(conn)
        try:
            await conn.run()
        except (ConnectionError, asyncio.IncompleteReadError, ProtocolError, ssl.SSLError) as e:
            log.debug("client dropped: %s", e)
        except TimeoutError:
            log.debug("client dropped: no handshake in %s s", self.handshake_timeout)
        except Exception:  # a bug must cost one connection, never the daemon
            log.exception("NBD client handler failed")
        finally:
            limits.release_connection()
            self.clients.discard(conn)
            if conn.export is not None:
                conn.export.clients.discard(conn)
            await conn.drain()
            writer.close()

    async def close(self) -> None:
        """Stop listening, let in-flight requests finish, drop the clients."""
        for s in self.servers:
            s.close()
        for s in self.servers:
            await s.wait_closed()
        self.servers.clear()
        clients = list(self.clients)
        running = [asyncio.ensure_future(c.drain()) for c in clients if c.busy()]
        if running:
            # a request's work on the export ends on its own; only a reply the client
            # does not read can wait longer, and that client is aborted below
            await asyncio.wait(running, timeout=CLOSE_GRACE)
            for t in running:
                t.cancel()
        for c in clients:
            if c.busy():
                c.writer.transport.abort()
            else:
                c.writer.close()
        tasks = [c.task for c in clients if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    def drop_export_clients(self, export: NBDExport) -> None:
        for c in list(export.clients):
            c.writer.close()


class NBDClientConn:
    def __init__(
        self, server: NBDServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.structured = False
        self.meta_base_allocation = False
        self.export: NBDExport | None = None
        self.wlock = asyncio.Lock()
        self.outq: list[bytes] = []
        self.out_scheduled = False
        self.tasks: set[asyncio.Task] = set()
        # task-less writes the export took and has not completed (try_write)
        self.fast_writes = 0
        self.fast_idle: asyncio.Future[None] | None = None
        self.task: asyncio.Task | None = None
        self.requests: RequestReader | None = None
        self.sendfile_fd = -1  # the socket's descriptor when replies may use os.sendfile

    async def run(self) -> None:
        async with asyncio.timeout(self.server.handshake_timeout or None):
            export = await self._negotiate()
        if export is None:
            return
        self.export = export
        export.clients.add(self)
        await self._transmission()

    # -- handshake ---------------------------------------------------------------------

    async def _negotiate(self) -> NBDExport | None:
        """Drive the handshake: its replies out, exactly the bytes it asks for in."""
        srv = self.server
        hs = ServerHandshake(srv.exports, tls=srv.tls is not None, private=srv.private)
        while True:
            event = hs.next_event()
            if isinstance(event, StartTLS):
                # nothing more is read in plaintext: what the socket holds is for TLS
                self.writer.transport.pause_reading()  # type: ignore[attr-defined]
            out = hs.data_to_send()
            if out:
                self.writer.write(out)
                await self.writer.drain()
            if isinstance(event, NeedData):
                hs.receive_data(await self.reader.readexactly(event.nbytes))
            elif isinstance(event, StartTLS):
                assert srv.tls is not None
                # Bytes that came before the upgrade are plaintext a third party may
                # have injected; read after the upgrade they would pass for the client's
                # (CVE-2011-0411's kind). nbd-server and qemu-nbd drop such a client.
                if self.reader._buffer:  # type: ignore[attr-defined]
                    raise ProtocolError("data after NBD_OPT_STARTTLS before the TLS handshake")
                # reading has been paused since the ACK was queued, so nothing can join
                # the buffer between this check and start_tls taking over the socket
                await self.writer.start_tls(srv.tls)
                if srv.authz is not None and not srv.authz(self._peer_dn()):
                    raise ProtocolError("client certificate not authorized")
            elif isinstance(event, Abort):
                return None
            else:
                self.structured = hs.structured
                self.meta_base_allocation = hs.meta_base_allocation
                return event.export

    def _peer_dn(self) -> str:
        ssl_obj = self.writer.get_extra_info("ssl_object")
        return peer_dn(ssl_obj.getpeercert() if ssl_obj is not None else None)

    # -- transmission: requests in -------------------------------------------------------

    async def _transmission(self) -> None:
        """Hand the socket (plain or TLS) to a RequestReader until the client leaves."""
        # a stream socket's transport reads too; StreamWriter only types it as a writer
        transport = cast(asyncio.Transport, self.writer.transport)
        old = transport.get_protocol()
        # The handshake reads exactly what it asks for, but the socket may have
        # delivered more (a client's first requests) into the StreamReader, and
        # asyncio has no public call that hands buffered bytes back.
        buffered: bytearray = self.reader._buffer  # type: ignore[attr-defined]
        leftover = bytes(buffered)
        buffered.clear()
        reader = RequestReader(
            transport, old, self._dispatch, self.drain, send_timeout=self.server.send_timeout
        )
        self.requests = reader
        sock = self.writer.get_extra_info("socket")
        if sock is not None and self.writer.get_extra_info("ssl_object") is None:
            self.sendfile_fd = sock.fileno()
        transport.set_protocol(reader)
        reader.feed(leftover)
        await reader.closed

    def _dispatch(
        self, req: p.Request, payload: bytes | memoryview, recycle: Callable[[], None] | None
    ) -> bool:
        """Start one request; False when the connection is to end (DISC).

        ``recycle`` gives the payload's buffer back once the request is done:
        every layer has finished with the data when a write completes.
        """
        if req.type == p.CMD_DISC:
            return False
        if self._answer_now(req, payload, recycle):
            return True
        t = asyncio.create_task(self._handle(req, payload))
        self.tasks.add(t)
        t.add_done_callback(self._done)
        if recycle is not None:
            t.add_done_callback(lambda _t: recycle())
        return True

    def _done(self, t: asyncio.Task) -> None:
        self.tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.debug("request failed: %r", t.exception())
            self.writer.close()
        if self.requests is not None:
            self.requests.request_done()

    def busy(self) -> bool:
        """Requests still being computed (tasks, or writes the export took)."""
        return bool(self.tasks) or self.fast_writes > 0

    async def drain(self) -> None:
        while self.busy():
            if self.tasks:
                await asyncio.wait(list(self.tasks))
            elif self.fast_writes:
                if self.fast_idle is None:
                    self.fast_idle = asyncio.get_running_loop().create_future()
                await asyncio.shield(self.fast_idle)

    # -- transmission: the task-less path -----------------------------------------------

    def _answer_now(
        self, req: p.Request, payload: bytes | memoryview, recycle: Callable[[], None] | None
    ) -> bool:
        """Answer a request without a task when it can be; False for the general path.

        True means the request is answered or will be from the export's callback,
        and ``request_done`` and ``recycle`` are (or will be) called once each.
        """
        exp = self.export
        if exp is None or self.writer.is_closing():
            return False
        if self.writer.transport.get_write_buffer_size() > REPLY_HIGH_WATER:
            return False  # the general path waits for the socket first
        err = check_request(req, exp, self.structured, self.meta_base_allocation)
        if err:
            self._queue_reply(self._error(req, err, "invalid request"))
            self._request_done(recycle)
            return True
        if req.type == p.CMD_WRITE:
            return self._write_now(req, payload, recycle, exp)
        if req.type == p.CMD_READ and req.length:
            try:
                return self._read_now(req, exp)
            except Exception:  # a bug must cost one connection, never the daemon
                log.exception("NBD read failed")
                self.writer.close()
                self._request_done(None)
                return True
        return False

    def _request_done(self, recycle: Callable[[], None] | None) -> None:
        if recycle is not None:
            recycle()
        if self.requests is not None:
            self.requests.request_done()

    def _write_now(
        self,
        req: p.Request,
        payload: bytes | memoryview,
        recycle: Callable[[], None] | None,
        exp: NBDExport,
    ) -> bool:
        pending = True

        def done(err: BlockError | None) -> None:
            nonlocal pending
            if not pending:
                log.error("NBD write completed twice (handle %#x)", req.handle)
                return
            pending = False
            try:
                if err is None:
                    self._queue_reply((p.pack_simple_reply(req.handle),))
                else:
                    self._queue_reply(self._error(req, p.errno_to_nbd(err.errno), err.message))
            except Exception:  # a bug must cost one connection, never the daemon
                log.exception("NBD write reply failed")
                self.writer.close()
            finally:
                self._fast_write_done()
                self._request_done(recycle)

        self.fast_writes += 1
        try:
            took = exp.try_write(req.offset, payload, bool(req.flags & p.CMD_FLAG_FUA), done)
        except Exception:  # a bug must cost one connection, never the daemon
            log.exception("NBD write failed")
            if pending:
                pending = False
                self.writer.close()
                self._fast_write_done()
                self._request_done(recycle)
            return True
        if not took:
            self.fast_writes -= 1
            pending = False
        return bool(took)

    def _fast_write_done(self) -> None:
        self.fast_writes -= 1
        if self.fast_writes == 0 and self.fast_idle is not None:
            if not self.fast_idle.done():
                self.fast_idle.set_result(None)
            self.fast_idle = None

    def _read_head(self, req: p.Request, nbytes: int) -> bytes:
        if self.structured:
            return p.pack_offset_data_header(req.handle, req.offset, nbytes)
        return p.pack_simple_reply(req.handle)

    def _read_now(self, req: p.Request, exp: NBDExport) -> bool:
        if req.length >= SENDFILE_MIN and self._sendfile_ready():
            where = exp.file_range(req.offset, req.length)
            if where is not None:
                self._sendfile_reply(
                    self._read_head(req, req.length), where[0], where[1], req.length
                )
                self._request_done(None)
                return True
        data = exp.try_read(req.offset, req.length)
        if data is None:
            return False
        head = self._read_head(req, len(data))
        if len(data) >= BIG_REPLY:
            self._flush_replies()  # replies queued earlier leave first
            self.writer.write(head)
            self.writer.write(data)
        else:
            self._queue_reply((head, data))
        self._request_done(None)
        return True

    def _sendfile_ready(self) -> bool:
        """os.sendfile keeps the replies' order only with nothing queued before it."""
        return (
            self.sendfile_fd >= 0
            and not self.outq
            and not self.writer.is_closing()
            and self.writer.transport.get_write_buffer_size() == 0
        )

    def _sendfile_reply(self, head: bytes, fd: int, file_off: int, nbytes: int) -> None:
        """The reply header and ``nbytes`` of file ``fd`` straight onto the socket;
        what the socket does not take now goes through the transport (pread)."""
        sock = self.sendfile_fd
        sent = done = 0
        try:
            sent = os.write(sock, head)
            while sent == len(head) and done < nbytes:
                n = os.sendfile(sock, fd, file_off + done, nbytes - done)
                if n == 0:
                    break  # end of file: the rest reads as zeroes below
                done += n
        except (BlockingIOError, InterruptedError):
            pass  # the socket is full: the rest goes through the transport
        except OSError as e:  # the client went away: the transport will see it too
            log.debug("client dropped: %s", e)
            self.writer.transport.abort()
            return
        if sent < len(head):
            self.writer.write(head[sent:])
        if done < nbytes:
            try:
                rest = _pread_all(fd, nbytes - done, file_off + done)
            except OSError as e:  # part of the reply is out: only dropping the client is left
                log.warning("NBD read reply cut short: %s", e)
                self.writer.transport.abort()
                return
            self.writer.write(rest)

    # -- transmission: replies out -------------------------------------------------------

    async def _send(self, reply: Reply) -> None:
        """Send one reply: small ones are queued and all replies made in one turn of
        the event loop leave in one send (one syscall for many 4 KiB replies); a large
        read payload is written without joining (no copy)."""
        if len(reply) == 2 and len(reply[1]) >= BIG_REPLY:
            async with self.wlock:
                self._flush_replies()  # replies queued earlier leave first
                self.writer.write(reply[0])
                self.writer.write(reply[1])
                await self.writer.drain()
            return
        self._queue_reply(reply)
        if self.writer.transport.get_write_buffer_size() > REPLY_HIGH_WATER:
            async with self.wlock:
                await self.writer.drain()

    def _queue_reply(self, reply: Reply) -> None:
        """Queue a reply; those queued in one turn of the event loop leave in one send."""
        self.outq.extend(reply)
        if not self.out_scheduled:
            self.out_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_replies)

    def _flush_replies(self) -> None:
        self.out_scheduled = False
        if self.outq:
            if not self.writer.is_closing():
                self.writer.write(b"".join(self.outq))
            self.outq.clear()

    def _error(self, req: p.Request, err: int, msg: str = "") -> Reply:
        if self.structured and (req.type in (p.CMD_READ, p.CMD_BLOCK_STATUS)):
            return (p.pack_error_chunk(req.handle, err, msg),)
        return (p.pack_simple_reply(req.handle, err),)

    # -- transmission: commands ----------------------------------------------------------

    async def _handle(self, req: p.Request, payload: bytes | memoryview) -> None:
        exp = self.export
        assert exp is not None
        if self.writer.transport.get_write_buffer_size() > REPLY_HIGH_WATER:
            # results wait in the socket's buffer: compute no more until it drains, so
            # a client that reads slowly bounds what its replies hold in memory
            async with self.wlock:
                await self.writer.drain()
        # In flight on the export (what a checkpoint's quiesce waits for) only while
        # the result is computed: a client that does not read its replies must not
        # hold the export, and so every other client of it, through the send.
        await exp.enter()
        try:
            reply = await self._execute(req, payload, exp)
        finally:
            exp.leave()
        await self._send(reply)

    async def _execute(self, req: p.Request, payload: bytes | memoryview, exp: NBDExport) -> Reply:
        """Run one request on the export; the reply to send."""
        err = check_request(req, exp, self.structured, self.meta_base_allocation)
        if err:
            return self._error(req, err, "invalid request")
        fua = bool(req.flags & p.CMD_FLAG_FUA)
        try:
            if req.type == p.CMD_READ:
                data = await exp.read(req.offset, req.length) if req.length else b""
                if not self.structured:
                    return (p.pack_simple_reply(req.handle), data)
                if req.length:
                    head = p.pack_offset_data_header(req.handle, req.offset, len(data))
                    return (head, data)
                return (p.pack_chunk(req.handle, p.REPLY_TYPE_NONE),)
            if req.type == p.CMD_WRITE:
                await exp.write(req.offset, payload, fua)
            elif req.type == p.CMD_FLUSH:
                await exp.flush()
            elif req.type == p.CMD_TRIM:
                await exp.discard(req.offset, req.length)
                if fua:
                    await exp.flush()
            elif req.type == p.CMD_WRITE_ZEROES:
                may_unmap = not req.flags & p.CMD_FLAG_NO_HOLE
                await exp.write_zeroes(req.offset, req.length, may_unmap, fua)
            elif req.type == p.CMD_CACHE:
                pass  # advisory; the page cache already holds what was read
            elif req.type == p.CMD_BLOCK_STATUS:
                return await self._block_status(req, exp)
        except BlockError as e:
            return self._error(req, p.errno_to_nbd(e.errno), e.message)
        return (p.pack_simple_reply(req.handle),)

    async def _block_status(self, req: p.Request, exp: NBDExport) -> Reply:
        extents = await exp.block_status(req.offset, req.length) if req.length else []
        # adjacent extents with the same flags are one descriptor on the wire
        descs: list[list[int]] = []
        for e in extents:
            flags = (0 if e.data else p.STATE_HOLE) | (p.STATE_ZERO if e.zero else 0)
            if descs and descs[-1][1] == flags:
                descs[-1][0] += e.length
            else:
                descs.append([e.length, flags])
            if req.flags & p.CMD_FLAG_REQ_ONE:
                break
        if req.flags & p.CMD_FLAG_REQ_ONE:
            descs = descs[:1]
        descs = descs[: 1 << 16]
        return (p.pack_block_status(req.handle, 0, [(n, f) for n, f in descs]),)


def _pread_all(fd: int, nbytes: int, offset: int) -> bytes:
    data = os.pread(fd, nbytes, offset)
    if len(data) < nbytes:  # a file shorter than the export reads as zeroes
        data += bytes(nbytes - len(data))
    return data
