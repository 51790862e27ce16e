"""The block layer core: options, graph, generic request layer, file and raw drivers."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from blockrep.block import Graph
from blockrep.block.node import Node
from blockrep.block.options import parse_keyval, parse_options, split_keyval
from blockrep.errors import BlockError, OptionError
from tests.harness.images import make_qcow2
from tests.harness.tools import run

# -- options ---------------------------------------------------------------------------


def test_keyval_dotted_keys_and_comma_escape():
    opts = parse_keyval("driver=qcow2,file.driver=file,file.filename=a,,b.img,backing=hidden0")
    assert opts == {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": "a,b.img"},
        "backing": "hidden0",
    }


def test_keyval_bare_word_and_implied_key():
    assert parse_keyval("readonly") == {"readonly": "on"}
    assert parse_keyval("unix:/tmp/x.sock,server=on", implied_key="path") == {
        "path": "unix:/tmp/x.sock",
        "server": "on",
    }


def test_keyval_conflicting_scalar_and_struct():
    with pytest.raises(OptionError, match="Cannot mix scalar and non-scalar"):
        parse_keyval("file=x,file.filename=y")


def test_keyval_repeated_key_refused():
    with pytest.raises(OptionError, match="given more than once"):
        parse_keyval("a=1,a=2")


def test_split_keeps_empty_values():
    assert split_keyval("a=,b=1") == [("a", ""), ("b", "1")]


def test_json_and_keyval_give_one_dict():
    j, typed = parse_options('{"driver": "raw", "file": {"driver": "file", "filename": "x"}}')
    k, untyped = parse_options("driver=raw,file.driver=file,file.filename=x")
    assert typed and not untyped
    assert j == k


def test_schema_errors_have_qemu_texts(tmp_path):
    p = str(tmp_path / "d.raw")
    open(p, "wb").write(bytes(4096))

    async def go():
        g = Graph()
        with pytest.raises(OptionError, match="Parameter 'driver' is missing"):
            await g.add({"file": "x"})
        with pytest.raises(OptionError, match="Parameter 'driver' does not accept value 'nope'"):
            await g.add({"driver": "nope"})
        with pytest.raises(OptionError, match="Parameter 'bogus' is unexpected"):
            await g.add({"driver": "file", "filename": p, "bogus": 1})
        with pytest.raises(
            OptionError, match="Block format 'file' does not support the option 'bogus'"
        ):
            await g.add(
                {"driver": "file", "filename": p, "bogus": "1"}, typed=False, drive_style=True
            )
        with pytest.raises(
            OptionError, match="Invalid parameter type for 'read-only', expected: boolean"
        ):
            await g.add({"driver": "file", "filename": p, "read-only": "yes"})
        with pytest.raises(OptionError, match="Parameter 'read-only' expects 'on' or 'off'"):
            await g.add({"driver": "file", "filename": p, "read-only": "maybe"}, typed=False)
        with pytest.raises(OptionError, match="Parameter 'locking' does not accept value 'x'"):
            await g.add({"driver": "file", "filename": p, "locking": "x"})
        n = await g.add({"driver": "file", "filename": p, "node-name": "f0"})
        with pytest.raises(OptionError, match="Duplicate nodes with node-name='f0'"):
            await g.add({"driver": "file", "filename": p, "node-name": "f0", "locking": "off"})
        # a child given by the name of an existing node
        raw = await g.add({"driver": "raw", "file": "f0"}, typed=False)
        assert raw.file is n
        with pytest.raises(
            BlockError, match="Cannot find device='nothere' nor node-name='nothere'"
        ):
            await g.add({"driver": "raw", "file": "nothere"})
        await g.close_all()

    run(go())


# -- request layer ---------------------------------------------------------------------


class MemNode(Node):
    """A RAM disk with configurable alignment, to test the generic layer alone."""

    driver_name = "test-mem"

    def __init__(self, size: int, alignment: int = 1, serialize: bool = False) -> None:
        super().__init__("mem", {})
        self.buf = bytearray(size)
        self.length = size
        self.request_alignment = alignment
        self.serialize_overlapping = serialize
        self.log: list[tuple[str, int, int]] = []
        self.gate: asyncio.Event | None = None

    async def _co_read(self, offset: int, nbytes: int) -> bytes:
        assert offset % self.request_alignment == 0 and nbytes % self.request_alignment == 0
        self.log.append(("r", offset, nbytes))
        return bytes(self.buf[offset : offset + nbytes])

    async def _co_write(self, offset: int, data: bytes, fua: bool) -> None:
        assert offset % self.request_alignment == 0 and len(data) % self.request_alignment == 0
        self.log.append(("w", offset, len(data)))
        if self.gate is not None:
            await self.gate.wait()
        self.buf[offset : offset + len(data)] = data

    async def _co_flush(self) -> None:
        return None


def test_bounds_and_read_only_errnos():
    async def go():
        n = MemNode(4096)
        with pytest.raises(BlockError) as e:
            await n.read(4000, 200)
        assert e.value.errno == errno.EIO
        with pytest.raises(BlockError) as e:
            await n.write(-1, b"x")
        assert e.value.errno == errno.EIO
        n.read_only = True
        with pytest.raises(BlockError) as e:
            await n.write(0, b"x")
        assert e.value.errno == errno.EPERM
        with pytest.raises(BlockError) as e:
            await n.discard(0, 512)
        assert e.value.errno == errno.EPERM

    run(go())


def test_unaligned_write_is_read_modify_write():
    async def go():
        n = MemNode(8192, alignment=512)
        n.buf[:] = b"\xaa" * 8192
        await n.write(510, b"\x01\x02\x03\x04")
        assert n.buf[508:516] == b"\xaa\xaa\x01\x02\x03\x04\xaa\xaa"
        assert all(off % 512 == 0 and ln % 512 == 0 for _, off, ln in n.log)
        assert await n.read(509, 3) == b"\xaa\x01\x02"

    run(go())


def test_overlapping_unaligned_writes_do_not_lose_bytes():
    async def go():
        n = MemNode(4096, alignment=512)
        await asyncio.gather(*(n.write(i, bytes([i + 1])) for i in range(0, 64)))
        assert bytes(n.buf[:64]) == bytes(range(1, 65))

    run(go())


def test_serialising_driver_orders_overlapping_requests():
    async def go():
        n = MemNode(4096, serialize=True)
        n.gate = asyncio.Event()
        first = asyncio.create_task(n.write(0, b"A" * 100))
        await asyncio.sleep(0)
        second = asyncio.create_task(n.write(50, b"B" * 100))
        third = asyncio.create_task(n.write(1000, b"C" * 10))  # disjoint: not held back
        await asyncio.sleep(0.01)
        assert [x[1] for x in n.log] == [0, 1000]
        n.gate.set()
        await asyncio.gather(first, second, third)
        assert n.buf[:150] == b"A" * 50 + b"B" * 100
        await n.drain()
        assert n.in_flight() == 0

    run(go())


# -- file / raw drivers ------------------------------------------------------------


def test_file_block_status_discard_and_zeroes(tmp_path):
    p = str(tmp_path / "f.raw")
    with open(p, "wb") as f:
        f.truncate(1 << 20)

    async def go():
        g = Graph()
        n = await g.add({"driver": "file", "filename": p})
        await n.write(65536, b"\x11" * 65536)
        ext = await n.block_status(0, 1 << 20)
        data = [(e.start, e.length) for e in ext if e.data]
        assert data == [(65536, 65536)]
        assert all(e.zero for e in ext if not e.data)
        await n.discard(65536, 65536)
        assert await n.read(65536, 16) == bytes(16)
        await n.write(0, b"\x22" * 8192)
        await n.write_zeroes(0, 4096, may_unmap=False)
        assert await n.read(0, 8192) == bytes(4096) + b"\x22" * 4096
        await n.flush()
        await g.close_all()

    run(go())


def test_raw_offset_and_size_window(tmp_path):
    p = str(tmp_path / "w.raw")
    with open(p, "wb") as f:
        f.write(bytes(range(256)) * 16)

    async def go():
        g = Graph()
        n = await g.add(
            {
                "driver": "raw",
                "offset": 256,
                "size": 1024,
                "file": {"driver": "file", "filename": p},
            }
        )
        assert n.length == 1024
        assert await n.read(0, 4) == bytes([0, 1, 2, 3])
        await n.write(1020, b"wxyz")
        with pytest.raises(BlockError):
            await n.write(1021, b"wxyz")
        with pytest.raises(OptionError, match="has to be smaller or equal"):
            await g.add(
                {
                    "driver": "raw",
                    "offset": 4000,
                    "size": 1024,
                    "file": {"driver": "file", "filename": p, "locking": "off"},
                }
            )
        await g.close_all()
        with open(p, "rb") as f:
            assert f.read()[1276:1280] == b"wxyz"

    run(go())


def test_null_co_reads_zeroes():
    async def go():
        g = Graph()
        n = await g.add({"driver": "null-co", "size": 1 << 20, "read-zeroes": True})
        await n.write(0, b"x" * 10)
        assert await n.read(0, 10) == bytes(10)
        await g.close_all()

    run(go())


def test_second_writer_is_refused_unless_locking_off(tmp_path):
    p = str(tmp_path / "l.raw")
    open(p, "wb").write(bytes(65536))

    async def go():
        g1, g2 = Graph(), Graph()
        await g1.add({"driver": "file", "filename": p})
        with pytest.raises(BlockError, match='Failed to get "write" lock'):
            await g2.add({"driver": "file", "filename": p})
        # one writer + one reader is fine (shared-disk mode needs it)
        r = await g2.add({"driver": "file", "filename": p, "read-only": True})
        # the reader cannot become a writer while the writer lives
        with pytest.raises(BlockError, match="lock"):
            await r.reopen(False)
        assert r.read_only
        w2 = await g2.add({"driver": "file", "filename": p, "locking": "off"})
        await w2.write(0, b"ok")
        await g1.close_all()
        await r.reopen(False)  # the writer is gone: now it can
        await r.write(2, b"!!")
        await g2.close_all()

    run(go())


def test_qemu_sees_our_write_lock(tmp_path):
    """qemu-img refuses to write an image blockrep has open for writing."""
    from tests.harness.tools import tool

    p = str(tmp_path / "q.qcow2")
    run(make_qcow2(p, 1 << 20))

    async def go():
        g = Graph()
        await g.add({"driver": "qcow2", "file": {"driver": "file", "filename": p}})
        r = tool("qemu-io", "-c", "write 0 512", p, check=False)
        await g.close_all()
        return r

    r = run(go())
    assert r.returncode != 0
    assert "lock" in (r.stdout + r.stderr)


def test_cache_direct_uses_aligned_io(tmp_path):
    p = str(tmp_path / "d.raw")
    open(p, "wb").write(bytes(1 << 20))

    async def go():
        g = Graph()
        try:
            n = await g.add({"driver": "file", "filename": p, "cache": {"direct": True}})
        except BlockError as e:
            assert e.errno == errno.EINVAL  # tmpfs has no O_DIRECT
            return False
        assert n.request_alignment >= 512
        await n.write(3, b"abc")
        assert await n.read(0, 8) == b"\0\0\0abc\0\0"
        await g.close_all()
        return True

    run(go())
    with open(p, "rb") as f:
        data = f.read(8)
    assert data in (b"\0\0\0abc\0\0", bytes(8))
    assert os.path.getsize(p) == 1 << 20
