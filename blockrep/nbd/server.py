"""NBD server: fixed newstyle handshake and the transmission phase, over asyncio streams.

One task per client reads requests and starts one task per request, so a client
may have many requests in flight and gets replies out of order; a lock keeps
each reply's bytes together on the wire. A client that breaks the protocol loses
its own connection and nothing else: every length is bounded before anything is
allocated, and data reaches the export only through well-formed writes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from collections.abc import Callable

from ..block.node import Child, Node
from ..errors import BlockError, ProtocolError
from . import proto as p

log = logging.getLogger("blockrep.nbd.server")

MAX_IN_FLIGHT = 64  # per client; more requests wait in the socket buffer
# StreamReader pauses the socket past 2x this; a few full-size writes must fit
STREAM_LIMIT = 16 << 20
BIG_REPLY = 64 << 10  # read replies at least this large are sent without joining
REPLY_HIGH_WATER = 8 << 20  # queued reply bytes before a request waits for the socket


class Export:
    """A node served under a name (QEMU's block export / BlockBackend).

    The export holds its node through a graph edge with no parent node, so it is a
    user of the node (``Graph.has_backend``) and follows it when a filter is
    inserted above it or a commit pivots the graph.
    """

    def __init__(
        self, name: str, node: Node, writable: bool = False, description: str = "", id: str = ""
    ) -> None:
        self.name = name
        self.child = Child(None, f"export:{id or name}", node)
        self.writable = writable
        self.description = description
        self.id = id or name
        self.clients: set = set()
        # quiescing (checkpoints): new requests wait at the gate, in-flight ones finish
        self.gate = asyncio.Event()
        self.gate.set()
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def enter(self) -> None:
        await self.gate.wait()
        self.active += 1
        self.idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle.set()

    async def quiesce(self) -> None:
        """Hold new requests back and wait until none is in flight."""
        self.gate.clear()
        await self.idle.wait()

    def resume(self) -> None:
        self.gate.set()

    @property
    def node(self) -> Node:
        return self.child.node

    def release(self) -> None:
        self.child.detach()

    @property
    def size(self) -> int:
        return self.node.length

    def transmission_flags(self) -> int:
        f = (
            p.TF_HAS_FLAGS
            | p.TF_SEND_FLUSH
            | p.TF_SEND_FUA
            | p.TF_SEND_DF
            | p.TF_SEND_CACHE
            | p.TF_CAN_MULTI_CONN
        )
        if self.writable:
            f |= p.TF_SEND_TRIM | p.TF_SEND_WRITE_ZEROES | p.TF_SEND_FAST_ZERO
        else:
            f |= p.TF_READ_ONLY
        return f


class NBDServer:
    def __init__(
        self,
        exports: dict[str, Export],
        *,
        tls: ssl.SSLContext | None = None,
        authz: Callable[[str], bool] | None = None,
        max_connections: int = 0,
    ) -> None:
        self.exports = exports
        self.tls = tls
        self.authz = authz
        self.max_connections = max_connections
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

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.max_connections and len(self.clients) >= self.max_connections:
            writer.close()
            return
        conn = NBDClientConn(self, reader, writer)
        conn.task = asyncio.current_task()
        self.clients.add(conn)
        try:
            await conn.run()
        except (ConnectionError, asyncio.IncompleteReadError, ProtocolError, ssl.SSLError) as e:
            log.debug("client dropped: %s", e)
        except Exception:  # a bug must cost one connection, never the daemon
            log.exception("NBD client handler failed")
        finally:
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
        for c in clients:
            await c.drain()
            c.writer.close()
        tasks = [c.task for c in clients if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    def drop_export_clients(self, export: Export) -> None:
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
        self.export: Export | None = None
        self.tls_done = False
        self.wlock = asyncio.Lock()
        self.outq: list[bytes] = []
        self.out_scheduled = False
        self.tasks: set[asyncio.Task] = set()
        self.task: asyncio.Task | None = None
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def _read(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    async def _send(self, data: bytes) -> None:
        async with self.wlock:
            self.writer.write(data)
            await self.writer.drain()

    async def _send_two(self, head: bytes, body: bytes) -> None:
        """A header and a body; a large body is written without joining (no copy)."""
        if len(body) < BIG_REPLY:
            await self._reply(head, body)
            return
        async with self.wlock:
            self._flush_replies()
            self.writer.write(head)
            self.writer.write(body)
            await self.writer.drain()

    async def _reply(self, *parts: bytes) -> None:
        """Queue a transmission-phase reply; all replies made in one turn of the
        event loop leave in one send (one syscall for many 4 KiB replies)."""
        self.outq.extend(parts)
        if not self.out_scheduled:
            self.out_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_replies)
        if self.writer.transport.get_write_buffer_size() > REPLY_HIGH_WATER:
            async with self.wlock:
                await self.writer.drain()

    def _flush_replies(self) -> None:
        self.out_scheduled = False
        if self.outq:
            if not self.writer.is_closing():
                self.writer.write(b"".join(self.outq))
            self.outq.clear()

    # -- handshake ---------------------------------------------------------------

    async def run(self) -> None:
        self.writer.write(
            p.HEADER.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)
        )
        await self.writer.drain()
        (cflags,) = struct.unpack(">I", await self._read(4))
        if cflags & ~(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES):
            raise ProtocolError(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & p.FLAG_C_NO_ZEROES)
        export = await self.negotiate()
        if export is None:
            return
        self.export = export
        export.clients.add(self)
        await self.transmission()

    async def _opt_reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        await self._send(p.pack_option_reply(opt, rep, data))

    async def _opt_error(self, opt: int, rep: int, msg: str) -> None:
        await self._opt_reply(opt, rep, msg.encode()[: p.MAX_STRING])

    async def negotiate(self) -> Export | None:
        tls_required = self.server.tls is not None
        while True:
            magic, opt, length = p.OPTION.unpack(await self._read(p.OPTION.size))
            if magic != p.IHAVEOPT:
                raise ProtocolError("bad option magic")
            if length > p.MAX_OPTION_LEN:
                raise ProtocolError(f"option length {length} too large")
            data = await self._read(length)
            if tls_required and not self.tls_done and opt not in (p.OPT_STARTTLS, p.OPT_ABORT):
                if opt == p.OPT_EXPORT_NAME:
                    raise ProtocolError("EXPORT_NAME before STARTTLS")
                await self._opt_error(
                    opt, p.REP_ERR_TLS_REQD, "Option 0x%x not permitted before TLS" % opt
                )
                continue
            try:
                result = await self._option(opt, data)
            except p.ParseError as e:
                await self._opt_error(opt, p.REP_ERR_INVALID, str(e))
                continue
            if result is False:
                return None
            if isinstance(result, Export):
                return result

    def _lookup(self, name: str) -> Export | None:
        if name == "" and len(self.server.exports) == 1:
            return next(iter(self.server.exports.values()))
        return self.server.exports.get(name)

    async def _option(self, opt: int, data: bytes) -> Export | bool | None:
        if opt == p.OPT_ABORT:
            await self._opt_reply(opt, p.REP_ACK)
            return False
        if opt == p.OPT_EXPORT_NAME:
            exp = self._lookup(data.decode(errors="replace"))
            if exp is None:
                raise ProtocolError("unknown export in EXPORT_NAME")
            reply = struct.pack(">QH", exp.size, exp.transmission_flags())
            if not self.no_zeroes:
                reply += bytes(124)
            await self._send(reply)
            return exp
        if opt == p.OPT_LIST:
            if data:
                await self._opt_error(opt, p.REP_ERR_INVALID, "NBD_OPT_LIST must have no payload")
                return None
            for exp in self.server.exports.values():
                desc = exp.description.encode()
                await self._opt_reply(opt, p.REP_SERVER, p.pack_name_list(exp.name) + desc)
            await self._opt_reply(opt, p.REP_ACK)
            return None
        if opt == p.OPT_STARTTLS:
            if data:
                await self._opt_error(
                    opt, p.REP_ERR_INVALID, "NBD_OPT_STARTTLS must have no payload"
                )
                return None
            if self.server.tls is None:
                await self._opt_error(opt, p.REP_ERR_POLICY, "TLS not configured")
                return None
            if self.tls_done:
                await self._opt_error(opt, p.REP_ERR_INVALID, "TLS already negotiated")
                return None
            await self._opt_reply(opt, p.REP_ACK)
            await self.writer.start_tls(self.server.tls)
            self.tls_done = True
            if self.server.authz is not None and not self.server.authz(self._peer_dn()):
                raise ProtocolError("client certificate not authorized")
            return None
        if opt == p.OPT_STRUCTURED_REPLY:
            if data:
                await self._opt_error(
                    opt, p.REP_ERR_INVALID, "structured reply option must have no payload"
                )
                return None
            self.structured = True
            await self._opt_reply(opt, p.REP_ACK)
            return None
        if opt in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            name, queries = p.parse_meta_request(data)
            if not self.structured:
                await self._opt_error(opt, p.REP_ERR_INVALID, "structured replies not negotiated")
                return None
            if self._lookup(name) is None:
                await self._opt_error(opt, p.REP_ERR_UNKNOWN, f"export '{name}' not present")
                return None
            wanted = False
            if opt == p.OPT_LIST_META_CONTEXT and not queries:
                wanted = True
            for q in queries:
                if q == p.META_BASE_ALLOCATION or (opt == p.OPT_LIST_META_CONTEXT and q == "base:"):
                    wanted = True
            if opt == p.OPT_SET_META_CONTEXT:
                self.meta_base_allocation = wanted
            if wanted:
                await self._opt_reply(
                    opt, p.REP_META_CONTEXT, struct.pack(">I", 0) + p.META_BASE_ALLOCATION.encode()
                )
            await self._opt_reply(opt, p.REP_ACK)
            return None
        if opt in (p.OPT_INFO, p.OPT_GO):
            name, infos = p.parse_info_request(data)
            exp = self._lookup(name)
            if exp is None:
                await self._opt_error(opt, p.REP_ERR_UNKNOWN, f"export '{name}' not present")
                return None
            await self._opt_reply(
                opt, p.REP_INFO, p.pack_info_export(exp.size, exp.transmission_flags())
            )
            if p.INFO_NAME in infos:
                await self._opt_reply(
                    opt, p.REP_INFO, struct.pack(">H", p.INFO_NAME) + exp.name.encode()
                )
            if p.INFO_DESCRIPTION in infos and exp.description:
                await self._opt_reply(
                    opt,
                    p.REP_INFO,
                    struct.pack(">H", p.INFO_DESCRIPTION) + exp.description.encode(),
                )
            await self._opt_reply(opt, p.REP_INFO, p.pack_info_block_size(1, 4096, p.MAX_BUFFER))
            await self._opt_reply(opt, p.REP_ACK)
            return exp if opt == p.OPT_GO else None
        await self._opt_error(opt, p.REP_ERR_UNSUP, "Unsupported option %d" % opt)
        return None

    def _peer_dn(self) -> str:
        ssl_obj = self.writer.get_extra_info("ssl_object")
        cert = ssl_obj.getpeercert() if ssl_obj is not None else None
        if not cert:
            return ""
        # QEMU's format: gnutls_x509_crt_get_dn(), i.e. the RDNs in the certificate's own
        # order (not RFC 4514's reversed one), e.g. "C=GB,O=Example Org,CN=laptop": an
        # authz-simple identity that works with qemu-nbd must work here too.
        names = {
            "countryName": "C",
            "stateOrProvinceName": "ST",
            "localityName": "L",
            "organizationName": "O",
            "organizationalUnitName": "OU",
            "commonName": "CN",
            "domainComponent": "DC",
            "emailAddress": "EMAIL",
            "streetAddress": "STREET",
            "userId": "UID",
        }

        def esc(v: str) -> str:
            v = "".join("\\" + c if c in ',+"\\<>;' else c for c in v)
            if v.startswith(("#", " ")):
                v = "\\" + v
            if v.endswith(" ") and len(v) > 1:
                v = v[:-1] + "\\ "
            return v

        rdns = [
            "+".join(f"{names.get(k, k)}={esc(v)}" for k, v in rdn)
            for rdn in cert.get("subject", ())
        ]
        return ",".join(rdns)

    # -- transmission ------------------------------------------------------------

    async def transmission(self) -> None:
        exp = self.export
        assert exp is not None
        if self.writer.get_extra_info("ssl_object") is None:
            await self._transmission_fast()
            return
        while True:
            hdr = await self._read(p.REQUEST.size)
            try:
                req = p.parse_request(hdr)
            except ValueError as e:
                raise ProtocolError(str(e)) from None
            if req.type == p.CMD_DISC:
                await self.drain()
                return
            payload = b""
            if req.type == p.CMD_WRITE:
                if req.length > p.MAX_BUFFER:
                    # the payload cannot be skipped safely: drop the connection
                    raise ProtocolError(f"write of {req.length} bytes exceeds {p.MAX_BUFFER}")
                payload = await self._read(req.length)
            await self.slots.acquire()
            t = asyncio.create_task(self._handle(req, payload))
            self.tasks.add(t)
            t.add_done_callback(self._done)

    async def _transmission_fast(self) -> None:
        """The transmission phase with a buffered protocol (plain sockets).

        Requests are parsed out of one staging buffer, and large write payloads
        are received straight into their own buffer, so a 1 MiB write is copied
        once (kernel to buffer) instead of three times through a StreamReader.
        """
        transport = self.writer.transport
        old = transport.get_protocol()
        leftover = bytes(self.reader._buffer)  # what the handshake reader already received
        self.reader._buffer.clear()
        proto = _RequestReader(self, old)
        transport.set_protocol(proto)
        proto.feed(leftover)
        await proto.closed

    def _dispatch(
        self, req: p.Request, payload: bytes, recycle: Callable[[], None] | None = None
    ) -> bool:
        """Start one request; False when the connection is to end (DISC).

        ``recycle`` gives the payload's buffer back once the request is done:
        every layer has finished with the data when a write completes.
        """
        if req.type == p.CMD_DISC:
            return False
        t = asyncio.create_task(self._handle(req, payload))
        self.tasks.add(t)
        t.add_done_callback(self._done_fast)
        if recycle is not None:
            t.add_done_callback(lambda _t: recycle())
        return True

    def _done_fast(self, t: asyncio.Task) -> None:
        self.tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.debug("request failed: %r", t.exception())
            self.writer.close()
        reader = getattr(self, "fast_reader", None)
        if reader is not None:
            reader.request_done()

    def _done(self, t: asyncio.Task) -> None:
        self.tasks.discard(t)
        self.slots.release()
        if not t.cancelled() and t.exception() is not None:
            log.debug("request failed: %r", t.exception())
            self.writer.close()

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.wait(list(self.tasks))

    def _check(self, req: p.Request) -> int:
        """Validate a request before it reaches the node; 0 or an NBD errno."""
        exp = self.export
        assert exp is not None
        allowed = {
            p.CMD_READ: p.CMD_FLAG_DF,
            p.CMD_WRITE: p.CMD_FLAG_FUA,
            p.CMD_FLUSH: 0,
            p.CMD_TRIM: p.CMD_FLAG_FUA,
            p.CMD_CACHE: 0,
            p.CMD_WRITE_ZEROES: p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FAST_ZERO,
            p.CMD_BLOCK_STATUS: p.CMD_FLAG_REQ_ONE,
        }
        if req.type not in allowed:
            return p.NBD_EINVAL
        if req.flags & ~allowed[req.type]:
            return p.NBD_EINVAL
        if req.flags & p.CMD_FLAG_DF and not self.structured:
            return p.NBD_EINVAL
        if req.type == p.CMD_BLOCK_STATUS and not self.meta_base_allocation:
            return p.NBD_EINVAL
        if req.type in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES) and not exp.writable:
            return p.NBD_EPERM
        if req.type == p.CMD_FLUSH:
            return 0
        if req.type == p.CMD_READ and req.length > p.MAX_BUFFER:
            return p.NBD_EINVAL
        if req.offset > exp.size or req.length > exp.size - req.offset:
            return p.NBD_ENOSPC if req.type in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.NBD_EINVAL
        return 0

    async def _error(self, req: p.Request, err: int, msg: str = "") -> None:
        if self.structured and (req.type in (p.CMD_READ, p.CMD_BLOCK_STATUS)):
            await self._reply(p.pack_error_chunk(req.handle, err, msg))
        else:
            await self._reply(p.pack_simple_reply(req.handle, err))

    async def _handle(self, req: p.Request, payload: bytes) -> None:
        exp = self.export
        assert exp is not None
        await exp.enter()
        try:
            await self._handle_admitted(req, payload)
        finally:
            exp.leave()

    async def _handle_admitted(self, req: p.Request, payload: bytes) -> None:
        err = self._check(req)
        if err:
            await self._error(req, err, "invalid request")
            return
        node = self.export.node  # type: ignore[union-attr]
        fua = bool(req.flags & p.CMD_FLAG_FUA)
        try:
            if req.type == p.CMD_READ:
                data = await node.read(req.offset, req.length) if req.length else b""
                if self.structured:
                    if req.length:
                        hdr = p.CHUNK.pack(
                            p.STRUCTURED_REPLY_MAGIC,
                            p.REPLY_FLAG_DONE,
                            p.REPLY_TYPE_OFFSET_DATA,
                            req.handle,
                            8 + len(data),
                        )
                        await self._send_two(hdr + struct.pack(">Q", req.offset), data)
                    else:
                        await self._reply(p.pack_chunk(req.handle, p.REPLY_TYPE_NONE))
                else:
                    await self._send_two(p.pack_simple_reply(req.handle), data)
                return
            if req.type == p.CMD_WRITE:
                await node.write(req.offset, payload, fua=fua)
            elif req.type == p.CMD_FLUSH:
                await node.flush()
            elif req.type == p.CMD_TRIM:
                await node.discard(req.offset, req.length)
                if fua:
                    await node.flush()
            elif req.type == p.CMD_WRITE_ZEROES:
                await node.write_zeroes(
                    req.offset, req.length, may_unmap=not req.flags & p.CMD_FLAG_NO_HOLE, fua=fua
                )
            elif req.type == p.CMD_CACHE:
                pass  # advisory; the page cache already holds what was read
            elif req.type == p.CMD_BLOCK_STATUS:
                await self._block_status(req)
                return
        except BlockError as e:
            await self._error(req, p.errno_to_nbd(e.errno), e.message)
            return
        await self._reply(p.pack_simple_reply(req.handle))

    async def _block_status(self, req: p.Request) -> None:
        node = self.export.node  # type: ignore[union-attr]
        length = req.length
        extents = await node.block_status(req.offset, length) if length else []
        descs = []
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
        payload = struct.pack(">I", 0) + b"".join(struct.pack(">II", ln, fl) for ln, fl in descs)
        await self._reply(p.pack_chunk(req.handle, p.REPLY_TYPE_BLOCK_STATUS, payload))


class _RequestReader(asyncio.BufferedProtocol):
    """Parses NBD requests for one connection (see NBDClientConn._transmission_fast).

    Flow control: with MAX_IN_FLIGHT requests running, reading pauses until one
    finishes. Write-side flow control and connection loss are passed on to the
    stream protocol the handshake used, which the StreamWriter still relies on.
    """

    STAGING = 256 << 10
    BIG = 64 << 10  # payloads larger than this get their own buffer

    def __init__(self, conn: NBDClientConn, old: asyncio.BaseProtocol) -> None:
        self.conn = conn
        self.old = old
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
        conn.fast_reader = self

    def _finish(self) -> None:
        self.done = True
        if not self.closed.done():
            self.closed.set_result(None)

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view) and not self.done:
            mv = self.get_buffer(len(view))
            n = min(len(mv), len(view))
            mv[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

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
        if self.big is not None:
            self.big_got += nbytes
            if self.big_got == len(self.big):
                req, payload = self.big_req, self.big
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

                self._deliver(req, view, recycle)  # type: ignore[arg-type]
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
            payload: bytes | bytearray = b""
            if req.type == p.CMD_WRITE:
                if req.length > p.MAX_BUFFER:
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
        self, req: p.Request, payload: bytes | bytearray, recycle: Callable[[], None] | None = None
    ) -> None:
        if not self.conn._dispatch(req, payload, recycle):  # type: ignore[arg-type]
            # DISC: finish what is in flight, then close
            self.done = True
            asyncio.ensure_future(self._disconnect())
            return
        self.in_flight += 1
        if self.in_flight >= MAX_IN_FLIGHT and not self.paused:
            self.paused = True
            self.conn.writer.transport.pause_reading()

    def request_done(self) -> None:
        self.in_flight -= 1
        if self.paused and self.in_flight < MAX_IN_FLIGHT // 2:
            self.paused = False
            if not self.conn.writer.transport.is_closing():
                self.conn.writer.transport.resume_reading()

    async def _disconnect(self) -> None:
        await self.conn.drain()
        self._finish()

    def _close(self) -> None:
        self.done = True
        self.conn.writer.close()
        self._finish()

    def eof_received(self) -> bool:
        self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.old.connection_lost(exc)
        self._finish()

    def pause_writing(self) -> None:
        self.old.pause_writing()

    def resume_writing(self) -> None:
        self.old.resume_writing()
