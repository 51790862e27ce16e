"""What a node keeps durably next to its disk (CONTINUITY.md §2), in one checksummed file.

Canonical JSON ``{"body", "format", "sha256": of the body's canonical JSON, "version"}``,
replaced atomically and durably on every update. An empty, truncated, corrupt, ill-typed or
unknown-version file raises StateFileError naming the file and the field; it is never reset
(a reset history pairs as if nothing had happened). No file: a fresh node. state.py's file
is read too. The activity log keeps its own ring of records, written far more often.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from ..errors import BlockrepError
from .bitmap import REGION_SIZE, RegionBitmap, canonical_json
from .states import DiskState, EntryKind, HistoryEntry, ReplicationState, Role

FORMAT = "blockrep-node-state"
VERSION = 1
# Entries kept. Two nodes that were paired share their last common epoch, and after it
# each appends only a few entries (failover/degraded once per time alone, resync-from, one
# epoch when a crash fell between the two sides' appends): epochs are appended only while
# paired. So the common epoch drops out only after this many checkpoints with ANOTHER peer
# (over two hours at a 2 s interval), and then the handshake's checksummed "full" rule
# still pairs the two: slower, not wrong. The cost: ~45 bytes an entry, ~180 KiB at the cap.
HISTORY_KEEP = 4096
LEGACY_KEEP = 64  # what state.py kept: a full history of its may have been trimmed
LEGACY_CHUNK = 1 << 20  # the region size of its "written-chunks"
ALONE_KINDS = (EntryKind.FAILOVER, EntryKind.DEGRADED)
SYNC_DIRECTIONS = (ReplicationState.SYNC_SOURCE, ReplicationState.SYNC_TARGET)


class StateFileError(BlockrepError):
    """The state file cannot be read or written; the message names the file and why."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"state file {path}: {problem}")
        self.path = path
        self.problem = problem


def default_path(disk: str) -> str:
    """Where a disk's state lives unless configured (state.py's name)."""
    return os.path.abspath(disk) + ".blockrep-state.json"


@dataclass(frozen=True)
class DiskId:  # made when a node first uses a disk: two unrelated disks never pair
    uuid: str
    size: int


@dataclass
class ResyncPosition:  # an interrupted resync resumes from here (the "resume" rule)
    direction: ReplicationState  # this node's side: SyncSource or SyncTarget
    source_generation: HistoryEntry  # the source's current generation when it began
    remaining: RegionBitmap  # regions not yet copied
    peer_node_id: str | None = None


