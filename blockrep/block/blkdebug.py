"""The ``blkdebug`` filter: inject I/O errors into any node, QEMU's way and at runtime.

Rules are QEMU's ``inject-error`` list: ``event`` names the kind of request that
fails (``read_aio`` reads, ``write_aio`` writes and write-zeroes, ``pwrite_zeroes``,
``discard``/``pdiscard``, ``flush_to_disk``/``flush_to_os`` flushes, ``none`` all),
``errno`` the error (default EIO), ``sector`` restricts it to requests touching
that 512-byte sector, ``once`` removes the rule after it fired, ``state`` makes it
apply only in that state of the ``set-state`` machine. Rules can be replaced at
runtime with the QMP command ``x-blkdebug-set-rules`` (no QEMU equivalent), so a
test can make a disk fail at an exact moment.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from ..errors import BlockError, OptionError
from .graph import Graph, register
from .node import Extent, Node
from .options import check

EVENT_KINDS = {
    "read_aio": {"read"},
    "preadv": {"read"},
    "write_aio": {"write", "write_zeroes"},
    "pwritev": {"write", "write_zeroes"},
    "pwrite_zeroes": {"write_zeroes"},
    "discard": {"discard"},
    "pdiscard": {"discard"},
    "flush_to_disk": {"flush"},
    "flush_to_os": {"flush"},
    "none": {"read", "write", "write_zeroes", "discard", "flush"},
}
# QEMU's BlkdebugEvent enum: every name is accepted; the ones blockrep does not
# map to a request kind above are valid but never fire (their rules stay idle)
QEMU_EVENTS = (
    "l1_update l1_grow_alloc_table l1_grow_write_table l1_grow_activate_table l2_load l2_update "
    "l2_update_compressed l2_alloc_cow_read l2_alloc_write read_aio read_backing_aio read_compressed "
    "write_aio write_compressed vmstate_load vmstate_save cow_read cow_write reftable_load reftable_grow "
    "reftable_update refblock_load refblock_update refblock_update_part refblock_alloc "
    "refblock_alloc_hookup refblock_alloc_write refblock_alloc_write_blocks refblock_alloc_write_table "
    "refblock_alloc_switch_table cluster_alloc cluster_alloc_bytes cluster_free flush_to_os flush_to_disk "
    "pwritev_rmw_head pwritev_rmw_after_head pwritev_rmw_tail pwritev_rmw_after_tail pwritev pwritev_zero "
    "pwritev_done empty_image_prepare l1_shrink_write_table l1_shrink_free_l2_clusters cor_write "
    "cluster_alloc_space none"
).split()


def _event_kinds(ev: str) -> set[str]:
    if ev in EVENT_KINDS:
        return set(EVENT_KINDS[ev])
    if ev in QEMU_EVENTS:
        return set()
    raise OptionError(f"Parameter 'event' does not accept value '{ev}'")


IOTYPES = {
    "read": "read",
    "write": "write",
    "write-zeroes": "write_zeroes",
    "discard": "discard",
    "flush": "flush",
}

RULE_SCHEMA = {
    "event": "str",
    "state": "int",
    "iotype": "str",
    "errno": "int",
    "sector": "int",
    "once": "bool",
    "immediately": "bool",
}
STATE_SCHEMA = {"event": "str", "state": "int", "new_state": "int"}


@dataclass
class Rule:
    kinds: set[str]
    err: int = errno.EIO
    sector: int = -1
    once: bool = False
    state: int = 0

    def matches(self, kind: str, offset: int, nbytes: int, state: int) -> bool:
        if kind not in self.kinds:
            return False
        if self.state and self.state != state:
            return False
        if self.sector >= 0:
            s = self.sector * 512
            if not (offset <= s < offset + max(nbytes, 1)):
                return False
        return True


def parse_rules(items: list[dict[str, Any]], typed: bool) -> list[Rule]:
    rules = []
    for i, item in enumerate(items):
        r = check(RULE_SCHEMA, item, typed=typed, path=f"inject-error[{i}]", required=("event",))
        ev = r["event"]
        kinds = _event_kinds(ev)
        if "iotype" in r:
            if r["iotype"] not in IOTYPES:
                raise OptionError(f"Parameter 'iotype' does not accept value '{r['iotype']}'")
            kinds &= {IOTYPES[r["iotype"]]} if ev != "none" else {IOTYPES[r["iotype"]]}
            if ev == "none":
                kinds = {IOTYPES[r["iotype"]]}
        rules.append(
            Rule(
                kinds,
                r.get("errno", errno.EIO),
                r.get("sector", -1),
                r.get("once", False),
                r.get("state", 0),
            )
        )
    return rules


@register
class BlkdebugNode(Node):
    driver_name = "blkdebug"
    is_filter = True
    schema = {
        "image": "ref",
        "file": "ref",
        "config": "str",
        "align": "int",
        "max-transfer": "int",
        "opt-write-zero": "int",
        "max-write-zero": "int",
        "opt-discard": "int",
        "max-discard": "int",
        "inject-error": ("list", "any"),
        "set-state": ("list", "any"),
        "take-child-perms": "any",
        "unshare-child-perms": "any",
    }

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        super().__init__(node_name, options)
        self.rules: list[Rule] = []
        self.transitions: list[tuple[set[str], int, int]] = []
        self.state = 1

    @classmethod
    async def open(cls, graph: Graph, name: str, opts: dict[str, Any], typed: bool) -> BlkdebugNode:
        if opts.get("config"):
            raise OptionError(
                "blkdebug config files are not supported by blockrep; use inject-error"
            )
        node = cls(name, opts)
        # rules first, as QEMU does: a bad rule must not leave the image opened
        node.rules = parse_rules(opts.get("inject-error", []), typed)
        for i, item in enumerate(opts.get("set-state", [])):
            s = check(
                STATE_SCHEMA,
                item,
                typed=typed,
                path=f"set-state[{i}]",
                required=("event", "new_state"),
            )
            node.transitions.append((_event_kinds(s["event"]), s.get("state", 0), s["new_state"]))
        role = "image" if "image" in opts else "file"
        child = await graph.open_child(opts, role, typed=typed, default_driver="file")
        assert child is not None
        node.attach_child("file", child)
        node.length = child.length
        node.read_only = node.read_only or child.read_only
        align = opts.get("align")
        if align:
            node.request_alignment = align
        return node

    def set_rules(self, rules: list[Rule]) -> None:
        self.rules = rules

    def _maybe_fail(self, kind: str, offset: int, nbytes: int) -> None:
        for kinds, state, new in self.transitions:
            if kind in kinds and (not state or state == self.state):
                self.state = new
                break
        for r in self.rules:
            if r.matches(kind, offset, nbytes, self.state):
                if r.once:
                    self.rules.remove(r)
                raise BlockError(r.err)  # strerror, as QEMU reports it

    async def _co_read(self, offset: int, nbytes: int) -> bytes:
        self._maybe_fail("read", offset, nbytes)
        return await self._pass().read(offset, nbytes)

    async def _co_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        self._maybe_fail("write", offset, len(data))
        await self._pass().write(offset, data, fua)

    async def _co_write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> None:
        self._maybe_fail("write_zeroes", offset, nbytes)
        await self._pass().write_zeroes(offset, nbytes, may_unmap, fua)

    async def _co_discard(self, offset: int, nbytes: int) -> None:
        self._maybe_fail("discard", offset, nbytes)
        await self._pass().discard(offset, nbytes)

    async def _co_flush(self) -> None:
        self._maybe_fail("flush", 0, 0)
        await self._pass().flush()

    async def _co_block_status(self, offset: int, nbytes: int) -> list[Extent]:
        return await self._pass().block_status(offset, nbytes)

    async def _co_make_empty(self) -> None:
        raise BlockError(errno.ENOTSUP, "blkdebug does not support make_empty")

    async def truncate(self, size: int) -> None:
        f = self._pass()
        await f.truncate(size)  # type: ignore[attr-defined]
        self.length = size

    # A filter under a format: its size is its child's, which the format may grow.
    @property
    def length(self) -> int:
        f = self.file
        return f.length if f is not None else self._length

    @length.setter
    def length(self, value: int) -> None:
        self._length = value

    @property
    def growable(self) -> bool:  # type: ignore[override]
        f = self.file
        return bool(f is not None and f.growable)

    async def reopen(self, read_only: bool) -> None:
        await self._pass().reopen(read_only)
        self.read_only = read_only

    def describe_filename(self) -> str:
        f = self.file
        return f"blkdebug::{f.describe_filename()}" if f else ""

    def allocated_size(self) -> int:
        f = self.file
        return f.allocated_size() if f is not None and hasattr(f, "allocated_size") else 0
