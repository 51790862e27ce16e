"""A region bitmap: the regions of a disk that may differ from the peer (CONTINUITY.md §2).

One bit per region (1 MiB by default, a power of two), LSB first within a byte, in a
bytearray: a 1 TiB disk costs 128 KiB, and marking, testing and counting stay O(1) per
region however many are set. Used for the peer bitmap, the remainder of a resync, and
the region lists the handshake exchanges.

The serialisation is plain JSON data so the state file and the control channel carry
it as is: ``{"region-size", "length", "runs": [[first, count], ...]}`` — readable, and
small for the usual case of a few clustered writes — or, when the runs would be larger
(scattered writes over a big disk), ``"bits"``: the bit array in base64, never more than
``length / region-size / 6`` characters. Which one is a pure function of the content, so
the bytes of a state file depend only on what it says.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

REGION_SIZE = 1 << 20  # DRBD's bitmap granularity is 4 KiB, its AL extent 4 MiB; see §1
RUNS_MAX = 1024  # up to this many runs, always the readable form
_NONZERO = re.compile(rb"[^\x00]+")


def _popcount(b: builtins.bytes | bytearray) -> int:
    return int.from_bytes(b, "little").bit_count()


def canonical_json(value: Any) -> bytes:
    """The one byte form of a JSON value: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


