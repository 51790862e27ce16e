"""The control channel under hostile input (issue 12, Why 6, first part): a line nested
past the JSON parser or an over-long number is dropped; the connection keeps answering
the next request (it used to die with a traceback)."""

from __future__ import annotations

import asyncio
import json

from blockrep.ha import channel
from blockrep.ha.auth import Method, Security

OPEN = Security(Method.INSECURE)  # a unix socket: no authentication on top


async def test_deep_and_huge_lines_are_dropped_and_the_channel_answers(tmp_path) -> None:
    path = str(tmp_path / "c.sock")

    async def ping(msg: dict) -> dict:
        return {"pong": msg.get("n")}

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await channel.serve(r, w, {"ping": ping})

    server = await channel.listen(f"unix:{path}", channel.Gate(OPEN, on_conn))
    try:
        reader, writer = await asyncio.open_unix_connection(path, limit=channel.MAX_LINE)
        assert json.loads(await reader.readline())["auth"] == "insecure"  # the greeting
        writer.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
        writer.write(b'{"id": 1, "op": "ping", "n": ' + b"7" * 5000 + b"}\n")
        writer.write(b'{"id": 2, "op": "ping", "n": 3}\n')
        await writer.drain()
        reply = json.loads(await asyncio.wait_for(reader.readline(), 10))
        assert reply == {"id": 2, "ok": True, "pong": 3}, reply
        writer.close()
    finally:
        server.close()


async def test_only_answered_verbs_count_as_hearing_from_the_peer(tmp_path) -> None:
    """Issue 12, Why 2 in part: any line, even an empty one, counted as hearing from P,
    so a stranger's newlines kept a dead primary alive for the failover watchdog."""
    path = str(tmp_path / "c.sock")
    heard: list[int] = []

    async def ping(msg: dict) -> dict:
        return {}

    async def refuse(msg: dict) -> dict:
        raise channel.ChannelError("no")

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await channel.serve(r, w, {"ping": ping, "refuse": refuse}, lambda: heard.append(1))

    server = await channel.listen(f"unix:{path}", channel.Gate(OPEN, on_conn))
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        assert json.loads(await reader.readline())["auth"] == "insecure"  # the greeting
        writer.write(b"\n\n  \nnot json\n[1]\n")
        writer.write(b'{"id": 1, "op": "nosuch"}\n{"id": 2, "op": "refuse"}\n')
        await writer.drain()
        for _ in range(2):
            assert json.loads(await asyncio.wait_for(reader.readline(), 10))["ok"] is False
        assert heard == []
        writer.write(b'{"id": 3, "op": "ping"}\n')
        await writer.drain()
        assert json.loads(await asyncio.wait_for(reader.readline(), 10))["ok"] is True
        assert heard == [1]
        writer.close()
    finally:
        server.close()
