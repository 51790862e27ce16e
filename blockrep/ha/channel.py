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
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from ..address import SocketAddress
from ..tls import X509Credentials

MAX_LINE = 16 << 20

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


FAILED_OVER = "failed-over"  # the secondary went on alone: it refuses the old primary's verbs


class ChannelError(Exception):
    """A failed call; ``code`` names a refusal the caller acts on (e.g. ``FAILED_OVER``)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def tls_contexts(tls_dir: str | None) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server, client) contexts from a directory in QEMU's x509 layout; both ends of
    the channel prove who they are, so the client certificate is required."""
    if not tls_dir:
        return None, None
    creds = X509Credentials(tls_dir)
    return creds.server_context(), creds.client_context(require_cert=True)


async def listen(
    addr: str,
    on_conn: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    tls: ssl.SSLContext | None = None,
) -> asyncio.AbstractServer:
    a = SocketAddress.from_str(addr)
    if a.type == "unix":
        if os.path.exists(a.path):
            os.unlink(a.path)
        return await asyncio.start_unix_server(on_conn, a.path, ssl=tls, limit=MAX_LINE)
    return await asyncio.start_server(
        on_conn, a.host, int(a.port), ssl=tls, reuse_address=True, limit=MAX_LINE
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
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            try:
                msg = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, or nested past the parser
                continue
            if not isinstance(msg, dict):
                continue
            t = asyncio.create_task(answer(msg))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
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

    async def connect(
        self, addr: str, tls: ssl.SSLContext | None = None, timeout: float = 5.0
    ) -> None:
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
        self.reader, self.writer = await asyncio.wait_for(coro, timeout)
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
