"""The handshake's decision (CONTINUITY.md §5): a pure function of what both nodes keep.

Two nodes meet; each sends a :class:`Side` (what it keeps durably, §2); ``decide`` says
which rule applies, which way data goes and which regions it copies, or refuses. It does
no I/O, so every row of the table is tested row by row, and it is symmetric: both nodes
compute it and must agree on source and target.

History is compared by CONTENT (``compare_histories``): the common point is the newest
generation id both lists hold, wherever it sits in each list, so a trimmed history (the
last 64 of 100 entries) still finds it, and a crash between the two sides' appends of
the same epoch (one side one epoch ahead) is the same lineage, not a split brain.

Conventions the callers follow (the manager fills a Side in; node_state persists it):

* ``resync-from:ID`` is appended by a resync target when its copy completes; ID is the id
  of the source's newest entry, so for comparison it stands for that generation.
* A node's bitmap holds the regions that may differ from its peer since its last agreed
  epoch; its AL the regions a primary may have written that no acknowledged checkpoint
  covers. Every incremental rule copies the union of both sides' AL and bitmap: copying
  a region more than needed is only slower, missing one breaks I4.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, TypeAlias

from .states import DiskState, EntryKind, HistoryEntry, Role

# A checkpoint's epoch is appended by each node on its own after the checkpoint, so a
# crash in between leaves one node at most one epoch ahead; more than that is not a
# lost append but a history the AL and bitmaps no longer cover.
MAX_LOST_APPENDS = 1

_ALONE = (EntryKind.FAILOVER, EntryKind.DEGRADED)
_NOT_A_SOURCE = (DiskState.INCONSISTENT, DiskState.OUTDATED)  # I3


class Relation(enum.StrEnum):
    SAME = "same"
    PEER_BEHIND = "peer-behind"  # only I went on since the common point
    SELF_BEHIND = "self-behind"  # only the peer went on
    DIVERGED = "diverged"  # both went on
    UNRELATED = "unrelated"  # no common point in the kept histories


@dataclass(frozen=True)
class Comparison:
    relation: Relation
    common: HistoryEntry | None  # the newest generation both hold (as mine spells it)
    mine_after: tuple[HistoryEntry, ...]  # my entries newer than the common point
    theirs_after: tuple[HistoryEntry, ...]


def _lost_append(after: tuple[HistoryEntry, ...]) -> bool:
    """Entries the other side lacks only because it crashed before appending them."""
    return 0 < len(after) <= MAX_LOST_APPENDS and all(e.kind is EntryKind.EPOCH for e in after)


def compare_histories(mine: list[HistoryEntry], theirs: list[HistoryEntry]) -> Comparison:
    """How two histories relate, by content (see the module doc)."""
    mine_t, theirs_t = tuple(mine), tuple(theirs)
    if not mine_t and not theirs_t:
        return Comparison(Relation.SAME, None, (), ())
    shared = {e.id for e in mine_t} & {e.id for e in theirs_t}
    order_mine = [e.id for e in mine_t if e.id in shared]
    order_theirs = [e.id for e in theirs_t if e.id in shared]
    # Shared generations in a different order (or repeated on one side) are no lineage:
    # refusing keeps the answer independent of which side looks.
    if not shared or order_mine != order_theirs:
        return Comparison(Relation.UNRELATED, None, mine_t, theirs_t)
    last = order_mine[-1]
    i = max(k for k, e in enumerate(mine_t) if e.id == last)
    j = max(k for k, e in enumerate(theirs_t) if e.id == last)
    after_m, after_t = mine_t[i + 1 :], theirs_t[j + 1 :]
    if after_m and after_t:
        if _lost_append(after_m) and not _lost_append(after_t):
            rel = Relation.SELF_BEHIND
        elif _lost_append(after_t) and not _lost_append(after_m):
            rel = Relation.PEER_BEHIND
        else:
            rel = Relation.DIVERGED
    elif after_m:
        rel = Relation.PEER_BEHIND
    elif after_t:
        rel = Relation.SELF_BEHIND
    else:
        rel = Relation.SAME
    return Comparison(rel, mine_t[i], after_m, after_t)


class Rule(enum.StrEnum):
    """The rows of CONTINUITY.md §5, named as in logs and status."""

    JUST_CREATED = "just-created"
    IN_SYNC = "in-sync"
    CRASHED_PRIMARY = "crashed-primary"
    CRASHED_SECONDARY = "crashed-secondary"
    PEER_BEHIND = "peer-behind"
    FAILOVER_DISCARD = "failover-discard"
    FENCED_PRIMARY_DISCARD = "fenced-primary-discard"
    SPLIT_BRAIN = "split-brain"
    FULL = "full"
    UNRELATED = "unrelated"
    RESUME = "resume"


class Direction(enum.StrEnum):
    """Which way data goes, seen from the node that called ``decide``."""

    NONE = "none"
    LOCAL_TO_PEER = "local-to-peer"
    PEER_TO_LOCAL = "peer-to-local"


class AllRegions(enum.Enum):
    ALL = "all"  # every region of the disk (a full sync)


ALL = AllRegions.ALL
Regions: TypeAlias = frozenset[int] | Literal[AllRegions.ALL]


@dataclass(frozen=True)
class Side:
    """What one node brings to the handshake (its durable state, §2)."""

    node: str
    disk_id: str
    # the role the node holds now if it has one (given at start, promoted), else the
    # one it last persisted; only used when the histories cannot tell (same lineage)
    last_role: Role = Role.NONE
    disk_state: DiskState = DiskState.CONSISTENT
    history: tuple[HistoryEntry, ...] = ()  # oldest first
    history_trimmed: bool = False  # entries were dropped from the front of history
    clean_shutdown: bool = False
    al: frozenset[int] = frozenset()
    bitmap: frozenset[int] = frozenset()
    # an interrupted resync this node is the target of (when Inconsistent)
    resync_source: str | None = None
    resync_remaining: frozenset[int] = frozenset()
    fenced_peer: bool = False  # a fence of the peer succeeded before this node went alone
    discard_local: bool = False  # `blockrep resolve --discard-local` ran on this node

    def __post_init__(self) -> None:
        # callers pass lists; a tuple keeps the dataclass truly frozen
        object.__setattr__(self, "history", tuple(self.history))

    @property
    def marks(self) -> frozenset[int]:
        """Regions this node may hold differently from its peer."""
        return self.al | self.bitmap


@dataclass(frozen=True)
class Decision:
    rule: Rule
    direction: Direction
    source: str | None  # node names; None when nothing is copied or the pairing is refused
    target: str | None
    regions: Regions
    reason: str  # names the rule (and I3 when I3 refused it)
    refused: bool = False
    marks: Mapping[str, frozenset[int]] = field(default_factory=dict)  # both sides' lists


class _Plan(NamedTuple):
    rule: Rule
    source: Side | None
    target: Side | None
    regions: Regions
    why: str
    refused: bool = False


def _union(*sides: Side) -> frozenset[int]:
    out: frozenset[int] = frozenset()
    for s in sides:
        out |= s.marks
    return out


def _copy(rule: Rule, src: Side, dst: Side, why: str, regions: Regions | None = None) -> _Plan:
    """Copy ``regions`` (by default every region either side marked) from src to dst."""
    return _Plan(rule, src, dst, _union(src, dst) if regions is None else regions, why)


def _refuse(rule: Rule, why: str, regions: Regions = frozenset()) -> _Plan:
    return _Plan(rule, None, None, regions, why, refused=True)


def _nothing(why: str) -> _Plan:
    return _Plan(Rule.IN_SYNC, None, None, frozenset(), why)


def _rebased(after: tuple[HistoryEntry, ...]) -> bool:
    """True when a side's bitmap no longer covers everything since the common point:
    it paired with another node (an epoch after going alone), was made a copy of a
    generation the other side never saw, or is more epochs ahead than a lost append."""
    lead = 0
    while lead < len(after) and after[lead].kind is EntryKind.EPOCH:
        lead += 1
    rest = after[lead:]
    if lead > MAX_LOST_APPENDS:
        return True
    return any(e.kind in (EntryKind.EPOCH, EntryKind.RESYNC_FROM) for e in rest)


def _full(src: Side, dst: Side, why: str) -> _Plan:
    return _copy(Rule.FULL, src, dst, f"copying all of {src.node}'s disk to {dst.node}: {why}", ALL)


def _primary_of(a: Side, b: Side) -> Side | None:
    """The side whose data leads on a shared lineage: the primary, else the only writer."""
    for pick in (lambda s: s.last_role is Role.PRIMARY, lambda s: bool(s.marks)):
        hits = [s for s in (a, b) if pick(s)]
        if len(hits) == 1:
            return hits[0]
    return None


def _same_lineage(a: Side, b: Side, common: HistoryEntry | None) -> _Plan:
    regions = _union(a, b)
    if not regions and a.clean_shutdown and b.clean_shutdown:
        return _nothing(f"both stopped cleanly at {common}")
    p = _primary_of(a, b)
    if p is None:
        if not regions:
            return _nothing(f"nothing written since {common}")
        return _refuse(Rule.SPLIT_BRAIN, f"neither was primary after {common}; both hold writes")
    s = b if p is a else a
    if not p.clean_shutdown or (s.clean_shutdown and regions):
        # a clean stop drains the AL; marks left over mean the stop was not clean
        why = f"primary {p.node} stopped mid-epoch after {common}; its AL goes to {s.node}"
        return _copy(Rule.CRASHED_PRIMARY, p, s, why)
    return _copy(
        Rule.CRASHED_SECONDARY,
        p,
        s,
        f"secondary {s.node} crashed after {common} (its buffers are gone); "
        f"{p.node}'s activity log goes to it",
    )


def _first_alone(after: tuple[HistoryEntry, ...]) -> EntryKind | None:
    return next((e.kind for e in after if e.kind in _ALONE), None)


def _went_on(a: Side, b: Side, after_a: tuple[HistoryEntry, ...], common: HistoryEntry) -> _Plan:
    """Only ``a`` went on since the common point (b is at it, or a lost append ahead)."""
    if all(e.kind is EntryKind.EPOCH for e in after_a):
        if len(after_a) <= MAX_LOST_APPENDS:  # a crash between the two appends
            return _same_lineage(a, b, common)
        return _full(a, b, f"{b.node} is {len(after_a)} epochs behind {a.node}")
    if _rebased(after_a):
        return _full(a, b, f"{a.node} went on with another peer since {common}")
    if _first_alone(after_a) is EntryKind.FAILOVER:
        why = f"{a.node} failed over after {common}; {b.node}'s later writes are discarded"
        return _copy(Rule.FAILOVER_DISCARD, a, b, why)
    return _copy(Rule.PEER_BEHIND, a, b, f"{a.node} went on alone (degraded) after {common}")


def _covered(after: tuple[HistoryEntry, ...]) -> bool:
    """A side that went on alone whose bitmap covers everything it did since the common
    point (alone entries only, at most a lost append before them)."""
    return bool(_kinds(after) & set(_ALONE)) and not _rebased(after)


def _diverged(a: Side, b: Side, cmp: Comparison) -> _Plan:
    after = {a.node: cmp.mine_after, b.node: cmp.theirs_after}
    common = cmp.common
    assert common is not None
    covered = _covered(after[a.node]) and _covered(after[b.node])
    survivors = [s for s in (a, b) if s.fenced_peer and EntryKind.FAILOVER in _kinds(after[s.node])]
    if len(survivors) == 1:
        s = survivors[0]
        p = b if s is a else a
        if not covered:
            return _full(s, p, f"{s.node} fenced {p.node}, but a bitmap no longer covers {common}")
        why = f"both went on alone after {common}; {s.node} fenced {p.node} before failing over"
        return _copy(Rule.FENCED_PRIMARY_DISCARD, s, p, why)
    keeps = [s for s in (a, b) if not s.discard_local]
    if len(keeps) == 1:  # a person resolved it (`resolve --discard-local`)
        src = keeps[0]
        dst = b if src is a else a
        if not covered:
            return _full(src, dst, f"{dst.node} discards its writes (resolve --discard-local)")
        why = f"resolved: {dst.node} discards its writes since {common} (resolve --discard-local)"
        return _copy(Rule.SPLIT_BRAIN, src, dst, why)
    idle = [s for s in (a, b) if not s.marks and _covered(after[s.node])]
    if len(idle) == 2:
        return _nothing(f"neither wrote since {common}")
    if len(idle) == 1:  # §4: automatic only where one side wrote nothing
        dst = idle[0]
        src = b if dst is a else a
        if not _covered(after[src.node]):
            return _full(src, dst, f"{dst.node} wrote nothing since {common}")
        return _went_on(src, dst, after[src.node], common)
    why = f"both went on alone after {common} and no fence proof: nothing overwritten"
    return _refuse(Rule.SPLIT_BRAIN, why)


def _kinds(after: tuple[HistoryEntry, ...]) -> set[EntryKind]:
    return {e.kind for e in after}


def _resume(x: Side, y: Side) -> _Plan:
    """``x`` is an interrupted resync target (Inconsistent); ``y`` is not."""
    if x.resync_source != y.node:
        return _full(y, x, f"{x.node} is Inconsistent with no resumable resync from {y.node}")
    if x.history and y.history:
        cmp = compare_histories(list(x.history), list(y.history))
        if cmp.relation is Relation.UNRELATED or _rebased(cmp.theirs_after):
            return _full(y, x, f"{y.node}'s marks no longer cover the interrupted resync")
    why = f"resuming the resync {y.node} -> {x.node} (remainder and new marks)"
    return _copy(Rule.RESUME, y, x, why, x.resync_remaining | _union(x, y))


def _plan(a: Side, b: Side, initial_sync: bool) -> _Plan:
    if a.node == b.node:
        return _refuse(Rule.UNRELATED, f"both sides are {a.node}")
    if a.history and b.history and a.disk_id != b.disk_id:
        return _refuse(Rule.UNRELATED, f"disk ids differ: {a.disk_id} / {b.disk_id}")
    bad = [s for s in (a, b) if s.disk_state is DiskState.INCONSISTENT]
    if len(bad) == 2:
        return _refuse(Rule.RESUME, "I3: both disks are Inconsistent: no sync source")
    if bad:
        x = bad[0]
        return _resume(x, b if x is a else a)
    if not a.history and not b.history:
        p = [s for s in (a, b) if s.last_role is Role.PRIMARY]
        if not initial_sync or len(p) != 1:
            need = "--initial-sync" if not initial_sync else "one side that is primary"
            return _refuse(Rule.JUST_CREATED, f"no history on either side; needs {need}", ALL)
        q = b if p[0] is a else a
        return _copy(Rule.JUST_CREATED, p[0], q, f"initial sync {p[0].node} -> {q.node}", ALL)
    if not a.history or not b.history:
        src, dst = (a, b) if a.history else (b, a)
        return _full(src, dst, f"{dst.node} has no history (a fresh node)")
    cmp = compare_histories(list(a.history), list(b.history))
    if cmp.relation is Relation.UNRELATED:
        return _no_common(a, b)
    if cmp.relation is Relation.SAME:
        return _same_lineage(a, b, cmp.common)
    assert cmp.common is not None
    if cmp.relation is Relation.PEER_BEHIND:
        return _went_on(a, b, cmp.mine_after, cmp.common)
    if cmp.relation is Relation.SELF_BEHIND:
        return _went_on(b, a, cmp.theirs_after, cmp.common)
    return _diverged(a, b, cmp)


def _no_common(a: Side, b: Side) -> _Plan:
    """No common generation kept: the common epoch was trimmed away, or there is none."""
    if a.history_trimmed == b.history_trimmed:
        why = "both histories were trimmed" if a.history_trimmed else "no common epoch"
        return _refuse(Rule.UNRELATED, why)
    new, old = (a, b) if a.history_trimmed else (b, a)
    last_epoch = max(
        (k for k, e in enumerate(old.history) if e.kind is EntryKind.EPOCH), default=-1
    )
    if _kinds(old.history[last_epoch + 1 :]) & set(_ALONE):
        why = f"{old.node} wrote alone since an epoch {new.node} no longer keeps"
        return _refuse(Rule.SPLIT_BRAIN, why)
    return _full(new, old, f"their common epoch is older than what {new.node} keeps")


def decide(local: Side, peer: Side, *, initial_sync: bool = False) -> Decision:
    """The handshake's rule for ``local`` meeting ``peer`` (CONTINUITY.md §5).

    ``initial_sync`` (``--initial-sync``) only matters when neither side has a history.
    """
    plan = _plan(local, peer, initial_sync)
    marks = {local.node: local.marks, peer.node: peer.marks}
    rule, src, dst, why = plan.rule, plan.source, plan.target, f"{plan.rule}: {plan.why}"
    refused = plan.refused
    if src is not None and src.disk_state in _NOT_A_SOURCE and not refused:
        refused = True
        why = f"{rule} refused by I3: {src.node} is {src.disk_state}, never a sync source ({plan.why})"
    if refused or src is None or dst is None:
        return Decision(rule, Direction.NONE, None, None, plan.regions, why, refused, marks)
    direction = Direction.LOCAL_TO_PEER if src is local else Direction.PEER_TO_LOCAL
    return Decision(rule, direction, src.node, dst.node, plan.regions, why, False, marks)
