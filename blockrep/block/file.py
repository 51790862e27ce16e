"""The ``file`` protocol driver: a host file or block device.

I/O is done with plain pread/pwrite on the event loop thread. On the page cache a
4 KiB pread costs a few microseconds, far less than a hop to a worker thread and
back (bench/qcow2 measured it), so the loop blocks for that long by design. With
``cache.direct=on`` requests bypass the page cache and are padded by the generic
layer to ``request_alignment``; buffers come from mmap, so they are page aligned.

Locking follows QEMU's scheme so that QEMU and blockrep see each other's locks:
open-file-description locks on single bytes, byte ``100 + i`` held for each
permission the user holds and byte ``200 + i`` for each it refuses to share.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import stat
import struct
from typing import Any

from .. import fastpath
from ..errors import BlockError, OptionError
from .graph import Graph, register
from .node import Done, Extent, Node

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# statfs(2) f_type of the file systems whose files are memory (linux/magic.h)
MEMORY_FS_TYPES = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}

F_OFD_GETLK = 36
F_OFD_SETLK = 37

# QEMU's permission bits and lock byte bases (block/file-posix.c)
PERM_CONSISTENT_READ = 0x01
PERM_WRITE = 0x02
PERM_WRITE_UNCHANGED = 0x04
PERM_RESIZE = 0x08
PERM_NAMES = {0x01: "consistent read", 0x02: "write", 0x04: "write unchanged", 0x08: "resize"}
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def fs_type(fd: int) -> int | None:
    """The statfs(2) f_type of the file system ``fd`` lives on (None if unknown)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64
    if _libc.fstatfs(fd, buf) != 0:
        return None
    # f_type is the first field, a word; the magic numbers fit in 32 bits
    return int(struct.unpack_from("@l", buf.raw)[0]) & 0xFFFFFFFF


def _flock(fd: int, cmd: int, ltype: int, start: int) -> int:
    """One OFD lock call on byte ``start``; returns the l_type the kernel reports."""
    # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
    arg = struct.pack("hhqqi4x", ltype, os.SEEK_SET, start, 1, 0)
    res = fcntl.fcntl(fd, cmd, arg)
    return struct.unpack("hhqqi4x", res)[0]


