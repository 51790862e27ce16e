"""The activity log's on-disk format (CONTINUITY.md §3): a ring of one-page records.

Record ``seq`` goes to slot ``(seq - 1) % SLOTS`` and holds the WHOLE active set, so
recovery reads the newest valid record and replays nothing. Pure functions, plus the
default writer (pwrite + fdatasync). ``activity_log`` is the log that uses them.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from ..errors import BlockError

PAGE = 4096
SLOTS = 8  # two would do (a torn write spares the other); eight keep a short history
RING_SIZE = SLOTS * PAGE
RECORD_MAGIC = b"BRAL"
VERSION = 1
_REC = struct.Struct(">4sHBBQI")  # magic, version, region shift, reserved, seq, count
_CRC = struct.Struct(">I")
MAX_LIMIT = (PAGE - _REC.size - _CRC.size) // 4  # 1018; for a wider reach, larger regions
# All a page holds: worst-case resync ~1 GiB at 1 MiB regions (DRBD's 1237 x 4 MiB)
DEFAULT_LIMIT = MAX_LIMIT
DEFAULT_REGION_SIZE = 1 << 20
MAX_REGION = 2**32 - 1  # region numbers are u32: 4 PiB at 1 MiB regions


class ActivityLogError(BlockError):
    """The activity log cannot be read or written (errno EIO unless said otherwise)."""

    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(err, message)


# -- the on-disk format: pure functions -----------------------------------------------------


def slot_offset(seq: int) -> int:
    return ((seq - 1) % SLOTS) * PAGE


def encode_record(seq: int, region_size: int, regions: Iterable[int]) -> bytes:
    """One page: header, the ascending region numbers, crc32 of both, zero padding."""
    regs = sorted(set(regions))
    if len(regs) > MAX_LIMIT or (regs and not 0 <= regs[0] <= regs[-1] <= MAX_REGION):
        raise ActivityLogError(f"an activity log record cannot hold regions {regs[:3]}...")
    head = _REC.pack(RECORD_MAGIC, VERSION, region_size.bit_length() - 1, 0, seq, len(regs))
    body = head + struct.pack(f">{len(regs)}I", *regs)
    return (body + _CRC.pack(zlib.crc32(body))).ljust(PAGE, b"\0")


@dataclass(frozen=True)
class Record:
    seq: int  # 0: no record was ever committed
    region_size: int
    regions: frozenset[int]


def decode_record(buf: bytes) -> Record | None:
    """The record in one page; None for a torn or corrupt one."""
    if len(buf) < _REC.size + _CRC.size:
        return None
    magic, version, shift, _, seq, count = _REC.unpack_from(buf)
    end = _REC.size + 4 * count
    if magic != RECORD_MAGIC or version != VERSION or seq < 1 or end + _CRC.size > len(buf):
        return None
    regs = struct.unpack_from(f">{count}I", buf, _REC.size)
    ascending = all(a < b for a, b in zip(regs, regs[1:], strict=False))
    ok = _CRC.unpack_from(buf, end)[0] == zlib.crc32(buf[:end]) and ascending and shift >= 12
    return Record(seq, 1 << shift, frozenset(regs)) if ok else None


@dataclass(frozen=True)
class Recovered:
    newest: Record  # the newest valid record (seq 0, no regions, when there is none)
    torn: bool  # one slot held a torn record (a crash mid-commit), ignored


def scan_ring(data: bytes, source: str = "activity log") -> Recovered:
    """The newest valid record of a ring. More than one bad slot cannot come from one
    crash (commits are serial), so it is corruption, reported and never reset."""
    if len(data) > RING_SIZE:
        raise ActivityLogError(f"{source}: {len(data)} bytes, not a ring of {RING_SIZE}")
    data = data.ljust(RING_SIZE, b"\0")  # a crash while the file was being made
    best = Record(0, 0, frozenset())
    bad: list[int] = []
    for i in range(SLOTS):
        page = data[i * PAGE : (i + 1) * PAGE]
        if page.count(0) == PAGE:
            continue
        rec = decode_record(page)
        if rec is None or slot_offset(rec.seq) != i * PAGE:
            bad.append(i)
        elif rec.seq > best.seq:
            best = rec
    if len(bad) > 1:
        raise ActivityLogError(f"{source}: slots {bad} are corrupt (a crash tears at most one)")
    return Recovered(best, bool(bad))


class RecordWriter(Protocol):
    def write_record(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``; durable when it returns."""

    def close(self) -> None: ...


class RingFile:
    """The default writer: pwrite + fdatasync (in a worker thread); sized once, durably."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if os.fstat(self.fd).st_size < RING_SIZE:
            os.ftruncate(self.fd, RING_SIZE)
            os.fsync(self.fd)
            dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)

    def write_record(self, offset: int, data: bytes) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def load(path: str) -> Recovered:
    """The active set a crash left behind (what crash-recovery resync must copy)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Recovered(Record(0, 0, frozenset()), False)
    except OSError as e:
        raise ActivityLogError(f"activity log {path}: {e.strerror}", e.errno or errno.EIO) from e
    return scan_ring(data, f"activity log {path}")


def convert(regions: Iterable[int], old: int, new: int) -> frozenset[int]:
    """The regions of size ``new`` that cover the same bytes as ``regions`` of ``old``."""
    return frozenset(m for n in regions for m in range(n * old // new, -(-(n + 1) * old // new)))