@dataclass
class NodeState:
    path: str
    node_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    disk_id: DiskId | None = None  # None until ensure_disk_id()
    history: list[HistoryEntry] = field(default_factory=list)
    history_trimmed: bool = False  # entries were dropped from the front (HISTORY_KEEP)
    last_role: Role = Role.NONE
    clean_shutdown: bool = True  # cleared by start(), set by stop()
    # a disk nobody told us about: valid, newness unknown; the just-created rule decides
    disk_state: DiskState = DiskState.CONSISTENT
    peer_bitmap: RegionBitmap = field(default_factory=RegionBitmap)
    resync: ResyncPosition | None = None
    fenced_peer_at: float | None = None  # time.time() of a successful fence of the peer
    # not persisted: how this object came to be, and whether memory is ahead of the file
    fresh: bool = field(default=False, compare=False)  # no file existed
    legacy: bool = field(default=False, compare=False)  # read from state.py's format
    unsaved: bool = field(default=False, compare=False)

    @classmethod
    def load(cls, path: str, *, region_size: int = REGION_SIZE) -> NodeState:
        """Read the state file; a missing one is a fresh node (nothing is written yet)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return cls(path, peer_bitmap=RegionBitmap(region_size), fresh=True)
        except OSError as e:
            raise StateFileError(path, f"cannot read: {e.strerror}") from None
        return _decode(path, data)

    def save(self) -> None:
        """Write atomically and durably: temp file, fsync, rename, fsync the directory."""
        data, tmp = self.encode(), self.path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateFileError(self.path, f"cannot write: {e.strerror or e}") from None
        self.unsaved = False

    def encode(self) -> bytes:
        """The file's bytes: a pure function of the state."""
        body = {k: _dump(getattr(self, k.replace("-", "_"))) for k in BODY}
        digest = hashlib.sha256(canonical_json(body)).hexdigest()
        doc = {"body": body, "format": FORMAT, "sha256": digest, "version": VERSION}
        return canonical_json(doc) + b"\n"

    @staticmethod
    def decode(path: str, data: bytes) -> NodeState:
        """Check and parse a file's bytes; StateFileError names what is wrong."""
        return _decode(path, data)

    @contextlib.contextmanager
    def update(self, save: bool = True) -> Iterator[NodeState]:
        """``with state.update(): state.x = ...``: one save, or (on an exception) no change."""
        before = dict(vars(self), history=list(self.history), peer_bitmap=self.peer_bitmap.copy())
        if self.resync is not None:
            before["resync"] = replace(self.resync, remaining=self.resync.remaining.copy())
        try:
            yield self
            self.unsaved = True
            if save:
                self.save()
        except BaseException:
            vars(self).update(before)
            self.unsaved = True  # a failure after the rename leaves the file ahead of memory
            raise

    def ensure_disk_id(self, size: int) -> DiskId:
        """The disk's identity, made (and saved) at first use; refuses another size."""
        if self.disk_id is not None:
            if self.disk_id.size != size:
                had = f"{self.disk_id.size} bytes (disk-id {self.disk_id.uuid})"
                raise StateFileError(self.path, f"is of a disk of {had}, not of {size} bytes")
            return self.disk_id
        try:  # state.py's file knew no size: its bitmap was only long enough for its marks
            bitmap = self.peer_bitmap.resized(size)
        except ValueError as e:
            raise StateFileError(self.path, f"peer-bitmap does not fit the disk: {e}") from None
        with self.update():
            self.disk_id = DiskId(str(uuid.uuid4()), size)
            self.peer_bitmap = bitmap
        return self.disk_id

    def adopt_disk_id(self, disk_id: DiskId) -> None:
        """A full sync made this disk a copy of the peer's: it takes the peer's identity."""
        with self.update():
            self.disk_id = disk_id
            self.peer_bitmap = RegionBitmap(self.peer_bitmap.region_size, disk_id.size)

    def start(self, role: Role) -> bool:
        """The process starts: clear clean-shutdown (saved). Returns the previous value."""
        was_clean = self.clean_shutdown
        with self.update():
            self.clean_shutdown = False
            self.last_role = role
        return was_clean

    def stop(self) -> None:
        """An orderly stop: everything this node did is in the file."""
        with self.update():
            self.clean_shutdown = True

    @property
    def current(self) -> HistoryEntry | None:
        return self.history[-1] if self.history else None

    @property
    def alone_since(self) -> HistoryEntry | None:
        # only paired nodes append epochs: alone is exactly "the newest entry is alone's"
        cur = self.current
        return cur if cur is not None and cur.kind in ALONE_KINDS else None

    def append(self, entry: HistoryEntry, save: bool = True) -> None:
        """Add an entry (e.g. resync-from when a resync target caught up), trim the front."""
        with self.update(save):
            self.history.append(entry)
            if len(self.history) > HISTORY_KEEP:
                del self.history[: len(self.history) - HISTORY_KEEP]
                self.history_trimmed = True

    def new_epoch(self, epoch_id: str, save: bool = True) -> None:
        """A checkpoint the peer acknowledged: nothing differs from the peer any more.

        ``save=False``: the caller saves outside the consumer's pause (a crash before
        leaves this node one epoch behind: the same lineage, not split brain)."""
        with self.update(save):
            self.append(HistoryEntry(EntryKind.EPOCH, epoch_id), save=False)
            self.peer_bitmap.clear()
            self.fenced_peer_at = None

    def go_alone(self, kind: EntryKind) -> HistoryEntry:
        """This node goes on without its peer; idempotent while it stays alone."""
        if kind not in ALONE_KINDS:
            raise ValueError(f"going alone is failover or degraded, not {kind}")
        if self.alone_since is None:
            self.append(HistoryEntry(kind, str(uuid.uuid4())))
        assert self.alone_since is not None
        return self.alone_since

    def adopt_history(self, entries: Iterable[HistoryEntry], trimmed: bool = False) -> None:
        """Take the peer's history (a secondary joining, a resync target done)."""
        new = list(entries)
        with self.update():
            self.history = new[-HISTORY_KEEP:]
            self.history_trimmed = trimmed or len(new) > HISTORY_KEEP

    # -- the peer bitmap (I1 when alone, I2) and the resync position ------------------------

    def _persist_marks(self, new: bool) -> bool:
        # A mark only in memory is no mark: after a failed save, save even if nothing is new.
        wrote = self.unsaved or new
        if wrote:
            self.unsaved = True
            self.save()
        return wrote

    def mark_before_write(self, offset: int, nbytes: int) -> bool:
        """Mark the regions a write touches, durably. True if the file was written (a new
        mark, or an earlier save failed); StateFileError: do not issue the write."""
        return self._persist_marks(self.peer_bitmap.mark(offset, nbytes))

    def mark_regions(self, regions: Iterable[int]) -> bool:
        """mark_before_write by region numbers, all in one save (AL flush, I2 at failover)."""
        return self._persist_marks(self.peer_bitmap.mark_regions(regions))

    def record_fence(self, at: float | None = None) -> None:
        """A fence of the peer succeeded: proof for fenced-primary-discard."""
        with self.update():
            self.fenced_peer_at = time.time() if at is None else at

    def begin_resync(self, position: ResyncPosition) -> None:
        """Record a resync before it copies anything; a target becomes Inconsistent."""
        if position.direction not in SYNC_DIRECTIONS:
            raise ValueError(f"a resync is SyncSource or SyncTarget, not {position.direction}")
        if not position.remaining.same_disk(self.peer_bitmap):
            raise ValueError("the resync's bitmap is not of this disk")
        with self.update():
            self.resync = replace(position, remaining=position.remaining.copy())
            if position.direction is ReplicationState.SYNC_TARGET:
                self.disk_state = DiskState.INCONSISTENT

    def resync_copied(self, offset: int, nbytes: int, save: bool = True) -> int:
        """Regions wholly inside a copied range leave the remainder; returns how many."""
        if self.resync is None:
            raise ValueError("no resync in progress")
        n = self.resync.remaining.clear_range(offset, nbytes)
        self.unsaved |= n > 0
        if save and self.unsaved:
            self.save()
        return n

    def finish_resync(self, disk_state: DiskState) -> None:
        """The resync ended: forget the position and set the disk state in one save."""
        with self.update():
            self.resync = None
            self.disk_state = disk_state