def _byte_locked_by_other(fd: int, byte: int) -> bool:
    return _flock(fd, F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


@register
class FileNode(Node):
    driver_name = "file"
    growable = True
    schema = {
        "filename": "str",
        "aio": ("enum", ("threads", "native", "io_uring")),
        "aio-max-batch": "int",
        "locking": ("enum", ("on", "off", "auto")),
        "pr-manager": "str",
        "drop-cache": "bool",
        "x-check-cache-dropped": "bool",
    }

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        super().__init__(node_name, options)
        self.filename: str = options["filename"]
        self.fd = -1
        self.direct = bool(options.get("cache", {}).get("direct", False))
        self.no_flush = bool(options.get("cache", {}).get("no-flush", False))
        self.locking = options.get("locking", "auto") != "off"
        self.force_share = bool(options.get("force-share", False))
        self.is_block_device = False
        self._locked_bytes: set[int] = set()
        # aio=threads: pread/pwrite in worker threads, so that several requests'
        # syscalls overlap (allocating writes into a sparse file take tens of µs);
        # otherwise on the loop thread (cheapest for page-cache hits)
        self.threads = options.get("aio") == "threads"

    @classmethod
    async def open(cls, graph: Graph, name: str, opts: dict[str, Any], typed: bool) -> FileNode:
        if "filename" not in opts:
            raise OptionError("Parameter 'filename' is missing")
        node = cls(name, opts)
        node._open_fd()
        return node

    def _open_fd(self) -> None:
        flags = os.O_RDONLY if self.read_only else os.O_RDWR
        flags |= os.O_CLOEXEC
        if self.direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(self.filename, flags)
        except OSError as e:
            raise BlockError(
                e.errno or errno.EIO, f"Could not open '{self.filename}': {e.strerror}"
            ) from None
        try:
            st = os.fstat(fd)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            if self.direct:
                self.request_alignment = max(512, _logical_block_size(fd))
            if self.locking and not self.force_share:
                self._apply_locks(fd, self.read_only)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.length = self._query_length()

    # -- locking ---------------------------------------------------------------

    def _perms(self, read_only: bool) -> tuple[int, int]:
        """(held, unshared) permission masks for this user."""
        if read_only:
            # A reader shares writes: shared-disk mode needs one writer + one reader.
            return PERM_CONSISTENT_READ, 0
        return PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, PERM_WRITE | PERM_RESIZE

    def _apply_locks(self, fd: int, read_only: bool) -> None:
        held, unshared = self._perms(read_only)
        for bit, pname in PERM_NAMES.items():
            if held & bit and _byte_locked_by_other(fd, LOCK_SHARED_BASE + _bit_index(bit)):
                raise BlockError(
                    errno.EAGAIN,
                    f'Failed to get "{pname}" lock\n'
                    f"Is another process using the image [{self.filename}]?",
                )
            if unshared & bit and _byte_locked_by_other(fd, LOCK_PERM_BASE + _bit_index(bit)):
                raise BlockError(
                    errno.EAGAIN,
                    f'Failed to get shared "{pname}" lock\n'
                    f"Is another process using the image [{self.filename}]?",
                )
        want = {LOCK_PERM_BASE + _bit_index(b) for b in PERM_NAMES if held & b}
        want |= {LOCK_SHARED_BASE + _bit_index(b) for b in PERM_NAMES if unshared & b}
        for byte in sorted(self._locked_bytes - want):
            _flock(fd, F_OFD_SETLK, fcntl.F_UNLCK, byte)
        for byte in sorted(want - self._locked_bytes):
            _flock(fd, F_OFD_SETLK, fcntl.F_RDLCK, byte)
        self._locked_bytes = want

    async def reopen(self, read_only: bool) -> None:
        if read_only == self.read_only:
            return
        old_fd, old_ro = self.fd, self.read_only
        self.read_only = read_only
        self._locked_bytes = set()
        try:
            self._open_fd()
        except BaseException:
            self.read_only = old_ro
            self.fd = old_fd
            raise
        os.close(old_fd)

    # -- I/O -------------------------------------------------------------------

    def _query_length(self) -> int:
        if self.is_block_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def describe_filename(self) -> str:
        return self.filename

    async def _co_read(self, offset: int, nbytes: int) -> bytes:
        if self.threads and not self.direct:
            try:
                data = await asyncio.get_running_loop().run_in_executor(
                    _pool(), os.pread, self.fd, nbytes, offset
                )
            except OSError as e:
                raise BlockError(
                    e.errno or errno.EIO, f"Could not read '{self.filename}': {e.strerror}"
                ) from None
            return data if len(data) == nbytes else data + bytes(nbytes - len(data))
        try:
            if self.direct:
                buf = mmap.mmap(-1, nbytes)
                got = os.preadv(self.fd, [buf], offset)
                data = buf[:got]
                buf.close()
            else:
                data = os.pread(self.fd, nbytes, offset)
        except OSError as e:
            raise BlockError(
                e.errno or errno.EIO, f"Could not read '{self.filename}': {e.strerror}"
            ) from None
        if len(data) < nbytes:
            # reading past EOF of a growing file (qcow2 metadata) yields zeroes
            data += bytes(nbytes - len(data))
        return data

    async def _co_write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        try:
            if self.direct:
                buf = mmap.mmap(-1, len(data))
                buf[:] = data
                os.pwritev(self.fd, [buf], offset)
                buf.close()
            elif self.threads:
                await asyncio.get_running_loop().run_in_executor(
                    _pool(), _pwrite_all, self.fd, data, offset
                )
            else:
                _pwrite_all(self.fd, data, offset)
        except OSError as e:
            raise BlockError(
                e.errno or errno.EIO, f"Could not write '{self.filename}': {e.strerror}"
            ) from None
        if offset + len(data) > self.length:
            self.length = offset + len(data)
        if fua:
            await self._co_flush()

    # -- the fast path: a page-cache pwrite/pread on the loop thread, as _co_* do --------

    def _fast_write(self, offset: int, data: bytes | memoryview, fua: bool, done: Done) -> bool:
        if self.threads or self.direct or fua:
            return fastpath.refuse("file: aio=threads, O_DIRECT or FUA")
        done(self.pwrite_now(offset, data))
        return True

    def pwrite_now(self, offset: int, data: bytes | memoryview) -> BlockError | None:
        """The fast path's write (page cache, this thread): None, or its error."""
        try:
            _pwrite_all(self.fd, data, offset)
        except OSError as e:
            return BlockError(
                e.errno or errno.EIO, f"Could not write '{self.filename}': {e.strerror}"
            )
        if offset + len(data) > self.length:
            self.length = offset + len(data)
        return None

    def _fast_read(self, offset: int, nbytes: int) -> bytes | None:
        if self.threads or self.direct:
            return None
        try:
            data = os.pread(self.fd, nbytes, offset)
        except OSError:
            return None  # the general path reports it
        if len(data) < nbytes:
            data += bytes(nbytes - len(data))
        return data

    def _file_range(self, offset: int, nbytes: int) -> tuple[int, int] | None:
        return None if self.direct else (self.fd, offset)

    async def _co_write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> None:
        mode = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) if may_unmap else FALLOC_FL_ZERO_RANGE
        if self.is_block_device:
            mode = -1
        try:
            if mode < 0:
                raise OSError(errno.ENOTSUP, "")
            fallocate(self.fd, mode, offset, nbytes)
        except OSError:
            chunk = bytes(min(nbytes, 1 << 20))
            pos = offset
            while pos < offset + nbytes:
                n = min(len(chunk), offset + nbytes - pos)
                await self._co_write(pos, chunk[:n], False)
                pos += n
        if fua:
            await self._co_flush()

    async def _co_discard(self, offset: int, nbytes: int) -> None:
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, nbytes)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
                raise BlockError(e.errno or errno.EIO, f"Could not discard: {e.strerror}") from None
            # discard is advisory: where the file system cannot punch, nothing changes

    async def _co_flush(self) -> None:
        if self.no_flush or self.read_only:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise BlockError(
                e.errno or errno.EIO, f"Could not flush '{self.filename}': {e.strerror}"
            ) from None

    async def _co_block_status(self, offset: int, nbytes: int) -> list[Extent]:
        end = offset + nbytes
        out: list[Extent] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    out.append(Extent(pos, end - pos, True, False, True, 0, pos, self))
                    break
                data = end  # hole up to EOF
            if data > pos:
                hole_end = min(data, end)
                out.append(Extent(pos, hole_end - pos, True, True, False, 0, pos, self))
                pos = hole_end
                continue
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            stop = min(max(hole, pos + 1), end)
            out.append(Extent(pos, stop - pos, True, False, True, 0, pos, self))
            pos = stop
        return out

    def supports_replace_contents(self) -> bool:
        # the fresh file is opened without O_DIRECT: cache.direct=on would be lost
        return not self.direct

    def memory_backed(self) -> bool:
        return fs_type(self.fd) in MEMORY_FS_TYPES

    async def replace_contents(self, content: bytes) -> None:
        """Replace the file by a new one holding ``content``, at the same path.

        The new file is written and synced beside the old one and renamed over it,
        so a crash leaves one or the other, never a mix. The old inode's pages are
        freed by a worker thread: that is what a truncate of a large buffer costs,
        and it no longer delays the caller (a replication checkpoint).
        """
        if self.read_only:
            raise BlockError(errno.EPERM, f"Node '{self.node_name}' is read-only")
        directory = os.path.dirname(os.path.abspath(self.filename))
        tmp = os.path.join(
            directory, f".{os.path.basename(self.filename)}.blockrep-swap-{os.getpid()}"
        )
        mode = stat.S_IMODE(os.fstat(self.fd).st_mode)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        except OSError as e:
            raise BlockError(
                e.errno or errno.EIO, f"Could not create '{tmp}': {e.strerror}"
            ) from None
        try:
            _pwrite_all(fd, content, 0)
            os.fdatasync(fd)
            old_locks = self._locked_bytes
            self._locked_bytes = set()
            if self.locking and not self.force_share:
                self._apply_locks(fd, False)
            os.rename(tmp, self.filename)
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            os.close(fd)
            self._locked_bytes = old_locks
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise BlockError(
                e.errno or errno.EIO, f"Could not replace '{self.filename}': {e.strerror}"
            ) from None
        old, self.fd = self.fd, fd
        self.length = len(content)
        asyncio.get_running_loop().run_in_executor(_pool(), _release_fd, old)

    async def truncate(self, size: int) -> None:
        """Set the file's size (qcow2 uses this to shrink after make_empty)."""
        if self.read_only:
            raise BlockError(errno.EPERM, f"Node '{self.node_name}' is read-only")
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise BlockError(
                e.errno or errno.EIO, f"Could not truncate '{self.filename}': {e.strerror}"
            ) from None
        self.length = size

    def allocated_size(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    async def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the OFD locks too
            self.fd = -1
        await super().close()

    def info(self) -> dict[str, Any]:
        return {"filename": self.filename}


_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="blockrep-aio"
        )
    return _POOL


def _release_fd(fd: int) -> None:
    """Free an unlinked file's pages and close it (in a worker thread)."""
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    done = os.pwrite(fd, data, offset)
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _bit_index(bit: int) -> int:
    return bit.bit_length() - 1


def _logical_block_size(fd: int) -> int:
    BLKSSZGET = 0x1268
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            return struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
    except OSError:
        pass
    return 4096
