"""A secondary checkpoint empties active and hidden both or neither (issue 12, Why 4).

With S out of descriptors, emptying active succeeded and emptying hidden failed:
S had dropped its own speculative writes but kept the pre-images of P's old
epoch, a buffer pair from two epochs. Each test builds S's replication graph in
process (secondary disk raw, active and hidden qcow2, the backup job's
copy-before-write filter on the secondary disk), writes as P (into the secondary
disk, so pre-images land in hidden) and as S's consumer (into active), makes the
checkpoint fail on hidden, and compares every layer with a byte model: before
and after the failure, and after the retry that succeeds.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from blockrep.block import Graph
from blockrep.block.node import EmptyStyle, Node
from blockrep.blockdev import Blockdev
from blockrep.errors import BlockError, ReplicationError
from blockrep.jobs.base import JobManager
from blockrep.replication.filter import ReplicationMode, ReplicationNode
from blockrep.replication.registry import ReplicationRegistry
from tests.harness.images import MiB, qcow2
from tests.harness.tools import allocated_ranges, check_clean, run_async

SIZE = 4 * MiB
C = 65536
BASE = 0x11


class Secondary:
    """S's graph: sec0 (raw secondary disk) ← hidden0 ← active0 ← replication rep0."""

    def __init__(
        self,
        tmp_path: Path,
        active_on_blkdebug: bool = False,
        keep_pages: bool | None = True,
        buffer_dir: Path | None = None,
    ) -> None:
        self.sec = tmp_path / "sec.raw"
        self.active = (buffer_dir or tmp_path) / "active.qcow2"
        self.hidden = (buffer_dir or tmp_path) / "hidden.qcow2"
        self.sec.write_bytes(bytes([BASE]) * SIZE)
        qcow2(self.active, SIZE)
        qcow2(self.hidden, SIZE)
        # blkdebug cannot replace a file's contents: active is emptied in place,
        # which takes no new descriptor (the old code got half-way with it)
        active_file = (
            f"file.file.driver=blkdebug,file.file.image.driver=file,"
            f"file.file.image.filename={self.active},file.file.image.locking=off"
            if active_on_blkdebug
            else f"file.file.filename={self.active},file.file.locking=off"
        )
        self.drives = [
            f"if=none,id=sec0,driver=raw,file.filename={self.sec},file.locking=off",
            "if=none,id=rep0,driver=replication,mode=secondary,top-id=rep0,"
            + ("" if keep_pages is None else f"keep-buffer-pages={'on' if keep_pages else 'off'},")
            + f"file.driver=qcow2,file.node-name=active0,{active_file},"
            "file.backing.driver=qcow2,file.backing.node-name=hidden0,"
            f"file.backing.file.filename={self.hidden},file.backing.file.locking=off,"
            "file.backing.backing=sec0",
        ]
        self.graph = Graph()
        self.registry = ReplicationRegistry(self.graph, JobManager(lambda ev, data: None))
        # the models: the secondary disk, S's view at the last checkpoint, S's view now
        self.sec_model = bytearray([BASE]) * SIZE
        self.ckpt_model = bytearray(self.sec_model)
        self.s_model = bytearray(self.sec_model)

    async def start(self) -> None:
        blockdev = Blockdev(self.graph, None)  # type: ignore[arg-type]  # no exports here
        for d in self.drives:
            await blockdev.drive_add(d)
        await self.registry.start_all(ReplicationMode.SECONDARY)

    def node(self, name: str) -> Node:
        n = self.graph.find(name)
        assert n is not None, name
        return n

    @property
    def rep(self) -> ReplicationNode:
        n = self.node("rep0")
        assert isinstance(n, ReplicationNode)
        return n

    async def p_write(self, off: int, data: bytes) -> None:
        """P's write, as the NBD export on S applies it: through copy-before-write."""
        await self.graph.devices["sec0"].write(off, data)
        self.sec_model[off : off + len(data)] = data

    async def s_write(self, off: int, data: bytes) -> None:
        """S's consumer's write: into active."""
        await self.graph.devices["rep0"].write(off, data)
        self.s_model[off : off + len(data)] = data

    async def checkpoint(self) -> None:
        await self.registry.do_checkpoint_all()
        self.ckpt_model[:] = self.sec_model
        self.s_model[:] = self.sec_model

    async def own_ranges(self, name: str) -> list[tuple[int, int]]:
        """What a buffer holds in its own layer."""
        return [
            (e.start, e.length)
            for e in await self.node(name).block_status(0, SIZE)
            if e.present and e.depth == 0
        ]

    async def assert_layers(self) -> None:
        """Every layer reads as the models say, byte for byte."""
        assert await self.node("hidden0").read(0, SIZE) == bytes(self.ckpt_model), "hidden"
        assert await self.node("active0").read(0, SIZE) == bytes(self.s_model), "active"
        assert await self.graph.devices["rep0"].read(0, SIZE) == bytes(self.s_model), "S's view"
        assert self.sec.read_bytes() == bytes(self.sec_model), "secondary disk"

    async def fill(self, rng: random.Random) -> None:
        """P changes clusters 0..7 (their pre-images go to hidden); S writes 8..15."""
        for i in range(8):
            await self.p_write(i * C + rng.randrange(C // 2), rng.randbytes(C // 2))
        for i in range(8, 16):
            await self.s_write(i * C + rng.randrange(C // 2), rng.randbytes(C // 2))
        # S also overwrites a cluster P changed: active shadows hidden there
        await self.s_write(3 * C, rng.randbytes(100))

    async def close(self) -> None:
        await self.graph.close_all()

    def check_images(self) -> None:
        check_clean(self.active)
        check_clean(self.hidden)


def run_secondary(
    tmp_path: Path, body: Callable[[Secondary], Awaitable[None]], **kw: Any
) -> Secondary:
    s = Secondary(tmp_path, **kw)

    async def go() -> None:
        try:
            await s.start()
            await body(s)
        finally:
            await s.close()

    run_async(go(), 60)
    return s


async def failed_checkpoint_keeps_both(s: Secondary, errno_: int) -> None:
    """The checkpoint fails on hidden; both buffers hold what they held."""
    held = (await s.own_ranges("active0"), await s.own_ranges("hidden0"))
    assert held[0] and held[1], "premise: both buffers hold data"
    with pytest.raises(ReplicationError, match="Failed to empty the hidden disk"):
        await s.registry.do_checkpoint_all()
    # reported to the HA manager, with what went wrong
    assert s.rep.state.error == errno_
    with pytest.raises(ReplicationError, match="I/O error occurred"):
        s.registry.get_error_all()
    assert (await s.own_ranges("active0"), await s.own_ranges("hidden0")) == held
    await s.assert_layers()


async def retry_succeeds(s: Secondary, rng: random.Random) -> None:
    """Writes go on after the failed checkpoint; the next checkpoint empties both."""
    await s.p_write(20 * C, rng.randbytes(C))
    await s.s_write(21 * C, rng.randbytes(C))
    await s.assert_layers()
    epoch = s.rep.state.epoch
    await s.checkpoint()
    assert s.rep.state.epoch == epoch + 1
    assert await s.own_ranges("active0") == []
    assert await s.own_ranges("hidden0") == []
    await s.assert_layers()
    # and the next epoch replicates as usual
    await s.fill(rng)
    await s.assert_layers()
    await s.checkpoint()
    await s.assert_layers()


def test_checkpoint_failing_on_hidden_keeps_active_and_hidden(tmp_path):
    """hidden's fresh file cannot be made (EMFILE): active is not emptied either
    (buffers swapped for fresh files: keep-buffer-pages=off)."""

    async def body(s: Secondary) -> None:
        rng = random.Random(1)
        await s.fill(rng)
        await s.assert_layers()
        hidden_file = s.node("hidden0").file
        assert hidden_file is not None
        real = hidden_file.replace_contents

        async def out_of_descriptors(content: bytes) -> None:
            raise BlockError(errno.EMFILE, "Could not create the fresh file: Too many open files")

        hidden_file.replace_contents = out_of_descriptors  # type: ignore[method-assign]
        await failed_checkpoint_keeps_both(s, errno.EMFILE)
        hidden_file.replace_contents = real  # type: ignore[method-assign]
        await retry_succeeds(s, rng)

    s = run_secondary(tmp_path, body, keep_pages=False)
    s.check_images()
    assert allocated_ranges(s.active) == [] and allocated_ranges(s.hidden) == []


def _exhaust_descriptors() -> tuple[list[int], tuple[int, int]]:
    """Take every descriptor the process may still open (soft limit lowered first,
    so that filling it is quick); returns them and the limits to restore."""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limits[0], in_use + 64), limits[1]))
    taken: list[int] = []
    try:
        while True:
            taken.append(os.dup(0))
    except OSError as e:
        assert e.errno == errno.EMFILE
    return taken, limits


def _release_descriptors(taken: list[int], limits: tuple[int, int]) -> None:
    for fd in taken:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def test_checkpoint_out_of_descriptors_keeps_buffers_then_retries(tmp_path):
    """The real case: no descriptor left. Active (emptied in place, no descriptor
    needed) went first in the old code and was emptied; hidden's swap then failed."""

    async def body(s: Secondary) -> None:
        rng = random.Random(2)
        await s.fill(rng)
        await s.assert_layers()
        taken, limits = _exhaust_descriptors()
        try:
            with pytest.raises(ReplicationError, match="Failed to empty the hidden disk") as ei:
                await s.registry.do_checkpoint_all()
        finally:
            _release_descriptors(taken, limits)
        assert "Too many open files" in str(ei.value)
        assert s.rep.state.error == errno.EMFILE
        await s.assert_layers()
        assert await s.own_ranges("active0") and await s.own_ranges("hidden0")
        await retry_succeeds(s, rng)

    s = run_secondary(tmp_path, body, active_on_blkdebug=True, keep_pages=False)
    s.check_images()
    assert allocated_ranges(s.active) == [] and allocated_ranges(s.hidden) == []


def test_checkpoint_completes_when_only_the_staged_buffer_cannot_swap(tmp_path):
    """Once hidden is emptied, active's emptying cannot fail for want of a
    descriptor: its fresh file cannot be made, so it is emptied in place."""

    async def body(s: Secondary) -> None:
        rng = random.Random(3)
        await s.fill(rng)
        active_file = s.node("active0").file
        assert active_file is not None

        async def out_of_descriptors(content: bytes) -> None:
            raise BlockError(errno.EMFILE, "Could not create the fresh file: Too many open files")

        active_file.replace_contents = out_of_descriptors  # type: ignore[method-assign]
        await s.checkpoint()
        assert s.rep.state.error == 0
        assert await s.own_ranges("active0") == []
        assert await s.own_ranges("hidden0") == []
        await s.assert_layers()
        await s.fill(rng)
        await s.assert_layers()
        await s.checkpoint()
        await s.assert_layers()

    s = run_secondary(tmp_path, body, keep_pages=False)
    s.check_images()  # emptied in place: QEMU's fresh layout, no leaked cluster


def test_checkpoint_keeps_buffer_pages_and_needs_no_descriptor(tmp_path):
    """keep-buffer-pages (the default): a checkpoint leaves active and hidden at
    their length and st_blocks, so the next epoch overwrites pages the system
    already gave instead of faulting in fresh ones (issue 15: this VM's host
    faults every page the guest freed, and S's copies before write into fresh
    buffer pages ran at a quarter of the speed); it takes no new descriptor, so
    it succeeds with none left; the next epoch fills them without growing them."""

    async def body(s: Secondary) -> None:
        rng = random.Random(5)
        await s.fill(rng)
        await s.assert_layers()
        sizes = {p: (os.stat(p).st_size, os.stat(p).st_blocks) for p in (s.active, s.hidden)}
        taken, limits = _exhaust_descriptors()
        try:
            await s.checkpoint()
        finally:
            _release_descriptors(taken, limits)
        assert s.rep.state.error == 0
        assert await s.own_ranges("active0") == [] and await s.own_ranges("hidden0") == []
        await s.assert_layers()
        for p, (size, blocks) in sizes.items():  # nothing cut, nothing freed
            assert os.stat(p).st_size == size and os.stat(p).st_blocks >= blocks, p
        await s.fill(rng)
        await s.assert_layers()
        assert {p: os.stat(p).st_size for p in sizes} == {p: v[0] for p, v in sizes.items()}
        await s.checkpoint()
        await s.assert_layers()

    s = run_secondary(tmp_path, body)
    s.check_images()
    assert allocated_ranges(s.active) == [] and allocated_ranges(s.hidden) == []
    assert not [n for n in os.listdir(tmp_path) if "blockrep-swap" in n]


def test_checkpoint_failing_on_hidden_with_kept_pages_keeps_both(tmp_path):
    """keep-buffer-pages: hidden's L1 table cannot be written (EIO), so hidden is
    not emptied and active, staged first, is taken back."""

    async def body(s: Secondary) -> None:
        rng = random.Random(6)
        await s.fill(rng)
        hidden_file = s.node("hidden0").file
        assert hidden_file is not None
        real = hidden_file.write

        async def failing(offset: int, data: bytes, fua: bool = False) -> None:
            raise BlockError(errno.EIO, "Input/output error")

        hidden_file.write = failing  # type: ignore[method-assign,assignment]
        await failed_checkpoint_keeps_both(s, errno.EIO)
        hidden_file.write = real  # type: ignore[method-assign]
        await retry_succeeds(s, rng)

    s = run_secondary(tmp_path, body)
    s.check_images()
    assert allocated_ranges(s.active) == [] and allocated_ranges(s.hidden) == []


@pytest.mark.parametrize("where", ["tmp_path", "/dev/shm"])
def test_keep_buffer_pages_auto_keeps_them_where_they_are_memory(tmp_path, where):
    """keep-buffer-pages=auto (the default) keeps the pages of buffers on tmpfs and
    swaps in fresh files elsewhere: on a disk the kept pages would be written
    back, and the checkpoint's flushes would wait for them (bench/replication
    with the buffers on ext4: 21 ms at 64 MiB buffered, 73 ms at 256 MiB). The
    file system's type comes from stat(1), not from blockrep."""
    bdir = tmp_path if where == "tmp_path" else Path(tempfile.mkdtemp(dir=where))
    fstype = subprocess.run(
        ["stat", "-f", "-c", "%T", str(bdir)], capture_output=True, text=True, check=True
    ).stdout.strip()
    want = EmptyStyle.KEEP_PAGES if fstype in ("tmpfs", "ramfs") else EmptyStyle.FRESH_FILE

    async def body(s: Secondary) -> None:
        assert s.node("active0").empty_style is want
        assert s.node("hidden0").empty_style is want
        # and query-replication says which it came to
        entry = await s.registry.status(s.rep)
        assert entry["keep-buffer-pages"] is (want is EmptyStyle.KEEP_PAGES)
        rng = random.Random(7)
        await s.fill(rng)
        before = {p: os.stat(p).st_ino for p in (s.active, s.hidden)}
        await s.checkpoint()
        await s.assert_layers()
        same_files = {p: os.stat(p).st_ino for p in before} == before
        assert same_files == (want is EmptyStyle.KEEP_PAGES)
        await s.fill(rng)
        await s.checkpoint()
        await s.assert_layers()

    try:
        s = run_secondary(tmp_path, body, keep_pages=None, buffer_dir=bdir)
        s.check_images()
        assert allocated_ranges(s.active) == [] and allocated_ranges(s.hidden) == []
    finally:
        if bdir != tmp_path:
            shutil.rmtree(bdir)
