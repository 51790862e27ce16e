"""QMP wire protocol, server side (QEMU docs/interop/qmp-spec).

Greeting, capabilities negotiation, ``execute`` with ``id`` echoed, errors with
QEMU's classes and texts, and asynchronous events with timestamps, for any
number of clients on unix and TCP sockets. Input is a stream of JSON objects
with no framing, so a parser pulls whole objects out of a buffer; a malformed
one is answered with an error and the connection stays up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

from .. import __version__
from ..errors import BlockrepError
from .table import CommandTable

log = logging.getLogger("blockrep.qmp")

MAX_INPUT = 16 << 20  # a client that sends more than this without a complete object is dropped


def event_message(name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    now = time.time()
    msg: dict[str, Any] = {"event": name}
    if data is not None:
        msg["data"] = data
    msg["timestamp"] = {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}
    return msg


class QMPServer:
    def __init__(self, commands: CommandTable) -> None:
        self.commands = commands
        self.sessions: set[QMPSession] = set()
        self.servers: list[asyncio.AbstractServer] = []

    async def listen_unix(self, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)
        old = os.umask(0o177)  # the socket is created mode 0600
        try:
            srv = await asyncio.start_unix_server(self._accept, path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.servers.append(srv)

    async def listen_tcp(self, host: str, port: int) -> None:
        self.servers.append(
            await asyncio.start_server(self._accept, host, port, reuse_address=True)
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = QMPSession(self, reader, writer)
        session.task = asyncio.current_task()
        self.sessions.add(session)
        try:
            await session.run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("QMP session failed")
        finally:
            self.sessions.discard(session)
            writer.close()

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        msg = event_message(name, data)
        for s in list(self.sessions):
            if s.negotiated:
                s.send_nowait(msg)

    async def close(self) -> None:
        for srv in self.servers:
            srv.close()
        sessions = list(self.sessions)
        for s in sessions:
            s.writer.close()
        # let each session see its end and return, so nothing is left to cancel
        tasks = [
            s.task for s in sessions if s.task is not None and s.task is not asyncio.current_task()
        ]
        if tasks:
            await asyncio.wait(tasks, timeout=5)


class QMPSession:
    def __init__(
        self, server: QMPServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        # an integer too long for Python's int() (4,300 digits) is read as a number, as
        # QEMU reads any integer that does not fit its int64 (a double)
        self.decoder = json.JSONDecoder(parse_int=_parse_int)
        self.task: asyncio.Task | None = None

    def send_nowait(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(msg).encode() + b"\r\n")

    async def send(self, msg: dict[str, Any]) -> None:
        self.send_nowait(msg)
        await self.writer.drain()

    async def run(self) -> None:
        major, minor, micro = 7, 2, 0
        await self.send(
            {
                "QMP": {
                    "version": {
                        "qemu": {"micro": micro, "minor": minor, "major": major},
                        "package": f"blockrep {__version__}",
                    },
                    "capabilities": [],
                }
            }
        )
        buf = ""
        skipping = False  # after an error, the rest of its line is dropped (it may be long)
        while True:
            chunk = await self.reader.read(65536)
            if not chunk:
                return
            buf += chunk.decode(errors="replace")
            if skipping:
                nl = buf.find("\n")
                buf, skipping = ("", True) if nl < 0 else (buf[nl + 1 :], False)
            if len(buf) > MAX_INPUT:
                return
            while True:
                stripped = buf.lstrip()
                if not stripped:
                    buf = ""
                    break
                try:
                    obj, end = self.decoder.raw_decode(stripped)
                except (json.JSONDecodeError, RecursionError) as e:
                    if isinstance(e, RecursionError):
                        # QEMU's parser limit (json-streamer.c MAX_NESTING), same words
                        await self.send(_error("JSON nesting depth limit exceeded"))
                    elif e.pos >= len(stripped) - 1 and _incomplete(stripped):
                        buf = stripped
                        break  # wait for the rest of the object
                    else:
                        await self.send(_error(f"JSON parse error, {e.msg}"))
                    # resynchronise at the next line, as QEMU's lexer resets on errors
                    nl = stripped.find("\n")
                    buf, skipping = ("", True) if nl < 0 else (stripped[nl + 1 :], False)
                    continue
                buf = stripped[end:]
                await self.dispatch(obj)

    async def dispatch(self, req: Any) -> None:
        if not isinstance(req, dict):
            await self.send(_error("QMP input must be a JSON object"))
            return
        rid = req.get("id")
        reply_extra = {"id": rid} if "id" in req else {}
        for key in req:
            if key not in ("execute", "exec-oob", "arguments", "id"):
                await self.send(
                    {**_error(f"QMP input member '{key}' is unexpected"), **reply_extra}
                )
                return
        cmd = req.get("execute")
        if cmd is None:
            await self.send({**_error("QMP input lacks member 'execute'"), **reply_extra})
            return
        if not isinstance(cmd, str):
            await self.send(
                {**_error("QMP input member 'execute' must be a string"), **reply_extra}
            )
            return
        args = req.get("arguments", {})
        if not isinstance(args, dict):
            await self.send(
                {**_error("QMP input member 'arguments' must be an object"), **reply_extra}
            )
            return
        if not self.negotiated:
            if cmd != "qmp_capabilities":
                await self.send(
                    {
                        **_error(
                            "Expecting capabilities negotiation with 'qmp_capabilities'",
                            "CommandNotFound",
                        ),
                        **reply_extra,
                    }
                )
                return
            enable = args.get("enable", [])
            if enable:
                await self.send(
                    {**_error(f"Capability '{enable[0]}' not available"), **reply_extra}
                )
                return
            self.negotiated = True
            await self.send({"return": {}, **reply_extra})
            return
        if cmd == "qmp_capabilities":
            await self.send(
                {
                    **_error(
                        "Capabilities negotiation is already complete, command ignored",
                        "CommandNotFound",
                    ),
                    **reply_extra,
                }
            )
            return
        handler = self.server.commands.get(cmd)
        if handler is None:
            await self.send(
                {
                    **_error(f"The command {cmd} has not been found", "CommandNotFound"),
                    **reply_extra,
                }
            )
            return
        try:
            result = await handler(args)
        except BlockrepError as e:
            # the one place where blockrep's errors become QMP errors
            await self.send({**_error(e.message, e.qmp_class), **reply_extra})
            return
        except Exception as e:  # a bug in one command must not end the session
            log.exception("command %s failed", cmd)
            await self.send({**_error(f"Internal error: {e}"), **reply_extra})
            return
        await self.send({"return": {} if result is None else result, **reply_extra})


def _parse_int(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _error(desc: str, cls: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


def _incomplete(text: str) -> bool:
    """Could more input complete this JSON text? (unbalanced braces or an open string)"""
    depth = 0
    in_str = False
    esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                return False
    return depth > 0 or in_str