# -- the file's schema: written by _dump, checked field by field by _check ---------------------


class _Opt(NamedTuple):
    spec: Any  # or null


_SCALARS: dict[Any, tuple[tuple[type, ...], str]] = {
    int: ((int,), "a count"), float: ((int, float), "a number"), str: ((str,), "a string"),
    bool: ((bool,), "true or false"), dict: ((dict,), "an object"),
}  # fmt: skip
DISK_ID = {"uuid": str, "size": int}
RESYNC = {"direction": ReplicationState, "source-generation": HistoryEntry,
          "remaining": RegionBitmap, "peer-node-id": _Opt(str)}  # fmt: skip
BODY = {
    "node-id": str, "disk-id": _Opt(DISK_ID), "history": [HistoryEntry], "history-trimmed": bool,
    "last-role": Role, "clean-shutdown": bool, "disk-state": DiskState,
    "peer-bitmap": RegionBitmap, "resync": _Opt(RESYNC), "fenced-peer-at": _Opt(float),
}  # fmt: skip
LEGACY = {"node-id": str, "generations": [HistoryEntry], "alone-since": _Opt(str),
          "written-chunks": [int]}  # fmt: skip
ENVELOPE = {"body": dict, "format": str, "sha256": str, "version": int}


def _dump(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, HistoryEntry):
        return str(v)
    if isinstance(v, RegionBitmap):
        return v.to_dict()
    if isinstance(v, list):
        return [_dump(x) for x in v]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name.replace("_", "-"): _dump(getattr(v, f.name)) for f in dataclasses.fields(v)}
    return v


