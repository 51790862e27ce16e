"""``human-monitor-command``: the HMP commands replication setups use.

``qemu-io NODE "CMD"`` runs a qemu-io command on a device or node and, unlike
QEMU (which prints to its own stdout), returns the output and any failure in
the reply. ``drive_add -n buddy OPTS`` adds a node; ``drive_del ID`` removes a drive.
"""

from __future__ import annotations

import os
import shlex
import time
from typing import TYPE_CHECKING, Any, Protocol

from ..block.node import Node
from ..block.options import parse_size
from ..errors import BlockError
from .table import CommandTable, args_of

if TYPE_CHECKING:
    from ..block import Graph
    from ..blockdev import Blockdev


class HMPContext(Protocol):
    """What HMP uses: node lookup for qemu-io, drive_add -n and drive_del."""

    graph: Graph
    blockdev: Blockdev


class HMPError(Exception):
    pass


def _num(text: str) -> int:
    try:
        return parse_size(text)
    except Exception:
        raise HMPError(f"non-numeric length argument -- {text}") from None


def _human(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.3f} {unit}"
    return f"{n} bytes"


def _timing(nbytes: int, ops: int, secs: float) -> str:
    secs = max(secs, 1e-9)
    return (
        f"{_human(nbytes)}, {ops} ops; {int(secs // 60):02d}:{secs % 60:05.2f} sec "
        f"({_human(int(nbytes / secs))}/sec and {ops / secs:.4f} ops/sec)"
    )


def _parse_flags(args: list[str], with_value: set[str]) -> tuple[dict[str, str | bool], list[str]]:
    flags: dict[str, str | bool] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and len(a) > 1 and not a[1:].isdigit():
            for j, ch in enumerate(a[1:]):
                if ch in with_value:
                    val = a[2 + j :] or (args[i + 1] if i + 1 < len(args) else "")
                    if not a[2 + j :]:
                        i += 1
                    flags[ch] = val
                    break
                flags[ch] = True
        else:
            rest.append(a)
        i += 1
    return flags, rest


async def qemu_io(node: Node, command: str) -> str:
    """Run one qemu-io command; return what qemu-io would have printed."""
    argv = shlex.split(command)
    if not argv:
        return ""
    cmd, args = argv[0], argv[1:]
    t0 = time.perf_counter()
    try:
        if cmd in ("read", "r"):
            flags, rest = _parse_flags(args, {"P", "s", "l"})
            if len(rest) != 2:
                raise HMPError("read: wrong number of arguments")
            off, n = _num(rest[0]), _num(rest[1])
            data = await node.read(off, n)
            out = ""
            if "P" in flags:
                pat = int(str(flags["P"]), 0) & 0xFF
                if data != bytes([pat]) * n:
                    out += f"Pattern verification failed at offset {off}, {n} bytes\n"
            out += f"read {n}/{n} bytes at offset {off}\n"
            if "q" not in flags:
                out += _timing(n, 1, time.perf_counter() - t0) + "\n"
            return out
        if cmd in ("write", "w"):
            flags, rest = _parse_flags(args, {"P", "s"})
            if len(rest) != 2:
                raise HMPError("write: wrong number of arguments")
            off, n = _num(rest[0]), _num(rest[1])
            fua = bool(flags.get("f") or flags.get("F"))
            if flags.get("z"):
                await node.write_zeroes(off, n, may_unmap=bool(flags.get("u")), fua=fua)
            else:
                pat = int(str(flags.get("P", "0xcd")), 0) & 0xFF
                await node.write(off, bytes([pat]) * n, fua=fua)
            out = f"wrote {n}/{n} bytes at offset {off}\n"
            if "q" not in flags:
                out += _timing(n, 1, time.perf_counter() - t0) + "\n"
            return out
        if cmd in ("writev", "writev"):
            flags, rest = _parse_flags(args, {"P"})
            if len(rest) < 2:
                raise HMPError("writev: wrong number of arguments")
            off = _num(rest[0])
            lens = [_num(x) for x in rest[1:]]
            pat = int(str(flags.get("P", "0xcd")), 0) & 0xFF
            total = sum(lens)
            await node.write(off, bytes([pat]) * total)
            out = f"wrote {total}/{total} bytes at offset {off}\n"
            if "q" not in flags:
                out += _timing(total, 1, time.perf_counter() - t0) + "\n"
            return out
        if cmd in ("discard", "d"):
            flags, rest = _parse_flags(args, set())
            if len(rest) != 2:
                raise HMPError("discard: wrong number of arguments")
            off, n = _num(rest[0]), _num(rest[1])
            await node.discard(off, n)
            out = f"discard {n}/{n} bytes at offset {off}\n"
            if "q" not in flags:
                out += _timing(n, 1, time.perf_counter() - t0) + "\n"
            return out
        if cmd in ("flush", "f"):
            await node.flush()
            return ""
        if cmd == "length":
            return f"{_human(node.length)}\n"
    except BlockError as e:
        # qemu-io's wording: the errno's text
        return f"{cmd} failed: {os.strerror(e.errno)}\n"
    except HMPError as e:
        return f"{e}\n"
    raise HMPError(f'command "{cmd}" not found')


def register(table: CommandTable, ctx: HMPContext) -> None:
    @table.command("human-monitor-command")
    async def human_monitor_command(args: dict[str, Any]) -> Any:
        a = args_of({"command-line": "str", "cpu-index": "int"}, args, ("command-line",))
        return await run_hmp(a["command-line"], ctx)


async def run_hmp(line: str, ctx: HMPContext) -> str:
    """One HMP command line; its output, failures included, is the reply (QEMU's texts)."""
    try:
        argv = shlex.split(line)
    except ValueError as e:
        return f"Error: {e}\r\n"
    if not argv:
        return ""
    cmd = argv[0]
    if cmd == "qemu-io":
        args = argv[1:]
        if args and args[0] == "-d":
            args = args[1:]
        if len(args) != 2:
            return 'Error: qemu-io: usage: qemu-io [-d] [device] "[command]"\r\n'
        try:
            node = ctx.graph.lookup(args[0])
        except BlockError as e:
            return f"Error: {e.message}\r\n"
        try:
            out = await qemu_io(node, args[1])
        except HMPError as e:
            return f"{e}\r\n"
        return out.replace("\n", "\r\n")
    if cmd == "drive_add":
        args = argv[1:]
        if len(args) == 3 and args[0] == "-n":
            try:
                await ctx.blockdev.drive_add_node(args[2])
            except BlockError as e:
                return f"Error: {e.message}\r\n"
            return ""
        return "Error: drive_add without -n is not supported by blockrep (there are no guest buses)\r\n"
    if cmd == "drive_del":
        if len(argv) != 2:
            return "Error: drive_del: usage: drive_del ID\r\n"
        try:
            await ctx.blockdev.drive_del(argv[1])
        except BlockError as e:
            return f"Error: {e.message}\r\n"
        return ""
    return f"Unknown command: '{cmd}'\r\n"