class RegionBitmap:
    """A set of region numbers of a disk of ``length`` bytes, ``region_size`` bytes each."""

    __slots__ = ("region_size", "length", "_bits", "_count")

    def __init__(
        self, region_size: int = REGION_SIZE, length: int = 0, regions: Iterable[int] = ()
    ) -> None:
        if isinstance(region_size, bool) or region_size <= 0 or region_size & (region_size - 1):
            raise ValueError(f"region size {region_size} is not a power of two")
        if length < 0:
            raise ValueError(f"length {length} is negative")
        self.region_size = region_size
        self.length = length
        self._bits = bytearray((self.nregions + 7) // 8)
        self._count = 0
        self.mark_regions(regions)

    # -- geometry -----------------------------------------------------------------------

    @property
    def nregions(self) -> int:
        return -(-self.length // self.region_size)

    def regions_of(self, offset: int, nbytes: int) -> range:
        """The regions a byte range touches (any overlap counts)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.length:
            raise ValueError(f"range {offset}+{nbytes} is outside the disk ({self.length} bytes)")
        if nbytes == 0:
            return range(0)
        return range(offset // self.region_size, (offset + nbytes - 1) // self.region_size + 1)

    def _check(self, region: int) -> None:
        if not 0 <= region < self.nregions:
            raise ValueError(f"region {region} is outside the disk ({self.nregions} regions)")

    def same_disk(self, other: RegionBitmap) -> bool:
        """Same region size and length: the two can be combined."""
        return (self.region_size, self.length) == (other.region_size, other.length)

    def _same_geometry(self, other: RegionBitmap) -> None:
        if not self.same_disk(other):
            raise ValueError(
                f"bitmaps of different disks: {self.length} bytes in {self.region_size}-byte "
                f"regions vs {other.length} bytes in {other.region_size}-byte regions"
            )

    # -- set / clear --------------------------------------------------------------------

    def _fill(self, first: int, end: int, value: bool) -> int:
        """Set or clear regions [first, end); return how many changed."""
        if first >= end:
            return 0
        b0, b1 = first >> 3, (end - 1) >> 3
        before = _popcount(self._bits[b0 : b1 + 1])
        lo = (0xFF << (first & 7)) & 0xFF
        hi = 0xFF >> (7 - ((end - 1) & 7))
        edges = {b0: lo & hi} if b0 == b1 else {b0: lo, b1: hi}
        for b, m in edges.items():
            self._bits[b] = (self._bits[b] | m) if value else (self._bits[b] & ~m & 0xFF)
        if b1 - b0 > 1:
            self._bits[b0 + 1 : b1] = (b"\xff" if value else b"\x00") * (b1 - b0 - 1)
        after = _popcount(self._bits[b0 : b1 + 1])
        self._count += after - before
        return abs(after - before)

    def mark(self, offset: int, nbytes: int) -> bool:
        """Mark every region the byte range touches; True if one was not marked before."""
        r = self.regions_of(offset, nbytes)
        return self._fill(r.start, r.stop, True) > 0

    def mark_regions(self, regions: Iterable[int]) -> bool:
        """Mark regions by number; True if one was not marked before."""
        new = False
        for r in regions:
            self._check(r)
            byte, bit = r >> 3, 1 << (r & 7)
            if not self._bits[byte] & bit:
                self._bits[byte] |= bit
                self._count += 1
                new = True
        return new

    def clear_range(self, offset: int, nbytes: int) -> int:
        """Clear the regions the byte range covers whole; return how many were cleared.

        A region only partly covered keeps its mark: the rest of it may still differ.
        The last region of a disk whose length is not a multiple of the region size is
        whole when the range reaches the end of the disk.
        """
        if offset < 0 or nbytes < 0 or offset + nbytes > self.length:
            raise ValueError(f"range {offset}+{nbytes} is outside the disk ({self.length} bytes)")
        end = offset + nbytes
        first = -(-offset // self.region_size)
        stop = self.nregions if end == self.length else end // self.region_size
        return self._fill(first, stop, False)

    def clear_regions(self, regions: Iterable[int]) -> int:
        """Clear regions by number; return how many were marked."""
        n = 0
        for r in regions:
            self._check(r)
            byte, bit = r >> 3, 1 << (r & 7)
            if self._bits[byte] & bit:
                self._bits[byte] &= ~bit & 0xFF
                self._count -= 1
                n += 1
        return n

    def clear(self) -> None:
        self._bits[:] = bytes(len(self._bits))
        self._count = 0

    def update(self, other: RegionBitmap) -> bool:
        """In place union; True if a region got marked."""
        self._same_geometry(other)
        merged = int.from_bytes(self._bits, "little") | int.from_bytes(other._bits, "little")
        count = merged.bit_count()
        self._bits[:] = merged.to_bytes(len(self._bits), "little")
        new = count > self._count
        self._count = count
        return new

    def union(self, other: RegionBitmap) -> RegionBitmap:
        out = self.copy()
        out.update(other)
        return out

    __or__ = union

    # -- queries ------------------------------------------------------------------------

    def __contains__(self, region: object) -> bool:
        if not isinstance(region, int) or not 0 <= region < self.nregions:
            return False
        return bool(self._bits[region >> 3] & (1 << (region & 7)))

    def __iter__(self) -> Iterator[int]:
        """Marked regions in ascending order (zero bytes are skipped in C)."""
        for m in _NONZERO.finditer(self._bits):
            for b in range(m.start(), m.end()):
                v = self._bits[b]
                while v:
                    low = v & -v
                    yield b * 8 + low.bit_length() - 1
                    v ^= low

    def __len__(self) -> int:
        return self._count

    @property
    def count(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        """Bytes the marked regions cover, the last region clamped to the disk's length."""
        n = self._count * self.region_size
        tail = self.nregions * self.region_size - self.length
        if tail and (self.nregions - 1) in self:
            n -= tail
        return n

    def runs(self) -> list[list[int]]:
        """[[first region, count], ...] ascending, adjacent runs merged."""
        out: list[list[int]] = []
        for r in self:
            if out and out[-1][0] + out[-1][1] == r:
                out[-1][1] += 1
            else:
                out.append([r, 1])
        return out

    def ranges(self) -> list[list[int]]:
        """[[offset, length], ...] in bytes, merged, clamped to the disk's length."""
        rs = self.region_size
        return [
            [first * rs, min((first + n) * rs, self.length) - first * rs]
            for first, n in self.runs()
        ]

    def copy(self) -> RegionBitmap:
        out = RegionBitmap(self.region_size, self.length)
        out._bits[:] = self._bits
        out._count = self._count
        return out

    def resized(self, length: int) -> RegionBitmap:
        """The same marks on a disk of another length; a mark past the new end is an error."""
        out = RegionBitmap(self.region_size, length)
        out.mark_regions(self)
        return out

    def regrid(self, region_size: int) -> RegionBitmap:
        """The same marks at another granularity, never losing a byte (may only grow)."""
        out = RegionBitmap(region_size, self.length)
        for off, n in self.ranges():
            out.mark(off, n)
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RegionBitmap):
            return NotImplemented
        return (self.region_size, self.length, self._bits) == (
            other.region_size,
            other.length,
            other._bits,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"RegionBitmap({self.region_size}, {self.length}, runs={self.runs()})"

    # -- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"region-size": self.region_size, "length": self.length}
        runs = self.runs()
        bits = base64.b64encode(self._bits).decode()
        if len(runs) <= RUNS_MAX or len(canonical_json(runs)) <= len(bits):
            d["runs"] = runs
        else:
            d["bits"] = bits
        return d

    def encode(self) -> builtins.bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any) -> RegionBitmap:
        """The inverse of to_dict; ValueError names what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"a bitmap is an object, not {type(d).__name__}")
        unknown = sorted(set(d) - {"region-size", "length", "runs", "bits"})
        if unknown:
            raise ValueError(f"unknown bitmap field(s) {', '.join(unknown)}")
        for key in ("region-size", "length"):
            v = d.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"bitmap {key} should be a non-negative integer, not {v!r}")
        out = cls(d["region-size"], d["length"])
        if ("runs" in d) == ("bits" in d):
            raise ValueError("a bitmap has exactly one of runs and bits")
        if "bits" in d:
            try:
                raw = base64.b64decode(d["bits"], validate=True)
            except (TypeError, binascii.Error) as e:
                raise ValueError(f"bitmap bits are not base64: {e}") from None
            if len(raw) != len(out._bits):
                raise ValueError(f"bitmap bits have {len(raw)} bytes, not {len(out._bits)}")
            if out.nregions % 8 and raw[-1] >> (out.nregions % 8):
                raise ValueError("bitmap bits mark regions past the end of the disk")
            out._bits[:] = raw
            out._count = _popcount(raw)
            return out
        runs = d["runs"]
        if not isinstance(runs, list):
            raise ValueError(f"bitmap runs should be a list, not {type(runs).__name__}")
        end = 0
        for i, run in enumerate(runs):
            if (
                not isinstance(run, list)
                or len(run) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in run)
                or run[0] < end
                or run[1] < 1
                or run[0] + run[1] > out.nregions
            ):
                raise ValueError(
                    f"bitmap run {i} {run!r} is not [first, count] ascending within "
                    f"{out.nregions} regions"
                )
            out._fill(run[0], run[0] + run[1], True)
            end = run[0] + run[1]
        return out

    @classmethod
    def decode(cls, data: builtins.bytes) -> RegionBitmap:
        try:
            d = json.loads(data)
        except ValueError as e:
            raise ValueError(f"a bitmap is JSON: {e}") from None
        return cls.from_dict(d)
