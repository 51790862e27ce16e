"""The P↔S control channel: JSON lines, requests with ids, optional TLS.

The primary connects and asks (hello, start, checkpoint, heartbeat); the
secondary answers. Each message is one JSON object on one line:
``{"id": 7, "op": "checkpoint", ...}`` → ``{"id": 7, "ok": true, ...}`` or
``{"id": 7, "ok": false, "error": "text"}``. A refusal the primary must act on carries
a ``"code"`` too (``FAILED_OVER``: the secondary failed over and answers no verb of the
old primary's); ``Client.call`` raises it as ``ChannelError.code``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from .. import limits
from ..address import SocketAddress, bind_unix_private
from .auth import HANDSHAKE_TIMEOUT, AuthError, Security

log = logging.getLogger("blockrep.ha.channel")

MAX_LINE = 16 << 20
MAX_IN_FLIGHT = 16  # requests of one connection being answered at once

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


FAILED_OVER = "failed-over"  # the secondary went on alone: it refuses the old primary's verbs


class ChannelError(Exception):
    """A failed call; ``code`` names a refusal the caller acts on (e.g. ``FAILED_OVER``)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class Gate:
    """A listener's door: each connection proves itself (auth.Security) within
    HANDSHAKE_TIMEOUT or is dropped; at most ``max_pending`` may be proving themselves
    at once (a new one pushes out the oldest, so idle strangers cannot lock the peer
    out) and at most ``max_peers`` proven ones are served."""

    def __init__(
        self,
        security: Security,
        on_peer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        max_pending: int = 16,
        max_peers: int = 8,
    ) -> None:
        self.security = security
        self.on_peer = on_peer
        self.max_pending = max_pending
        self.max_peers = max_peers
        self.pending: list[asyncio.StreamWriter] = []
        self.peers = 0
        self.refused = 0  # connections dropped before or at authentication
        self.log = limits.RateLimitedLog(log, interval=10.0)  # strangers cannot flood it

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with limits.connection_slot(limits.Share.DATA) as ok:
            if not ok:
                self.refused += 1
                writer.close()
                return
            await self._admitted(reader, writer)

    async def _admitted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.pending.append(writer)
        if len(self.pending) > self.max_pending:
            self.pending.pop(0).close()  # the oldest stranger makes room
        try:
            await asyncio.wait_for(self.security.accept(reader, writer), HANDSHAKE_TIMEOUT)
        except (AuthError, TimeoutError, ConnectionError, ssl.SSLError, OSError) as e:
            self.refused += 1
            peer = writer.get_extra_info("peername")
            self.log("control channel: refused %s: %s", peer or "a client", _why(e))
            writer.close()
            return
        except asyncio.IncompleteReadError:
            writer.close()
            return
        finally:
            if writer in self.pending:
                self.pending.remove(writer)
        if self.peers >= self.max_peers:
            self.refused += 1
            self.log("control channel: %d peers connected already", self.peers)
            writer.close()
            return
        self.peers += 1
        try:
            await self.on_peer(reader, writer)
        finally:
            self.peers -= 1


def _why(e: BaseException) -> str:
    return "no authentication within the deadline" if isinstance(e, TimeoutError) else str(e)


async def listen(addr: str, gate: Gate) -> asyncio.AbstractServer:
    """Serve the control channel on ``addr`` (a unix socket is made 0600)."""
    tls, _ = gate.security.contexts()
    a = SocketAddress.from_str(addr)
    timeout = HANDSHAKE_TIMEOUT if tls is not None else None
    if a.type == "unix":
        sock = bind_unix_private(a.path)
        return await asyncio.start_unix_server(
            gate, sock=sock, ssl=tls, limit=MAX_LINE, ssl_handshake_timeout=timeout
        )
    return await asyncio.start_server(
        gate,
        a.host,
        int(a.port),
        ssl=tls,
        reuse_address=True,
        limit=MAX_LINE,
        ssl_handshake_timeout=timeout,
    )


