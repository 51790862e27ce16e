"""Copying regions from this node's disk to the peer's through the replication link.

One region (``CHUNK``, 1 MiB) at a time, with a progress record that status shows as
``sync`` while the copy runs and a tqdm bar on stderr when asked for.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from ..block.node import Node
from .bitmap import REGION_SIZE as CHUNK


class SyncKind(enum.StrEnum):
    """Why a copy runs: status's ``sync.what`` and the progress bar's label."""

    RESYNC = "resync"  # only the regions that may differ
    INITIAL = "initial sync"  # the whole disk (--initial-sync)


@dataclass
class SyncProgress:
    what: SyncKind
    total: int  # bytes to copy (whole regions)
    current: int = 0  # bytes copied so far

    def as_dict(self) -> dict[str, Any]:
        """Status's ``sync`` object (README): ``what``, ``current``, ``total``."""
        return {"what": self.what.value, "current": self.current, "total": self.total}


def all_chunks(length: int) -> list[int]:
    """Every region of a disk of ``length`` bytes (the last one may be short)."""
    return list(range(-(-length // CHUNK)))


async def copy_chunks(
    src: Node, dst: Node, chunks: list[int], progress: SyncProgress, show_bar: bool
) -> None:
    """Copy ``chunks`` of ``src`` onto ``dst`` and flush ``dst``; ``progress`` follows along."""
    from tqdm import tqdm

    bar = tqdm(
        total=len(chunks) * CHUNK,
        unit="B",
        unit_scale=True,
        desc=progress.what.value,
        disable=not show_bar,
    )
    try:
        for c in chunks:
            off = c * CHUNK
            n = min(CHUNK, src.length - off)
            if n > 0:
                await dst.write(off, await src.read(off, n))
            bar.update(CHUNK)
            progress.current += CHUNK
        await dst.flush()
    finally:
        bar.close()