def _check(path: str, v: Any, spec: Any, name: str) -> Any:
    """``v`` checked against ``spec`` and converted; StateFileError names the field."""

    def bad(what: str) -> StateFileError:
        return StateFileError(path, f"field {name} should be {what}, not {json.dumps(v)[:40]}")

    if isinstance(spec, _Opt):
        return None if v is None else _check(path, v, spec.spec, name)
    if isinstance(spec, dict):
        if not isinstance(v, dict):
            raise bad("an object")
        pre = f"{name}." if name else ""
        for k in sorted(set(spec) ^ set(v)):
            raise StateFileError(path, f"field {pre}{k} is {'unknown' if k in v else 'missing'}")
        return {k: _check(path, v[k], s, pre + k) for k, s in spec.items()}
    if isinstance(spec, list):
        if not isinstance(v, list):
            raise bad("a list")
        return [_check(path, x, spec[0], f"{name}[{i}]") for i, x in enumerate(v)]
    try:
        if spec is RegionBitmap:
            return RegionBitmap.from_dict(v)
        if spec is HistoryEntry:
            e = HistoryEntry.parse(v) if isinstance(v, str) else None
            if e is None or not e.id:
                raise bad("KIND:UUID or UUID")
            return e
        if isinstance(spec, type) and issubclass(spec, enum.Enum):
            return spec(v)
    except ValueError as e:
        raise StateFileError(path, f"field {name}: {e}") from None
    kinds, what = _SCALARS[spec]
    if not isinstance(v, kinds) or (isinstance(v, bool) and spec is not bool):
        raise bad(what)
    if spec is int and isinstance(v, int) and v < 0:
        raise bad(what)
    return v


def _decode(path: str, data: bytes) -> NodeState:
    def bad(problem: str) -> StateFileError:
        return StateFileError(path, problem)

    if not data.strip():
        raise bad("is empty (a write torn by a crash?)")
    try:
        doc = json.loads(data)
    except UnicodeDecodeError:
        raise bad("is corrupt: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        if not data.rstrip().endswith(b"}"):  # every file this writes ends so
            raise bad(f"is truncated after {len(data)} bytes (a write torn by a crash?)") from None
        raise bad(f"is corrupt: not JSON ({e.msg} at byte {e.pos})") from None
    if isinstance(doc, dict) and "format" not in doc and "generations" in doc:
        # state.py's file: no disk-id, role, disk state nor checksum; 1 MiB chunks; 64 kept;
        # being alone is now read from the newest entry's kind ("alone-since" is dropped)
        old = _check(path, doc, LEGACY, "")
        chunks, gens = old["written-chunks"], old["generations"]
        length = (max(chunks) + 1) * LEGACY_CHUNK if chunks else 0  # ensure_disk_id fixes it
        bm = RegionBitmap(LEGACY_CHUNK, length, chunks)
        trimmed = len(gens) >= LEGACY_KEEP
        return NodeState(path, old["node-id"], None, gens, trimmed, clean_shutdown=False,
                         peer_bitmap=bm, legacy=True)  # fmt: skip
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"is not a blockrep state file (its format is not {FORMAT})")
    if doc.get("version") != VERSION:
        raise bad(f"has version {json.dumps(doc.get('version'))}; this blockrep reads {VERSION}")
    _check(path, doc, ENVELOPE, "")
    digest = hashlib.sha256(canonical_json(doc["body"])).hexdigest()
    if doc["sha256"] != digest:
        raise bad(f"is corrupt: its sha256 is {doc['sha256']}, its body's {digest}")
    b = _check(path, doc["body"], BODY, "")
    d, r, bitmap = b["disk-id"], b["resync"], b["peer-bitmap"]
    if d is not None and bitmap.length != d["size"]:
        raise bad(f"field peer-bitmap is of {bitmap.length} bytes, disk-id.size {d['size']}")
    if r is not None and r["direction"] not in SYNC_DIRECTIONS:
        raise bad(f"field resync.direction is {r['direction']}, not SyncSource or SyncTarget")
    if r is not None and not r["remaining"].same_disk(bitmap):
        raise bad("field resync.remaining is not of the disk of peer-bitmap")
    snake = lambda d: {k.replace("-", "_"): v for k, v in d.items()}  # noqa: E731
    fields = dict(snake(b), disk_id=d and DiskId(**d), resync=r and ResyncPosition(**snake(r)))
    return NodeState(path, **fields)
