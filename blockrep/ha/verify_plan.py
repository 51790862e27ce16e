"""Online verify's pure part (verify.py runs it): which regions a batch takes, which
of them a write touched while it ran (skipped, never a mismatch), how two digest lists
compare, and the progress record that status shows and the verify file keeps."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .bitmap import REGION_SIZE
from .resync import region_span

MAX_BATCH = 64  # regions per digest round trip at full speed (64 MiB)
SHOWN = 100  # mismatched regions listed in status (all are counted and kept)


class Outcome(enum.StrEnum):
    """Status's ``verify.last-result`` (``error: …`` carries the reason after it)."""

    IN_SYNC = "in-sync"
    MISMATCHES = "mismatches"
    ERROR = "error"
    CANCELLED = "cancelled"


# -- pure planning ------------------------------------------------------------------------


def batch_size(rate: int) -> int:
    """Regions per batch: at a low rate a batch is about a quarter second of work, so
    progress and the skip window stay small; unlimited, MAX_BATCH."""
    if rate <= 0:
        return MAX_BATCH
    return max(1, min(MAX_BATCH, rate // (4 * REGION_SIZE)))


def plan_batch(position: int, nregions: int, size: int) -> list[int]:
    """The next batch: ``size`` regions from ``position`` (fewer at the end)."""
    return list(range(max(0, position), min(nregions, position + max(1, size))))


def regions_touched(ranges: Iterable[tuple[int, int]], nregions: int) -> set[int]:
    """The regions that byte ranges (offset, length) touch, below ``nregions``."""
    out: set[int] = set()
    for off, n in ranges:
        first, last = off // REGION_SIZE, (off + max(n, 1) - 1) // REGION_SIZE
        out.update(range(max(0, first), min(nregions, last + 1)))
    return out


def unsettled(
    regions: list[int],
    dirty_chunks: Iterable[int],
    granularity: int,
    in_flight: Iterable[tuple[int, int]],
    nregions: int,
) -> set[int]:
    """The regions of a batch a write touched while it ran: completed meanwhile (the
    dirty bitmap's chunks) or in flight at its start or end."""
    ranges = [(c * granularity, granularity) for c in dirty_chunks]
    return (regions_touched(ranges, nregions) | regions_touched(in_flight, nregions)) & set(regions)


@dataclass(frozen=True)
class BatchResult:
    equal: list[int]
    mismatched: list[int]
    skipped: list[int]


def compare(regions: list[int], mine: list[str], theirs: list[str], skip: set[int]) -> BatchResult:
    """Sort a batch's regions by their two digests; a skipped region is neither."""
    if not (len(regions) == len(mine) == len(theirs)):
        raise ValueError(f"{len(regions)} regions, {len(mine)} and {len(theirs)} digests")
    eq: list[int] = []
    bad: list[int] = []
    skipped: list[int] = []
    for r, a, b in zip(regions, mine, theirs, strict=True):
        (skipped if r in skip else eq if a == b else bad).append(r)
    return BatchResult(eq, bad, skipped)


def region_ranges(regions: Iterable[int], length: int) -> list[list[int]]:
    """[offset, length] of each run of consecutive regions (a short last one as is)."""
    out: list[list[int]] = []
    for r in sorted(set(regions)):
        off, n = region_span(length, r)
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += n
        elif n:
            out.append([off, n])
    return out


# -- what status shows and the verify file keeps --------------------------------------------


@dataclass
class Progress:
    position: int = 0  # the next region to verify
    nregions: int = 0
    length: int = 0
    mismatched: set[int] = field(default_factory=set)  # found by this pass
    skipped_bytes: int = 0
    last_result: str | None = None
    out_of_sync: set[int] = field(default_factory=set)  # found and not repaired yet
    running: bool = False
    rate_limit: int = 0
    rate: int = 0  # bytes/s: moving while a pass runs, then that pass's average
    elapsed: float = 0.0  # seconds the last pass ran
    run: int = 0  # passes started by this node (a client waits for its own)
    digest_bytes: int = 0  # control-channel bytes of the digest requests and answers

    def as_dict(self) -> dict[str, Any]:
        """Status's ``verify`` object (README "Online verify")."""
        bad = sorted(self.mismatched)
        return {
            "running": self.running,
            "run": self.run,
            "position": min(self.position * REGION_SIZE, self.length),
            "total": self.length,
            "mismatched-bytes": sum(region_span(self.length, r)[1] for r in bad),
            "mismatched-regions": bad[:SHOWN],
            "region-size": REGION_SIZE,
            "skipped-bytes": self.skipped_bytes,
            "out-of-sync-bytes": sum(region_span(self.length, r)[1] for r in self.out_of_sync),
            "last-result": self.last_result,
            "rate": self.rate,
            "elapsed": self.elapsed,
            "rate-limit": self.rate_limit,
            "digest-bytes": self.digest_bytes,
        }

    def encode(self, disk_id: str) -> dict[str, Any]:
        return {
            "disk-id": disk_id,
            "position": self.position,
            "mismatched": sorted(self.mismatched),
            "skipped-bytes": self.skipped_bytes,
            "last-result": self.last_result,
            "out-of-sync": sorted(self.out_of_sync),
        }

    def decode(self, doc: Any, disk_id: str) -> None:
        """Take a saved position; ValueError: not this disk's, or not a verify file."""
        if not isinstance(doc, dict) or doc.get("disk-id") != disk_id:
            raise ValueError("it belongs to another disk")

        def regions(v: Any) -> set[int]:
            if not isinstance(v, list) or not all(
                type(r) is int and 0 <= r < self.nregions for r in v
            ):
                raise ValueError("a region list is not valid")
            return set(v)

        pos, skipped, last = doc.get("position"), doc.get("skipped-bytes"), doc.get("last-result")
        if type(pos) is not int or not 0 <= pos <= self.nregions or type(skipped) is not int:
            raise ValueError("its position is not valid")
        if last is not None and not isinstance(last, str):
            raise ValueError("its last result is not valid")
        self.mismatched, self.out_of_sync = regions(doc["mismatched"]), regions(doc["out-of-sync"])
        self.position, self.skipped_bytes, self.last_result = pos, skipped, last


def verify_path(state_path: str) -> str:
    """The verify file, next to the node's state file."""
    return state_path.removesuffix(".json") + ".verify.json"
