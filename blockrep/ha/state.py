"""Generation identifiers: the durable history of a node's epochs (split-brain detection).

Each checkpoint starts an epoch with a fresh UUID that both nodes append to a
small state file next to their disk. A node that goes on alone — a secondary
that failed over, a primary that lost its secondary — appends a generation of
its own kind and records which regions it wrote from then on. When two nodes
meet again they compare histories: equal, or one a prefix of the other (the
longer one went on alone; only it wrote, so an incremental resync is safe), or
diverged (both went on alone: split brain; nothing may be overwritten).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

KEEP = 64  # generations kept in the file
CHUNK = 1 << 20  # granularity of the written-regions record


@dataclass
class NodeState:
    path: str
    node_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    generations: list[str] = field(default_factory=list)
    # regions written since this node went on alone (chunk numbers), by generation
    alone_since: str | None = None
    written_chunks: set[int] = field(default_factory=set)

    @classmethod
    def load(cls, path: str) -> NodeState:
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cannot read state file {path}: {e}") from None
        return cls(
            path,
            d.get("node-id", str(uuid.uuid4())),
            list(d.get("generations", [])),
            d.get("alone-since"),
            set(d.get("written-chunks", [])),
        )

    def save(self) -> None:
        """Write atomically and durably (temp file, fsync, rename, fsync dir)."""
        d: dict[str, Any] = {
            "node-id": self.node_id,
            "generations": self.generations[-KEEP:],
            "alone-since": self.alone_since,
            "written-chunks": sorted(self.written_chunks),
        }
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(d, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(os.path.dirname(os.path.abspath(self.path)) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @property
    def current(self) -> str | None:
        return self.generations[-1] if self.generations else None

    def new_epoch(self, gen: str, save: bool = True) -> None:
        """A checkpoint both nodes agreed on: history moves on, nobody is alone.

        ``save=False`` leaves the (fsync-bound) write to the caller, who does it
        outside the consumer's pause.
        """
        self.generations.append(gen)
        self.alone_since = None
        self.written_chunks.clear()
        if save:
            self.save()

    def go_alone(self, kind: str) -> str:
        """This node continues without its peer (failover / degraded)."""
        if self.alone_since is None:
            gen = f"{kind}:{uuid.uuid4()}"
            self.generations.append(gen)
            self.alone_since = gen
            self.save()
        return self.alone_since

    def record_write(self, offset: int, nbytes: int) -> bool:
        """Remember a write made while alone; True if a new chunk got marked."""
        if self.alone_since is None or nbytes <= 0:
            return False
        new = set(range(offset // CHUNK, (offset + nbytes - 1) // CHUNK + 1)) - self.written_chunks
        self.written_chunks |= new
        return bool(new)


@dataclass
class Comparison:
    relation: str  # "same", "peer-behind", "self-behind", "diverged", "unrelated"
    common: str | None


def compare(mine: list[str], theirs: list[str]) -> Comparison:
    """How two histories relate (see the module doc)."""
    n = 0
    while n < len(mine) and n < len(theirs) and mine[n] == theirs[n]:
        n += 1
    common = mine[n - 1] if n else None
    if not mine and not theirs:
        return Comparison("same", None)
    if n == len(mine) == len(theirs):
        return Comparison("same", common)
    if n == len(theirs):
        return Comparison("peer-behind", common)
    if n == len(mine):
        return Comparison("self-behind", common)
    if n == 0:
        return Comparison("unrelated", None)
    return Comparison("diverged", common)


def chunks_to_ranges(chunks: set[int] | list[int]) -> list[list[int]]:
    """[[offset, length], ...] of written chunks, merged."""
    out: list[list[int]] = []
    for c in sorted(chunks):
        if out and out[-1][0] + out[-1][1] == c * CHUNK:
            out[-1][1] += CHUNK
        else:
            out.append([c * CHUNK, CHUNK])
    return out