async def serve(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handlers: dict[str, Handler],
    on_message: Callable[[], None] | None = None,
) -> None:
    """Answer requests on one connection until it closes. ``on_message`` runs for each
    request a handler answered (an empty or malformed line, an unknown or refused verb
    does not count as hearing from the peer)."""
    lock = asyncio.Lock()

    async def answer(msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        h = handlers.get(str(msg.get("op")))
        try:
            if h is None:
                raise ChannelError(f"unknown operation {msg.get('op')!r}")
            reply = {"id": rid, "ok": True, **await h(msg)}
            if on_message is not None:
                on_message()  # a verb answered: the peer is alive (an empty line is not)
        except Exception as e:  # every failure is an answer, never a dead channel
            reply = {"id": rid, "ok": False, "error": str(getattr(e, "message", e))}
            if isinstance(code := getattr(e, "code", None), str):
                reply["code"] = code
        async with lock:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()

    tasks: set[asyncio.Task] = set()
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)  # the next line is read only when one is free
    try:
        while True:
            await slots.acquire()
            line = await reader.readline()
            if not line:
                return
            try:
                msg = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, or nested past the parser
                msg = None
            if not isinstance(msg, dict):
                slots.release()
                continue
            t = asyncio.create_task(answer(msg))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            t.add_done_callback(lambda _t: slots.release())
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        return
    except ValueError:  # a line over MAX_LINE: no peer sends one; the connection ends
        log.warning("control channel: a line over %d bytes; connection dropped", MAX_LINE)
        return
    finally:
        for t in tasks:
            t.cancel()
        writer.close()


class Client:
    """The primary's end: ``await call(op, **args)`` returns the reply dict."""

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.ids = itertools.count(1)
        self.task: asyncio.Task | None = None
        self.closed = True

    async def connect(self, addr: str, security: Security, timeout: float = 5.0) -> None:
        """Connect and prove this node to the peer (and the peer to it)."""
        _, tls = security.contexts()
        a = SocketAddress.from_str(addr)
        if a.type == "unix":
            # asyncio wants a server name with TLS; the client context does not check it
            coro = asyncio.open_unix_connection(
                a.path,
                ssl=tls,
                limit=MAX_LINE,
                server_hostname="localhost" if tls is not None else None,
            )
        else:
            coro = asyncio.open_connection(a.host, int(a.port), ssl=tls, limit=MAX_LINE)
        reader, writer = await asyncio.wait_for(coro, timeout)
        try:
            await asyncio.wait_for(security.connect(reader, writer), timeout)
        except (AuthError, TimeoutError, ConnectionError, OSError) as e:
            writer.close()
            raise ChannelError(f"control channel: {_why(e)}") from None
        self.reader, self.writer = reader, writer
        self.closed = False
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.reader is not None
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    break
                msg = json.loads(line)
                fut = self.pending.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (
            ConnectionError,
            ValueError,
            RecursionError,
            ssl.SSLError,
            asyncio.IncompleteReadError,
        ):
            pass
        finally:
            self.closed = True
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(ChannelError("control channel closed"))
            self.pending.clear()

    async def call(self, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        if self.closed or self.writer is None:
            raise ChannelError("control channel closed")
        rid = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        try:
            self.writer.write(json.dumps({"id": rid, "op": op, **args}).encode() + b"\n")
            await self.writer.drain()
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:  # first: TimeoutError is an OSError since Python 3.11
            raise ChannelError(f"no answer to '{op}' within {timeout:g} s") from None
        except (ConnectionError, OSError) as e:
            raise ChannelError(f"control channel: {e}") from None
        finally:
            self.pending.pop(rid, None)
        if not reply.get("ok"):
            code = reply.get("code")
            raise ChannelError(
                reply.get("error", "failed"), code if isinstance(code, str) else None
            )
        return reply

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        self.closed = True
